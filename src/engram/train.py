"""engram-train: a Hydra-configured continual-learning run that persists everything.

    engram-train                                      # naive, split digits, runs/...
    engram-train strategy=ewc run.max_experiences=1   # train one new experience, exit
    engram-train -m strategy=naive,ewc,replay seed=0,1,2

Re-running a command resumes its store (``store=...``, by default one per strategy,
benchmark and seed) or reports that the stream is already trained.
"""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram.config import register
from engram.errors import EngramError, GateFailed

register()


def build_plugins(strategy: DictConfig) -> list[Any]:
    """One plugin per non-null section of the strategy config, in a fixed order."""
    from engram import strategies as s

    sections = {
        "ewc": s.EWCPlugin,
        "si": s.SIPlugin,
        "mas": s.MASPlugin,
        "lwf": s.LwFPlugin,
        "replay": s.ERPlugin,
        "der": s.DERPlugin,
        "agem": s.AGEMPlugin,
    }
    return [plugin(**strategy[k]) for k, plugin in sections.items() if strategy[k] is not None]


def model_spec(cfg: DictConfig, input_shape: tuple[int, ...], n_classes: int,
               task_labels: bool) -> dict[str, Any]:  # fmt: skip
    """The model's spec (see engram.models): what the config asks for, sized by the data."""
    m = cfg.model
    multihead = task_labels if m.multihead is None else bool(m.multihead)
    args: dict[str, Any] = {}
    if m.name == "mlp":
        args = {"hidden": list(m.hidden), "multihead": multihead}
    elif m.name == "cnn":
        args = {"channels": list(m.channels), "hidden": list(m.hidden), "multihead": multihead}
    if m.name in ("mlp", "cnn"):
        args = {"input_shape": list(input_shape), "n_classes": n_classes, **args}
    args.update(OmegaConf.to_container(m.args) or {})
    return {"name": m.name, "args": args}


def _stored_spec(path: str) -> dict[str, Any] | None:
    """The model spec of an existing store's HEAD (None for a new store)."""
    from engram.errors import NotAStoreError, StoreNotFoundError
    from engram.store import Store

    try:
        with Store.open(path, mode="r") as store:
            head = store.head
            return None if head is None else head.meta.get("model_spec")
    except (StoreNotFoundError, NotAStoreError):  # not yet a store: opened for writing below
        return None


def build_optimizer(cfg: DictConfig, model: Any) -> Any:
    import torch

    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    raise EngramError(f"unknown optimizer {o.name!r}; available: sgd, adam")


