"""Loading a stored version for inference: architecture from its spec, weights from the store.

    import engram

    model = engram.load_model("runs/ewc", "prod")      # HEAD, a tag, 7, "v0007", "HEAD~1"
    model = engram.load_model("s3://bucket/runs/ewc@prod")   # a remote, read-only
    logits = model(x)

The architecture is rebuilt from the version's ``meta["model_spec"]`` through
:func:`engram.models.build_model` only (an allowlist: a stored spec never makes engram
import or call anything else), so a store from an untrusted source can be loaded
without executing code from it. No Avalanche import happens unless the model needs it.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any

from engram.errors import ArchitectureMismatchError, EngramError

if TYPE_CHECKING:
    from torch import nn

    from engram.store import Store


def load_model(
    store: Store | str | os.PathLike[str],
    version: int | str = "HEAD",
    *,
    device: Any = "cpu",
    allow_version_mismatch: bool = False,
    trust: str | os.PathLike[str] | None = None,
) -> nn.Module | Any:
    """Rebuild a stored version's model, load its weights, and return it in eval mode.

    A scikit-learn version (``engram-train model=sgd_classifier ...``) gives its fitted
    estimator, read from its ``.skops`` file through engram's allowlist
    (:mod:`engram.sklearn.persist`); ``device`` does not apply to it.

    Args:
        store: a store path (opened read-only, so it works while a trainer writes), an
            open :class:`~engram.store.Store`, or a remote ``s3://BUCKET/PREFIX[@REF]``
            (``file:///ABS/PATH[@REF]``; ``@REF``: the remote seen with its HEAD there),
            read through a local copy that fetches only that version's files
            (:mod:`engram.store.remote.cache`, docs/remote.md).
        version: ``"HEAD"``, a tag, an id (``7``), ``"v0007"`` or ``"HEAD~1"``.
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"auto"``: CUDA when
            available); checkpoints themselves are device-neutral.
        allow_version_mismatch: load a scikit-learn estimator written by another
            scikit-learn version (refused by default: attributes change between releases).
        trust: a public key file (``KEYFILE.pub`` of ``engram keygen``): load the
            version only if its manifest carries a valid signature by that key
            (docs/store.md, "Signed versions").

    Raises:
        VersionNotFoundError: no such version or tag.
        RemoteError: a remote that cannot be read (no credentials, down, no store).
        EngramError: the version records no model spec or no checkpoint, or the spec
            names a builder outside :func:`engram.models.available_models`.
        ArchitectureMismatchError: the rebuilt model does not fit the stored weights.
        CorruptionError: the checkpoint does not match its recorded hash.
        UnsafeModelError: a scikit-learn model file names a type outside the allowlist.
        VersionMismatchError: written by another scikit-learn (and not allowed).
        UntrustedVersionError: ``trust`` given, and the version is unsigned, signed by
            another key, or edited after signing.
    """
    from engram.store import Store

    if isinstance(store, Store):
        return _load(store, version, device, allow_version_mismatch, trust)
    if isinstance(store, str) and "://" in store:
        from engram.store.remote.cache import RemoteStore

        with RemoteStore.open_url(store) as remote:
            return _load(remote, version, device, allow_version_mismatch, trust)
    with Store.open(store, mode="r") as opened:
        return _load(opened, version, device, allow_version_mismatch, trust)


def _load(
    store: Store, version: int | str, device: Any, allow_version_mismatch: bool, trust: Any
) -> Any:
    from engram.training.execution import resolve_device

    if trust is not None:  # by id from here on: what was checked is what is loaded
        from engram.store.signing import require_signed

        version = require_signed(store, version, trust)

    # One load: the version named is resolved once, so a concurrent gc or a moving tag
    # cannot give the spec of one version and the weights of another.
    snapshot = store.load(version, state=False)
    info = snapshot.version
    where = f"{store.path} {info.name}"
    if snapshot.artifact is not None:
        return _estimator(snapshot, where, allow_version_mismatch)
    target = resolve_device(device)
    spec = info.meta.get("model_spec")
    if spec is None:
        raise EngramError(
            f"{where} records no model spec (meta['model_spec']), so its architecture "
            "cannot be rebuilt; commit with meta={'model_spec': {'name': ..., 'args': ...}} "
            "(DurableTemplate(model_spec=...) does), or read the raw weights with "
            "Store.load(version, state=False).model"
        )
    # Through load(), never the file: a compacted version's weights are delta-coded blobs.
    weights = snapshot.model
    if weights is None:
        raise EngramError(f"{where} has no model weights; choose a version that has them")
    return build_with_weights(spec, weights, where).to(target)


def _estimator(snapshot: Any, where: str, allow_version_mismatch: bool) -> Any:
    """A scikit-learn version's estimator, checked against its recorded signature."""
    from engram.sklearn import persist

    meta = snapshot.version.meta
    recorded = (meta.get("sklearn") or {}).get("versions")
    if recorded is None:
        raise EngramError(f"{where} records no scikit-learn versions for its model file")
    estimator = persist.loads(snapshot.artifact, recorded, what=where,
                              allow_version_mismatch=allow_version_mismatch)  # fmt: skip
    sig = meta.get("signature")
    if sig:
        features = getattr(estimator, "n_features_in_", None)
        classes = getattr(estimator, "classes_", None)
        if features != sig["input"]["shape"][0] or (
            classes is not None and [int(c) for c in classes] != sig["classes"]
        ):
            raise ArchitectureMismatchError(
                f"{where}: the estimator ({features} features, classes {classes}) does not "
                f"fit the version's recorded signature {sig}"
            )
    return estimator


def build_with_weights(spec: Any, weights: dict[str, Any], where: str = "") -> nn.Module:
    """Build ``spec`` through the allowlist and load ``weights`` into it (eval mode)."""
    import torch

    from engram.models import build_model

    # On the meta device nothing is allocated or randomly initialised: the stored
    # weights are assigned in place, which matters for large models.
    with torch.device("meta"):
        model = build_model(spec)
    _grow(model, weights)
    _assign(model, weights, where)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        # Some tensor is not in the checkpoint (a non-persistent buffer): build for real.
        model = build_model(spec)
        _grow(model, weights)
        _assign(model, weights, where)
    return model.eval()


def _grow(model: nn.Module, weights: dict[str, Any]) -> None:
    # Dynamic (multi-head, incremental) heads are Avalanche modules; a model without
    # them never imports Avalanche here.
    if any(type(m).__module__.startswith("avalanche.") for m in model.modules()):
        from engram.models import grow_to

        grow_to(model, weights)


def _assign(model: nn.Module, weights: dict[str, Any], where: str) -> None:
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ArchitectureMismatchError(
            f"{where}: the model rebuilt from its spec does not fit the stored weights "
            f"({detail}); was the spec recorded for a different model?"
        ) from None
