"""engram.load_model: rebuilt models predict like the trained ones; specs go through the
allowlist only; loading works while a trainer holds the store; the serve example reloads."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import engram
from engram.cli import main as cli
from engram.errors import ArchitectureMismatchError, EngramError, VersionNotFoundError
from engram.models import build_model
from engram.store import Store

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import serve  # noqa: E402

MLP = {"name": "mlp", "args": {"input_shape": [64], "n_classes": 10, "hidden": [32]}}
CNN = {
    "name": "cnn",
    "args": {"input_shape": [1, 8, 8], "n_classes": 10, "channels": [4, 8], "hidden": [16]},
}


def trained(spec: dict, seed: int) -> torch.nn.Module:
    """A model whose weights are not the builder's initial ones."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def commit_models(path: Path, spec: dict, n: int = 2) -> list[torch.nn.Module]:
    models = [trained(spec, seed) for seed in range(n)]
    with Store.open(path, mode="c") as store:
        for e, model in enumerate(models):
            store.commit({"step": e}, model=model, meta={"experience": e, "model_spec": spec})
    return models


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["mlp", "cnn"])
def test_rebuilt_model_predicts_like_the_trained_one(tmp_path: Path, spec: dict) -> None:
    path = tmp_path / "store"
    first, second = commit_models(path, spec)
    with Store.open(path, mode="w") as store:
        store.tag("prod", 1)
    x = torch.rand(16, 64)
    for version, model in (
        ("HEAD", second),
        ("prod", first),
        ("v0001", first),
        (2, second),
        ("HEAD~1", first),
    ):
        loaded = engram.load_model(path, version)
        assert not loaded.training
        assert torch.equal(loaded(x), model(x)), version
    with Store.open(path) as store:  # an open store is used as it is
        assert torch.equal(engram.load_model(store)(x), second(x))
    with Store.open(path, mode="w") as store:
        store.compact(tagged=True)  # v0001's weights now live delta-coded in the blobs
        assert store.info(1).compacted and store.checkpoint_path(1) is None
    assert torch.equal(engram.load_model(path, "prod")(x), first(x))
    with pytest.raises(VersionNotFoundError, match="nosuch"):
        engram.load_model(path, "nosuch")


