"""Store helpers shared by the ``engram`` subcommands: opening a store, state paths and
their components, and the versions whose manifests cannot be read.

Imports the store (not torch: the store imports it only to load or commit tensors); only
the subcommand modules import this.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engram.cli.output import EXIT_OK, UsageError, emit_json
from engram.errors import EngramError, StoreNotFoundError
from engram.store import Store, version_name

# Top-level keys of a DurableTemplate state that are bookkeeping, not learned memory.
_BOOKKEEPING = ("rng", "clock", "cursor", "adaptations", "metrics")


@contextmanager
def open_store(path: str, mode: str = "r") -> Iterator[Store]:
    """The store at ``path``, or, for a remote (``s3://BUCKET/PREFIX[@REF]``,
    ``file:///ABS/PATH``), its local read-only copy brought up to date
    (:mod:`engram.store.remote.cache`); errors then name the remote, not the copy."""
    if "://" in path:
        with _open_remote(path, mode) as store:
            yield store
        return
    try:
        store = Store.open(path, mode=mode)  # type: ignore[arg-type]
    except StoreNotFoundError:
        raise UsageError(f"no store at {path}: the path does not exist") from None
    with store:
        yield store


@contextmanager
def _open_remote(target: str, mode: str) -> Iterator[Store]:
    from engram.store.remote.cache import RemoteStore, rename_errors, split_ref

    if mode != "r":
        url = split_ref(target)[0]
        raise UsageError(
            f"{url} is a remote: engram reads it but changes it only by `engram push`; run "
            f"this command on a local store (`engram pull {url} DIR`), then push it"
        )
    store = RemoteStore.open_url(target)
    with store:
        try:
            yield store
        except EngramError as e:
            raise rename_errors(e, store) from None


def report(
    args: argparse.Namespace,
    compute: Callable[[Store], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    *,
    mode: str = "r",
) -> int:
    """A subcommand over one store: open ``args.store``, compute the result (a JSON-able
    dict), print it with ``show`` or as JSON (``--json``); returns the exit status."""
    if "://" in args.store and getattr(args, "command", None) == "du":
        raise UsageError(  # it would read every version's slot tables: every pack
            f"du measures a store on disk, not a remote: run it on a clone (`engram pull "
            f"{args.store} DIR`)"
        )
    with open_store(args.store, mode=mode) as store:
        result = compute(store)
    if args.json:
        emit_json(result)
    else:
        show(result)
    return EXIT_OK


# ------------------------------------------------------------------ state trees


def group_of(path: str) -> str:
    """The component a state path belongs to: ``plugins/<name>``, a top key, or ``other``."""
    parts = path.strip("/").split("/")
    if parts[0] == "plugins" and len(parts) > 2:
        return f"plugins/{parts[1]}"
    if parts[0] in _BOOKKEEPING or not parts[0]:
        return "other"
    return parts[0]


def describe_group(group: str, replay: bool) -> tuple[str, str]:
    """``(kind, label)`` of a component for the tables."""
    name = group.removeprefix("plugins/")
    if group == "optimizer":
        return "optimizer", "optimizer"
    if group == "other":
        return "other", "other state (rng, clock, cursor, metrics)"
    if replay:
        return "replay", f"replay buffer {name!r} (slot tables)"
    if group.startswith("plugins/"):
        return "strategy", f"strategy state {name!r}"
    return "state", f"state {name!r}"


def flatten(tree: Any, path: str = "") -> dict[str, Any]:
    """Leaves of a loaded state by path, with the same paths as
    :func:`~engram.store.inspect.tree_arrays`."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{path}/{key}"))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{path}/{i}"))
    else:
        out[path] = tree
    return out


# ------------------------------------------------------------------ damaged versions


def damaged_versions(store: Store, path: str, *, last: int | None = None) -> list[dict[str, Any]]:
    """The versions whose manifests cannot be read, each with the command that drops
    it (``gc --keep-last``: the CLI's only way to drop one version; HEAD and tagged
    versions must be moved off first). ``path`` is the store as the user typed it;
    ``last``: among the newest ``last`` versions."""
    damaged = dict(store.damaged(last=last))
    if not damaged:
        return []
    head, tags = store.inspect.head_id(), store.tags()
    ids = store.version_ids()
    good = [v for v in ids if v not in damaged]
    shown = shlex.quote(path)
    out = []
    for vid, message in damaged.items():
        names = sorted(name for name, t in tags.items() if t == vid)
        if vid == head:
            to = version_name(good[-1]) if good else "VERSION"
            repair = (
                f"it is HEAD: move HEAD to a good version (`engram rollback {shown} {to}`), "
                f"then run `engram ls {shown}` again"
            )
        elif names:
            repair = (
                f"it is tagged {', '.join(names)}: delete the tag (`engram tag {shown} "
                f"{names[0]} --delete`), then run `engram ls {shown}` again"
            )
        else:
            newer = sum(1 for v in ids if v > vid)
            older = [version_name(v) for v in ids
                     if v < vid and v != head and v not in tags.values()]  # fmt: skip
            also = f", and also drops {', '.join(older)}" if older else ""
            repair = (
                f"`engram gc {shown} --keep-last {newer}` drops it (it keeps the {newer} "
                f"newest, HEAD and tagged versions{also})"
            )
        out.append({"id": vid, "name": version_name(vid), "message": message, "repair": repair})
    return out


def print_damaged(damaged: list[dict[str, Any]]) -> None:
    for d in damaged:
        print(f"{d['name']}: damaged manifest, left out ({' '.join(d['message'].split())}); "
              f"{d['repair']}")  # fmt: skip
