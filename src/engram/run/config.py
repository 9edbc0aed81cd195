"""Structured configuration schemas for ``engram-train`` (registered in Hydra's ConfigStore).

Every group's YAML is validated against these dataclasses when Hydra composes the
config, so a misspelt key or a value of the wrong type fails at start-up with a message
naming it, not deep inside training. Ranges, choices and keys added with ``+`` are
checked next, before anything trains (:mod:`engram.run.validation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from omegaconf import MISSING

from engram.strategies.registry import PLUGINS


@dataclass
class BenchmarkConfig:
    name: str = "split_digits"
    n_experiences: int = 5
    task_labels: bool = False
    seed: int = 0  # the train/test split and the class order or permutations
    max_angle: float = 90.0  # rotated_digits: the last experience's rotation
    data_dir: str | None = None  # classic datasets: where the files are (or go)
    download: bool = True  # classic datasets: download missing files
    path: str | None = None  # files: the directory of .npz files, one per experience
    n_classes: int | None = None  # files: classes the model is built for (None: inferred)
    test_fraction: float = 0.2  # files without x_test/y_test: held-out fraction
    max_bytes: int | None = None  # files: memory ceiling for the decoded data (None: 8 GiB)


@dataclass
class ModelConfig:
    """Built by :mod:`engram.models` (an allowlist); input size and classes follow the data."""

    name: str = "mlp"  # mlp, cnn, avalanche.<Model>, torchvision.<model>, or registered
    hidden: list[int] = field(default_factory=lambda: [256])
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn
    multihead: bool | None = None  # one head per task; None: when the data has task labels
    args: dict[str, Any] = field(default_factory=dict)  # extra builder arguments


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0


# One section per strategy plugin, from the registry (the one place their
# hyperparameters and defaults are declared); a strategy is the non-null sections.
StrategyConfig = make_dataclass(
    "StrategyConfig",
    [("name", str, field(default="naive"))]
    + [(s, Optional[e.config], field(default=None)) for s, e in PLUGINS.items()],  # noqa: UP045
)


@dataclass
class TrainingConfig:
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 256
    commit_every_iterations: int | None = None
    commit_every_seconds: float | None = None
    async_commit: bool = False  # mid-experience checkpoints written in the background
    # CPU threads for torch (None: torch's default). 1 is fastest for these small models
    # on small machines (measured: the default run 17.3 s -> ~13 s); results are
    # deterministic for a given setting, so keep it when resuming.
    threads: int | None = 1
    # a non-finite loss or gradient: stop (nothing more committed) or skip the minibatch
    nonfinite: str = "stop"
    # a version with a larger |weight| is a finite blow-up and is not committed
    # (engram.training.guard says why 1e6); null: no bound
    max_abs_weight: float | None = 1e6
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N, mps
    precision: str = "32"  # 32, bf16-mixed, 16-mixed (fp16 with a persisted GradScaler)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) for the run


@dataclass
class LoggerConfig:
    tensorboard: bool = True  # events in <store>/tb: tensorboard --logdir runs


@dataclass
class StoreConfig:
    path: str = MISSING  # re-running with the same store resumes it
    lock_timeout: float = 0.0  # seconds to wait for another run holding the store
    keep_mid_experience: bool = False  # keep mid-experience versions of finished experiences
    # s3://bucket/prefix (gs://, az://): pulled before the run if it is ahead, pushed in the
    # background after each experience, so the run resumes on any machine (docs/remote.md)
    remote: str | None = None
    # write a store on a network or FUSE file system anyway: LMDB's locks and memory map
    # are not safe there (engram.store.mounts); refused unless true
    allow_network_fs: bool = False
    # an ed25519 private key file (`engram keygen KEYFILE`): every commit is signed with
    # it (docs/store.md, "Signed versions"); only this path is in the config, never the key
    signing_key: str | None = None


@dataclass
class GateConfig:
    """A regression gate checked after each experience (None: not checked)."""

    max_forgetting: float | None = None
    min_average_accuracy: float | None = None
    promote: str | None = None  # move this tag (e.g. prod) to each version that passes


@dataclass
class RunConfig:
    max_experiences: int | None = None  # train at most N not-yet-trained experiences now
    quiet: bool = False
    # a resumed run also trains what it trained from the weights alone, and prints both
    compare_memory_lost: bool = False
    # what the job returns to a sweeper (engram.metrics.objective): a metric, or a list
    objective: Any = "average_accuracy"


@dataclass
class TrainConfig:
    benchmark: BenchmarkConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    strategy: StrategyConfig = MISSING
    training: TrainingConfig = field(default_factory=TrainingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = MISSING
    store: StoreConfig = MISSING
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    branch: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