def test_multihead_model_gets_its_heads_back(tmp_path: Path) -> None:
    from avalanche.models.utils import avalanche_model_adaptation

    from engram.streams.digits import split_digits

    spec = {
        "name": "mlp",
        "args": {"input_shape": [64], "n_classes": 2, "hidden": [16], "multihead": True},
    }
    torch.manual_seed(0)
    model = build_model(spec)
    for experience in split_digits(5, task_labels=True).train_stream[:3]:
        avalanche_model_adaptation(model, experience)  # one head per task, as training does
    heads = {k.split(".")[2] for k in model.state_dict() if k.startswith("classifier.classifiers.")}
    assert heads == {"0", "1", "2"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    with Store.open(tmp_path / "store", mode="c") as store:
        store.commit(model=model, meta={"model_spec": spec})
    loaded = engram.load_model(tmp_path / "store")
    assert set(loaded.state_dict()) == set(model.state_dict())
    x = torch.rand(8, 64)
    model.eval()
    for task in range(3):
        assert torch.equal(loaded(x, task), model(x, task))


def test_a_spec_outside_the_allowlist_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with Store.open(tmp_path / "store", mode="c") as store:
        weights = {"w": torch.ones(2)}
        for name in ("os.system", "builtins.eval", "subprocess.run", "avalanche.os"):
            spec = {"name": name, "args": {"command": f"touch {marker}"}}
            store.commit(model=weights, meta={"model_spec": spec})
    for version in (1, 2, 3, 4):
        with pytest.raises(EngramError, match="not an allowed builder"):
            engram.load_model(tmp_path / "store", version)
    assert not marker.exists()


def test_clear_errors_for_a_version_that_cannot_be_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "store"
    small = {"name": "mlp", "args": {"input_shape": [64], "n_classes": 10, "hidden": [8]}}
    with Store.open(path, mode="c") as store:
        store.commit({"x": torch.ones(1)}, model=trained(MLP, 0))  # no spec
        store.commit({"x": torch.ones(1)}, meta={"model_spec": MLP})  # no checkpoint
        store.commit(model=trained(MLP, 0), meta={"model_spec": small})  # wrong spec
    with pytest.raises(EngramError, match=r"v0001 records no model spec"):
        engram.load_model(path, 1)
    with pytest.raises(EngramError, match=r"v0002 has no model weights"):
        engram.load_model(path, 2)
    with pytest.raises(ArchitectureMismatchError, match="does not fit the stored weights"):
        engram.load_model(path, 3)


def test_loads_while_a_trainer_holds_the_writer_lock(tmp_path: Path, hold_writer_lock) -> None:
    path = tmp_path / "store"
    (model,) = commit_models(path, MLP, n=1)
    hold_writer_lock(path)
    x = torch.rand(4, 64)
    assert torch.equal(engram.load_model(path)(x), model(x))


def test_load_model_is_lazy_and_imports_no_avalanche_for_a_plain_model(tmp_path: Path) -> None:
    path = tmp_path / "store"
    commit_models(path, MLP, n=1)
    code = textwrap.dedent(f"""
        import sys, engram
        assert "torch" not in sys.modules
        model = engram.load_model({str(path)!r})
        print(type(model).__name__, "avalanche" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["MLP", "False"]


# ------------------------------------------------------------------ the serve example


def test_server_reloads_when_the_tag_moves(tmp_path: Path) -> None:
    path = tmp_path / "store"
    first, second = commit_models(path, MLP)
    with Store.open(path, mode="w") as store:
        store.tag("prod", 1)
    server = serve.Server(str(path), "prod")
    x = torch.rand(32, 64)
    assert server.version == 1 and torch.equal(server.predict(x), first(x).argmax(1))
    assert server.reload() is False  # the tag did not move: nothing is loaded
    assert cli(["tag", str(path), "prod", "v0002"]) == 0
    assert server.version == 1  # only when asked
    server.request_reload()
    assert torch.equal(server.predict(x), second(x).argmax(1)) and server.version == 2
    # a promoted version that cannot load keeps the current one serving
    with Store.open(path, mode="w") as store:
        store.commit(model={"w": torch.ones(1)}, meta={"model_spec": MLP})
        store.tag("prod", 3)
    server.request_reload()
    assert torch.equal(server.predict(x), second(x).argmax(1)) and server.version == 2


class Lines:
    """A child's stdout read by a thread, so that each read has a deadline: a server that
    hangs (say, a reload that never returns) fails the test instead of hanging the suite."""

    def __init__(self, proc: subprocess.Popen, stderr: Path) -> None:
        self.proc, self.stderr = proc, stderr
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output

    def next(self, waiting_for: str, timeout: float = 60.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"serve.py printed nothing for {timeout:.0f}s while waiting for "
                        f"{waiting_for}; stderr:\n{self.stderr.read_text()[-3000:]}")  # fmt: skip
        if line is None:
            pytest.fail(f"serve.py exited (rc {self.proc.wait()}) while waiting for "
                        f"{waiting_for}; stderr:\n{self.stderr.read_text()[-3000:]}")  # fmt: skip
        return line


def test_serve_script_reloads_on_sighup(tmp_path: Path) -> None:
    path = tmp_path / "store"
    commit_models(path, MLP)
    with Store.open(path, mode="w") as store:
        store.tag("prod", 1)
    stderr = tmp_path / "serve.err"
    with stderr.open("w") as err:  # a file, not a pipe: a full pipe would block the server
        serve_py = str(ROOT / "experiments" / "serve.py")
        proc = subprocess.Popen(
            [sys.executable, serve_py, str(path), "--interval", "0.05"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        out = Lines(proc, stderr)
        assert out.next("the start line") == "serving prod = v0001\n"
        assert out.next("the first batch").startswith("v0001 batch 0 accuracy ")
        with Store.open(path, mode="w") as store:
            store.tag("prod", 2)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not (line := out.next("the reload")).startswith("reloaded"):
            # batches go on; the reload happens before the next one
            assert time.monotonic() < deadline, "no reload within 60s of SIGHUP"
        assert line == "reloaded prod = v0002\n"
        assert out.next("a batch after the reload").startswith("v0002 batch ")
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ a real training run


def test_a_real_engram_train_run_through_the_cli_and_load_model(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run"
    grouped = (ROOT / "src" / "engram" / "configs" / "store").is_dir()  # store.path= since f05c45f
    store_arg = f"store.path={path}" if grouped else f"store={path}"
    proc = subprocess.run(
        [
            Path(sys.executable).with_name("engram-train"),
            "strategy=ewc_replay",
            store_arg,
            "training.epochs=1",
            "run.max_experiences=2",
            "run.quiet=true",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def cli_json(*argv: str) -> dict:
        assert cli([*argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    versions = cli_json("ls", str(path))["versions"]
    assert [v["experience"] for v in versions] == [0, 1]
    assert all(v["average_accuracy"] is not None for v in versions)
    shown = cli_json("show", str(path))
    assert len(shown["metrics"]["accuracy_matrix"]) == 2
    assert {c["kind"] for c in shown["components"]} >= {"optimizer", "strategy", "replay"}
    d = cli_json("diff", str(path), "HEAD~1", "HEAD")
    assert any(c["path"].startswith("model/") for c in d["tensors"]["changed"])
    assert any("/plugins/ewc/" in a["path"] for a in d["tensors"]["added"])
    assert d["replay"] and d["replay"][0]["entered"]
    assert cli_json("verify", str(path), "--all")["ok"]
    assert cli_json("du", str(path))["dedup_ratio"] > 1

    with Store.open(path) as store:
        head = store.head
        weights = store.load(state=False).model
    model = engram.load_model(path)
    reference = build_model(head.meta["model_spec"]).eval()
    reference.load_state_dict(weights)
    x = torch.rand(8, 64)
    assert torch.equal(model(x), reference(x))