def train(cfg: DictConfig) -> list[list[float]]:
    """Run (or resume) the configured stream; returns the accuracy matrix.

    torch's thread count (``training.threads``) holds for the run only: the caller's
    setting is restored on return, so a library caller's process is left as it was.
    """
    import torch

    from engram.validation import validate

    validate(cfg)  # every option, before anything trains or a store opens
    threads = torch.get_num_threads()
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig) -> list[list[float]]:
    import numpy as np
    import torch

    from engram.benchmarks import build_benchmark
    from engram.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer
    from engram.metrics.tensorboard import ForgettingWriter
    from engram.models import build_model
    from engram.store import Store
    from engram.training.progress import ProgressBar
    from engram.training.template import DurableTemplate

    if cfg.training.threads is not None:
        if cfg.training.threads < 1:
            raise EngramError(f"training.threads must be >= 1 or null, not {cfg.training.threads}")
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    path = cfg.store.path
    stored = _stored_spec(path)
    stored_classes = (stored or {}).get("args", {}).get("n_classes")
    bench = build_benchmark(OmegaConf.to_container(cfg.benchmark), n_classes=stored_classes)
    spec = model_spec(cfg, bench.input_shape, bench.n_classes, bench.task_labels)
    if stored is not None and stored != spec:
        changed = sorted(
            k for k in set(stored.get("args", {})) | set(spec["args"])
            if stored.get("args", {}).get(k) != spec["args"].get(k)
        ) or ["name"]  # fmt: skip
        raise EngramError(
            f"the model this run would build differs from the one in {path}: "
            + "; ".join(
                f"{k}: store {stored.get('args', {}).get(k)!r} vs now {spec['args'].get(k)!r}"
                for k in changed
            )
            + ". Use the data and model settings that created the store, or a new store.path"
        )
    model = build_model(spec)
    optimizer = build_optimizer(cfg, model)
    quiet = cfg.run.quiet
    store = Store.open(path, mode="c", lock_timeout=cfg.store.lock_timeout)
    board = None

    def report(index: int, row: list[float]) -> None:
        if board is not None:
            board.initial = strategy.initial_accuracy  # measured by fit() before training
            board.experience(
                strategy.accuracy_matrix, strategy.last_commit_seconds, strategy.last_commit_bytes
            )
        if not quiet:
            print(f"experience {index}: accuracy " + " ".join(f"{a:.2f}" for a in row), flush=True)

    with store, DurableTemplate(
        model=model,
        optimizer=optimizer,
        store=store,
        plugins=build_plugins(cfg.strategy) + ([] if quiet else [ProgressBar()]),
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        seed=cfg.seed,
        commit_every_iterations=cfg.training.commit_every_iterations,
        commit_every_seconds=cfg.training.commit_every_seconds,
        async_commit=cfg.training.async_commit,
        keep_mid_experience=cfg.store.keep_mid_experience,
        hparams={"benchmark": _benchmark_hparams(cfg), "model": spec},
        branch=cfg.branch,
        name=cfg.strategy.name,
        model_spec=spec,
        meta={"experience_ids": bench.experience_ids} if bench.experience_ids else None,
        gate=_gate(cfg),
        nonfinite=cfg.training.nonfinite,
    ) as strategy:  # fmt: skip
        train_list, test_list = list(bench.train_stream), list(bench.test_stream)
        done_before = strategy.restore(train_list + test_list)
        _check_stream(store, bench.experience_ids, strategy.cursor.experience)
        already = strategy.cursor.experience
        if cfg.logger.tensorboard:
            board = ForgettingWriter(Path(path) / "tb", initial=strategy.initial_accuracy)
            written = {
                v.meta["experience"]: v.new_bytes
                for v in store.versions()
                if v.meta.get("kind") == "experience"
            }
            sizes = [written.get(i, 0) for i in range(len(strategy.accuracy_matrix))]
            board.history(strategy.accuracy_matrix, sizes)  # from the store: same after resume
        if done_before and not quiet:
            print(f"resuming {path} after experience {already - 1}")
        try:
            matrix = strategy.fit(
                train_list, test_list,
                max_experiences=cfg.run.max_experiences, on_experience=report,
            )  # fmt: skip
        finally:
            if board is not None:
                board.initial = strategy.initial_accuracy
                board.hparams(_flat_hparams(cfg), strategy.accuracy_matrix)
                board.close()
        if already >= len(train_list):
            print(f"{path}: all {already} experiences are already trained")
    if not quiet and matrix:
        initial = strategy.initial_accuracy
        print("\naccuracy matrix (row i: after training experience i; column j: tested on j)")
        for i, row in enumerate(matrix):
            print(f"  {i}: " + " ".join(f"{a:.3f}" for a in row))
        print(
            f"average accuracy {average_accuracy(matrix):.3f}  forgetting {forgetting(matrix):.3f}"
            f"  BWT {backward_transfer(matrix):+.3f}  FWT {forward_transfer(matrix, initial):+.3f}"
        )
    return matrix


def _benchmark_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The benchmark settings a resumed run must share (not where the data lives)."""
    b = OmegaConf.to_container(cfg.benchmark)
    for key in ("data_dir", "download", "path", "max_bytes"):
        b.pop(key, None)
    return b


def _check_stream(store: Any, ids: list[str], trained: int) -> None:
    """With ``files``, the files already trained must be the same, in the same order, and
    so must the file of an experience that was interrupted (HEAD mid-experience): its
    resumption would train half on the old data, half on the new."""
    from engram.benchmarks.files import DataFileError

    head = store.head
    if not ids or head is None:
        return
    before = head.meta.get("experience_ids") or []
    used = trained
    if head.meta.get("kind") == "mid-experience":
        used = max(trained, int(head.meta.get("experience", -1)) + 1)
    for i in range(min(used, len(before))):
        if i >= len(ids) or ids[i] != before[i]:
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


def _gate(cfg: DictConfig) -> Any:
    """The configured regression gate, or None when nothing is checked or promoted."""
    from engram.training.gate import RegressionGate

    settings = OmegaConf.to_container(cfg.gate)
    return RegressionGate(**settings) if any(v is not None for v in settings.values()) else None


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """strategy.ewc.ewc_lambda=50.0 style keys, for the HParams dashboard."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif node is not None:
            out[prefix] = node

    for group in ("benchmark", "model", "optimizer", "strategy", "training", "gate"):
        walk(OmegaConf.to_container(cfg[group]), group)
    out["seed"] = cfg.seed
    return out


def _hydra_main() -> None:
    import hydra

    from engram.validation import check_overrides

    try:  # overrides omegaconf itself would reject with a traceback
        check_overrides(sys.argv[1:])
    except EngramError as e:
        print(f"engram-train: error: {e}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def run(cfg: DictConfig) -> None:
        warnings.filterwarnings("ignore")
        try:
            train(cfg)
        except GateFailed as e:
            print(f"engram-train: {e}", file=sys.stderr)
            sys.exit(3)
        except EngramError as e:
            print(f"engram-train: error: {e}", file=sys.stderr)
            sys.exit(2)

    run()


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
