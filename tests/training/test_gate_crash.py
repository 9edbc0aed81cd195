"""The regression gate across a crash: a SIGKILL at any point between the verdict and
the settlement never leaves a failing version on HEAD, and the rerun continues from
the last passing version (it trains the failing experience again and is refused again)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from engram.errors import GateFailed
from engram.store import Store
from engram.train import train

HERE = Path(__file__).parent
# naive forgets experience 0 at once: experience 0 passes, experience 1 fails
RUN = ["training.epochs=1", "run.quiet=true", "logger=none", "benchmark.n_experiences=5",
       "training.commit_every_iterations=3", "gate.min_average_accuracy=0.9",
       "gate.promote=prod", "run.max_experiences=2"]  # fmt: skip


def config(store: Path):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", *RUN])


def heads_and_failures(path: Path) -> tuple[dict | None, list[dict]]:
    with Store.open(path) as store:
        head = store.head
        failed = [store.info(v) for n, v in store.tags().items() if n.startswith("gate-failed-")]
        assert store.verify(all=True).ok
        return (None if head is None else head.meta), [f.meta for f in failed]


# the old crash window (a published failing version) and the step before: in the default
# run; the two points beside them, inside the commit and after the prune: -m slow
@pytest.mark.parametrize(
    "point",
    [
        "verdict",
        pytest.param("publish", marks=pytest.mark.slow),
        "published",
        pytest.param("pruned", marks=pytest.mark.slow),
    ],
)
def test_a_kill_anywhere_in_the_gate_never_leaves_the_failing_version_on_head(
    tmp_path: Path, point: str
) -> None:
    store = tmp_path / "s"
    child = subprocess.run(
        [sys.executable, str(HERE / "gate_kill.py"), str(store), point, *RUN],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr[-2000:])
    head, failed = heads_and_failures(store)
    # HEAD is experience 0's passing version, or a mid-experience version of experience
    # 1 that the kill left before experience 1's version was published; never a failure
    assert head is not None and head.get("gate", {}).get("passed", True), head
    assert head["kind"] == "mid-experience" or head["experience"] == 0, head
    published = point in ("published", "pruned")
    assert [f["experience"] for f in failed] == ([1] if published else [])
    assert all(f["gate"]["passed"] is False for f in failed)

    with pytest.raises(GateFailed, match="regression gate failed after experience 1"):
        train(config(store))
    head, failed = heads_and_failures(store)
    assert head["kind"] == "experience" and head["experience"] == 0
    assert head["gate"]["passed"] is True
    assert [f["experience"] for f in failed] == [1] * (2 if published else 1)
