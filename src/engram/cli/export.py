"""``engram export``: one self-contained, deployable model file from a stored version.

* ``safetensors``: the weights, with the model spec, version, store id, experience and
  metrics as JSON strings in the file's header metadata. Rebuild it anywhere with
  ``engram.models.build_model(json.loads(metadata["model_spec"]))``.
* ``onnx``: the model rebuilt by :func:`engram.load_model`, traced by ``torch.onnx``
  with a dynamic batch axis, weights embedded, the same metadata as model properties.
  Needs the optional ``onnx`` extra (``pip install 'engram-cl[onnx]'``). A scikit-learn
  version is converted by skl2onnx (inference only; same extra).
* ``skops`` (scikit-learn versions): the version's own ``.skops`` file, checked against
  its recorded hash; load it with ``skops.io.load`` or :func:`engram.load_model`.
* ``joblib`` (scikit-learn versions): the estimator, loaded through engram's allowlist,
  written with ``joblib.dump`` for existing ``joblib.load`` code. That format is
  pickle: loading it runs code, so only ever load it from a source you trust.

Every format gets a model card beside it, ``<out>.card.md`` (:mod:`engram.card`: Markdown
with YAML front matter — what the version is, its data files and lineage with their
hashes, accuracy matrix and forgetting, signature, library versions, the exported file's
sha256, and how to load it safely), written after the model file.

Each file is written to a temporary name beside ``--out`` and renamed into place, so a
failed export leaves any earlier file at ``--out`` (or its card) as it was. An existing
``--out`` or card is overwritten only with ``--force``; nothing is ever written inside the
store's directory (its checkpoints are the store's data), ``--force`` or not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engram import __version__
from engram.card import card_path, card_text
from engram.cli.common import open_store
from engram.cli.output import EXIT_OK, UsageError, emit_json, finite, human_bytes
from engram.errors import EngramError
from engram.faults import fault_errno

_SUFFIXES = {".onnx": "onnx", ".skops": "skops", ".joblib": "joblib", ".pkl": "joblib"}


def export(args: argparse.Namespace) -> int:
    result = export_version(
        args.store, args.version, Path(args.out), fmt=args.format, force=args.force,
        allow_version_mismatch=args.allow_version_mismatch,
    )  # fmt: skip
    if args.json:
        emit_json(result)
    else:
        print_export(result)
    return EXIT_OK


def export_version(
    path: str, version: str, out: Path, *, fmt: str | None, force: bool,
    allow_version_mismatch: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write ``version`` of the store at ``path`` to ``out`` as ``fmt`` (default: from
    the suffix of ``out``), and its model card beside it; what was written, and its size."""
    fmt_name = fmt or _SUFFIXES.get(out.suffix, "safetensors")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name")
    store_dir, where = Path(path).resolve(), out.parent.resolve()
    if where == store_dir or store_dir in where.parents:
        raise UsageError(
            f"--out {out} is inside the store {path}, whose files it could overwrite; "
            "export to a path outside the store"
        )
    card = card_path(out)
    for target in (out, card):
        if os.path.lexists(target) and not force:
            raise UsageError(f"--out {target} exists; pass --force to overwrite it")
    if card.is_dir():
        raise UsageError(f"the model card {card} would replace a directory; choose another --out")
    if fmt_name == "onnx":
        _require_onnx()  # (a scikit-learn version needs skl2onnx too: said when it is one)
    with open_store(path) as store:
        info = store.info(version)
        metadata = {
            "format": "engram-export",
            "engram_version": __version__,
            "version": info.name,
            "store_id": store.store_id,
            "created_at": info.created_at,
            "model_spec": json.dumps(info.meta.get("model_spec")),
            "experience": json.dumps(info.meta.get("experience")),
            "strategy": json.dumps(info.meta.get("strategy")),
            "metrics": json.dumps(finite(info.meta.get("metrics"))),
        }
        if info.artifact is not None:  # a scikit-learn estimator
            _export_estimator(store, info, out, fmt_name, metadata, force,
                              allow_version_mismatch)  # fmt: skip
        elif fmt_name in ("skops", "joblib"):
            raise EngramError(
                f"{store.path} {info.name} holds a torch model; --format {fmt_name} is for "
                "scikit-learn versions (use safetensors or onnx)"
            )
        elif fmt_name == "safetensors":
            weights = store.raw_weights(info.id)  # compacted or plain; no torch
            if weights is None:
                raise EngramError(f"{store.path} {info.name} has no model weights to export")
            _atomic_write(out, lambda tmp: _save_safetensors(weights, tmp, metadata), force)
        else:
            from engram.inference import load_model

            model = load_model(store, info.id)
            spec = info.meta["model_spec"]
            _atomic_write(out, lambda tmp: _save_onnx(model, spec, tmp, metadata), force)
        exported = {"format": fmt_name, "file": out.name, "sha256": _sha256(out),
                    "nbytes": out.stat().st_size, "engram_version": __version__}  # fmt: skip
        text = card_text(store, info.id, export=exported).encode()
        _atomic_write(card, lambda tmp: tmp.write_bytes(text), force)
    result = {"format": fmt_name, "out": str(out), "version": info.name,
              "bytes": out.stat().st_size, "card": str(card)}  # fmt: skip
    if fmt_name == "joblib":
        result["note"] = "joblib files are pickle: load them only from a source you trust"
    return result


