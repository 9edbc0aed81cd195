"""May this run continue this store? Every check once, cheapest first, before loading.

A run continues a store's HEAD only if it is the same continual-learning problem
solved the same way. What HEAD's meta records is compared with what the run would
do, in this order, so the cheapest mismatch is reported before anything is read:

1. **the stream** — with data files, each experience trained so far (and the one an
   interrupted run was in) must be the same file with the same bytes (``name:xxh3``);
2. **the model** — the spec it is built from (``engram.models``): name and arguments;
3. **the hyperparameters** — the strategy's, the optimizer's, the template's; a run
   may *branch* (continue from HEAD with new ones), recorded in the next version.

The architecture check (parameter shapes against the stored weights) needs the
adaptations replayed and stays in the template, after these. Every mismatch is one
line in one style: ``<what>: store <stored> vs now <current>``, joined by ``; ``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engram.errors import DataFileError, EngramError, HyperparameterMismatchError
from engram.store import VersionInfo


class ModelMismatchError(EngramError):
    """The model this run would build differs from the one that produced the store."""


def check_lineage(
    head: VersionInfo | None,
    *,
    path: Any,
    hparams: Mapping[str, Any],
    model_spec: Mapping[str, Any] | None = None,
    experience_ids: Sequence[str] | None = None,
    branch: bool = False,
) -> None:
    """Raise if a run with these settings may not continue ``head`` (None: new store)."""
    if head is None:
        return
    meta = head.meta
    if experience_ids:
        check_stream(meta, experience_ids)
    stored_spec = meta.get("model_spec")
    if model_spec is not None and stored_spec is not None:
        diffs = diff(stored_spec, dict(model_spec))
        if diffs:
            raise ModelMismatchError(
                f"the model this run would build differs from the one in {path} "
                f"(HEAD {head.name}): {'; '.join(diffs[:20])}. Use the data and model "
                "settings that created the store, or a new store.path"
            )
    diffs = diff(meta.get("hparams", {}), dict(hparams))
    if diffs and not branch:
        raise HyperparameterMismatchError(
            f"the hyperparameters differ from those that produced {path} "
            f"(HEAD {head.name}): {'; '.join(diffs[:20])}. Use the same settings to resume, "
            "a new store, or branch=True to continue from HEAD with the new settings."
        )


def check_stream(meta: Mapping[str, Any], ids: Sequence[str]) -> None:
    """The files trained so far, and the one being trained when the run stopped, are
    unchanged: a resumed experience would otherwise train half on old, half on new data."""
    before = meta.get("experience_ids") or []
    experience = meta.get("experience", -1)
    trained = experience + 1 if meta.get("kind") == "experience" else experience
    used = experience + 1  # the interrupted experience's file counts too
    for i in range(min(used, len(before))):
        if i < len(ids) and ids[i] == before[i]:
            continue
        was, _, was_digest = before[i].partition(":")
        now, _, now_digest = ids[i].partition(":") if i < len(ids) else ("nothing", "", "")
        how = "trained" if i < trained else "being trained"
        when = "" if i < trained else " when the run stopped"
        if now == was:
            what = f"which has changed since (XXH3 {was_digest}, now {now_digest})"
        else:
            what = f"but the data now gives {now!r} (a file was changed, removed or renamed)"
        raise DataFileError(
            f"experience {i} was {how} on {was!r}{when}, {what}. Trained files must stay as "
            "they were: restore it, and add new data as new files that sort after them"
        )


def diff(stored: Any, current: Any, path: str = "") -> list[str]:
    """``key.sub: store X vs now Y`` for every difference of two JSON-like values."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in stored:
                out.append(f"{sub}: new ({current[key]!r})")
            elif key not in current:
                out.append(f"{sub}: missing (store has {stored[key]!r})")
            else:
                out += diff(stored[key], current[key], sub)
        return out
    return [] if stored == current else [f"{path or 'value'}: store {stored!r} vs now {current!r}"]
