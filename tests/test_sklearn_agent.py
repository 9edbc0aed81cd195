"""experiments/sklearn_agent.py end to end: data files arrive, a trainer subprocess
promotes versions through the regression gate, the agent answers with ``prod``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engram.store import Store

AGENT = Path(__file__).resolve().parents[1] / "experiments" / "sklearn_agent.py"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("agent")
    done = subprocess.run(
        [sys.executable, str(AGENT), "demo", "--workdir", str(workdir), "--experiences", "3",
         "--pause", "0.5"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    return workdir, done


def test_demo_answers_with_every_promoted_version(demo) -> None:
    workdir, done = demo
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    answered = {v for v, s in summary["versions"].items() if s["requests"] > 0}
    assert len(answered) >= 2, done.stdout
    assert "agent: no prod yet" in done.stdout  # it started before the first version
    with Store.open(workdir / "store") as store:
        prod = store.info("prod")
        assert prod.meta["gate"]["passed"] is True
        assert prod.meta["experience"] == 2  # the last of the three files
        assert all(store.info(v).meta["gate"]["passed"] for v in answered)
    assert summary["prod"] == prod.name
    assert f"prod = {prod.name}" in done.stdout


def test_serve_answers_json_lines_and_refuses_a_wrong_shape(demo) -> None:
    workdir, done = demo
    assert done.returncode == 0, done.stdout + done.stderr
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    lines = [json.dumps({"x": (x[0] / 16.0).tolist()}), json.dumps({"x": [0.5] * 10})]
    served = subprocess.run(
        [sys.executable, str(AGENT), "serve", "--store", str(workdir / "store")],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    answers = [json.loads(line) for line in served.stdout.splitlines()]
    assert len(answers) == 2, served.stdout
    with Store.open(workdir / "store") as store:
        prod = store.info("prod").name
    assert set(answers[0]) == {"label", "version"}
    assert answers[0]["version"] == prod
    assert answers[0]["label"] in range(10) and isinstance(answers[0]["label"], int)
    assert set(answers[1]) == {"error"}
    assert "(1, 10)" in answers[1]["error"] and "64" in answers[1]["error"]
    assert "Traceback" not in served.stderr