def print_export(result: dict[str, Any]) -> None:
    print(
        f"exported {result['version']} as {result['format']} to {result['out']} "
        f"({human_bytes(result['bytes'])}), model card {result['card']}"
    )
    if "note" in result:
        print(f"note: {result['note']}")


def _export_estimator(store: Any, info: Any, out: Path, fmt_name: str, metadata: dict[str, str],
                      force: bool, allow_version_mismatch: bool) -> None:  # fmt: skip
    """A scikit-learn version as ``fmt_name``: its skops file, joblib, or ONNX."""
    from engram.inference import load_model

    if fmt_name == "safetensors":
        raise EngramError(
            f"{store.path} {info.name} holds a scikit-learn estimator, not tensors; export "
            "--format skops, joblib or onnx"
        )
    if fmt_name == "skops":
        data = store.load(info.id, state=False).artifact  # checked against its hash
        _atomic_write(out, lambda tmp: tmp.write_bytes(data), force)
        return
    estimator = load_model(store, info.id, allow_version_mismatch=allow_version_mismatch)
    if fmt_name == "joblib":
        import joblib

        _atomic_write(out, lambda tmp: joblib.dump(estimator, tmp), force)
        return
    sig = info.meta["signature"]
    _atomic_write(out, lambda tmp: _save_sklearn_onnx(estimator, sig, tmp, metadata), force)


def _save_sklearn_onnx(estimator: Any, sig: dict, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as e:
        raise EngramError(
            f"ONNX export of a scikit-learn model needs skl2onnx ({e}); run: "
            "pip install 'engram-cl[onnx]'"
        ) from None
    features = sig["input"]["shape"][0]
    try:
        proto = to_onnx(
            estimator,
            initial_types=[("input", FloatTensorType([None, features]))],
            options={"zipmap": False} if hasattr(estimator, "predict_proba") else None,
        )
    except Exception as e:  # skl2onnx raises many types for what it cannot convert
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngramError(
            f"skl2onnx cannot convert {type(estimator).__name__}: {first}; export --format "
            "skops or joblib instead"
        ) from e
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(path))


def _atomic_write(out: Path, write: Any, overwrite: bool) -> None:
    """Write through a temporary file renamed into place; without ``overwrite``, a file
    that appeared at ``out`` meanwhile is still not replaced."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
            return
        try:
            os.link(tmp, out)  # fails if out exists: no window in which it is clobbered
        except FileExistsError:
            raise UsageError(f"--out {out} exists; pass --force to overwrite it") from None
        except OSError:  # a filesystem without hard links
            if os.path.lexists(out):
                raise UsageError(f"--out {out} exists; pass --force to overwrite it") from None
            os.replace(tmp, out)
    except OSError as e:  # a full disk, a read-only directory: name the file asked for
        if e.filename is None or os.fsdecode(e.filename) == str(tmp):
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    finally:
        with contextlib.suppress(OSError):  # EROFS even if missing: never hide the error in flight
            tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_safetensors(weights: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError

    from engram.store.checkpoint import save_raw  # the bytes safetensors.torch writes

    try:
        save_raw(weights, path, metadata)
    except SafetensorError as e:  # an I/O error (disk full, permission) comes wrapped
        code = fault_errno(e)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def _require_onnx() -> None:
    # torch.onnx's exporter (dynamo=True, the default) needs both
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise EngramError(
            f"ONNX export needs the packages onnx and onnxscript ({e}); "
            "run: pip install 'engram-cl[onnx]'"
        ) from None


def _save_onnx(model: Any, spec: dict, path: Path, metadata: dict[str, str]) -> None:
    import onnx
    import torch

    if hasattr(model, "forward_single_task"):
        raise EngramError(
            "ONNX export of a multi-head (task-incremental) model is not supported: its "
            "forward takes task labels; export --format safetensors instead"
        )
    input_shape = (spec.get("args") or {}).get("input_shape")
    if not (isinstance(input_shape, list) and all(isinstance(d, int) for d in input_shape)):
        raise EngramError(
            f"model spec {spec.get('name')!r} has no input_shape arg; ONNX export needs it "
            "to trace the model (record it in the spec's args)"
        )
    example = torch.zeros(2, *input_shape)  # (B, *input_shape), B dynamic
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    except Exception as e:  # the exporter raises many types; the cause is in its message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngramError(f"torch.onnx could not export {spec.get('name')!r}: {first}") from e
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(path))
