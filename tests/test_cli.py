"""The `engram` command on real stores: every subcommand, bad input, corruption.

Most tests call `engram.cli.main([...])` in-process (fast); a few run the installed
console script or a fresh interpreter to check exit codes and what gets imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engram.cli import main
from engram.models import build_model
from engram.store import SampleIds, Store

ROOT = Path(__file__).resolve().parents[1]
ENGRAM = Path(sys.executable).with_name("engram")
SPEC = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [16]}}
N_VERSIONS = 3
SAMPLE_BYTES = 32


def make_store(path: Path) -> dict:
    """Three versions of a small EWC + replay run, committed with the real Store API.

    Returns what was committed, per version, to check the commands against.
    """
    torch.manual_seed(0)
    model = build_model(SPEC)
    committed: dict = {"models": [], "states": [], "slots": []}
    fisher: dict = {}
    slots: list[int] = []
    with Store.open(path, mode="c") as store:
        for e in range(N_VERSIONS):
            with torch.no_grad():  # "training"
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            # EWC (separate): a new importance per experience; old ones stay unchanged
            fisher[str(e)] = {
                "fisher": {k: torch.rand_like(v) for k, v in model.state_dict().items()}
            }
            # replay: 4 new samples per experience, evicting the two oldest after the first
            new = store.samples.append([bytes([e]) * SAMPLE_BYTES for _ in range(4)])
            slots = [*slots[2:], *new] if slots else new
            matrix = [
                [0.9 - 0.1 * (r - c) if c <= r else 0.0 for c in range(N_VERSIONS)]
                for r in range(e + 1)
            ]
            state = {
                "optimizer": {"state": {0: {"momentum_buffer": torch.randn(16, 8)}}},
                "plugins": {
                    "ewc": {"importances": {k: dict(v) for k, v in fisher.items()}},
                    "replay": {"slots": SampleIds.of(slots), "seen": 4 * (e + 1)},
                },
                "clock": {"train_iterations": 10 * (e + 1)},
                "metrics": {"accuracy_matrix": matrix},
            }
            store.commit(
                state,
                model=model,
                message=f"after experience {e}",
                meta={
                    "experience": e,
                    "kind": "experience",
                    "strategy": "ewc_replay",
                    "hparams": {"ewc_lambda": 5.0},
                    "model_spec": SPEC,
                    "metrics": {"average_accuracy": 0.9 - 0.05 * e, "forgetting": 0.05 * e},
                },
            )
            committed["models"].append({k: v.clone() for k, v in model.state_dict().items()})
            committed["states"].append(state)
            committed["slots"].append(list(slots))
    return committed


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "store"
    return path, make_store(path)


def run(capsys, *argv: str | os.PathLike) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str | os.PathLike) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_user_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("engram") and ": error: " in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------ ls / show


def test_ls_lists_versions_with_head_tags_metrics_and_sizes(demo, capsys) -> None:
    path, _ = demo
    assert run(capsys, "tag", path, "prod", "v0002")[0] == 0
    listing = run_json(capsys, "ls", path)
    assert [v["name"] for v in listing["versions"]] == ["v0001", "v0002", "v0003"]
    assert [v["head"] for v in listing["versions"]] == [False, False, True]
    assert listing["head"] == 3
    v2 = listing["versions"][1]
    assert (v2["parent"], v2["experience"], v2["kind"], v2["tags"]) == (
        1,
        1,
        "experience",
        ["prod"],
    )
    assert v2["average_accuracy"] == pytest.approx(0.85)
    assert v2["forgetting"] == pytest.approx(0.05)
    assert 0 < v2["new_bytes"] < v2["nbytes"]  # the unchanged Fisher of experience 0 is shared

    code, out, _ = run(capsys, "ls", path)
    lines = out.splitlines()
    assert code == 0 and "avg acc" in lines[0] and "forgetting" in lines[0]
    assert lines[3].startswith("*") and "v0003" in lines[3]
    assert "prod" in lines[2] and "0.850" in lines[2]


def test_show_summarises_meta_model_state_and_accuracy_matrix(demo, capsys) -> None:
    path, committed = demo
    shown = run_json(capsys, "show", path, "HEAD~1")
    assert shown["name"] == "v0002" and shown["message"] == "after experience 1"
    assert shown["model_spec"] == SPEC
    assert shown["hparams"] == {"ewc_lambda": 5.0}
    assert shown["checkpoint"]["file"] == "model-v0002-exp1.safetensors"
    state = {s["path"]: s for s in shown["state"]}
    fisher = state["/plugins/ewc/importances/1/fisher/body.1.weight"]
    assert (fisher["dtype"], fisher["shape"], fisher["nbytes"]) == ("float32", [16, 8], 16 * 8 * 4)
    assert state["/plugins/replay/slots"]["kind"] == "samples"
    assert state["/optimizer/state/0/momentum_buffer"]["shape"] == [16, 8]
    kinds = {c["name"]: c["kind"] for c in shown["components"]}
    assert kinds == {
        "optimizer": "optimizer",
        "plugins/ewc": "strategy",
        "plugins/replay": "replay",
    }
    assert (
        shown["metrics"]["accuracy_matrix"] == committed["states"][1]["metrics"]["accuracy_matrix"]
    )
    assert shown["metrics"]["summary"]["average_accuracy"] == pytest.approx(0.85)

    code, out, _ = run(capsys, "show", path)
    assert code == 0
    assert "v0003  (HEAD)" in out and '"name": "mlp"' in out and "accuracy matrix" in out
    assert "/plugins/ewc/importances/2/fisher/body.1.weight" in out and "16x8" in out


def test_show_reads_an_accuracy_matrix_stored_as_a_tensor(tmp_path, capsys) -> None:
    path = tmp_path / "store"
    with Store.open(path, mode="c") as store:
        store.commit(
            {"metrics": {"accuracy_matrix": torch.tensor([[0.5, 0.25]])}, "w": torch.ones(3)}
        )
    shown = run_json(capsys, "show", path)
    assert shown["metrics"]["accuracy_matrix"] == [[0.5, 0.25]]
    assert shown["checkpoint"] is None and shown["model_spec"] is None
    assert [c["kind"] for c in shown["components"]] == ["other", "state"]


def test_json_output_stays_valid_json_with_nan_metrics(tmp_path, capsys) -> None:
    path = tmp_path / "store"
    with Store.open(path, mode="c") as store:
        store.commit({"x": torch.tensor([float("inf")])}, meta={"metrics": {"fwt": float("nan")}})
        store.commit({"x": torch.tensor([1.0])}, meta={"metrics": {"fwt": float("nan")}})
    code, out, _ = run(capsys, "show", path, "--json")
    assert code == 0 and json.loads(out)["metrics"]["summary"] == {"fwt": None}
    code, out, _ = run(capsys, "diff", path, "v0001", "v0002", "--json")
    assert code == 0 and json.loads(out)["tensors"]["changed"][0]["l2"] is None


# ------------------------------------------------------------------ verify


def test_verify_reports_ok_then_a_corrupted_pack_with_exit_code_1(demo, capsys) -> None:
    path, _ = demo
    report = run_json(capsys, "verify", path, "--all")
    assert (
        report["ok"] and report["versions"] == ["v0001", "v0002", "v0003"] and report["blobs"] > 0
    )
    pack = sorted((path / "blobs").iterdir())[-1]  # written by v0003 only
    flip_byte(pack, 0)  # the first blob's first byte

    assert run(capsys, "verify", path, "v0001")[0] == 0  # v0001 does not use that pack
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and err == ""
    assert "1 problem" in out and "v0003 /optimizer/state/0/momentum_buffer" in out
    code, out, _ = run(capsys, "verify", path, "--all", "--json")
    assert code == 1
    problems = json.loads(out)["problems"]
    assert problems and all(p["version"] in ("v0003", None) for p in problems)
    # commands that need the damaged bytes fail in one line; those that do not still work
    assert_user_error(*run(capsys, "diff", path, "v0002", "v0003"), "v0003", "corrupted")
    assert run(capsys, "ls", path)[0] == 0
    assert run(capsys, "show", path)[0] == 0


def test_a_corrupted_checkpoint_fails_verify_and_export(demo, capsys, tmp_path) -> None:
    path, _ = demo
    ckpt = path / "checkpoints" / "model-v0003-exp2.safetensors"
    flip_byte(ckpt, ckpt.stat().st_size - 5)
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and "model-v0003-exp2.safetensors" in out
    out_file = tmp_path / "model.safetensors"
    out_file.write_bytes(b"an earlier export")
    export = ("export", path, "--out", out_file, "--force")
    assert_user_error(*run(capsys, *export), "model-v0003", "hash")
    assert out_file.read_bytes() == b"an earlier export"  # nothing lost on failure
    assert run(capsys, *export[:2], "v0002", *export[2:])[0] == 0


# ------------------------------------------------------------------ refs


def test_rollback_moves_head_and_keeps_later_versions(demo, capsys) -> None:
    path, _ = demo
    assert run_json(capsys, "rollback", path, "v0001") == {"head": 1, "previous": 3}
    listing = run_json(capsys, "ls", path)
    assert listing["head"] == 1 and len(listing["versions"]) == 3
    code, out, _ = run(capsys, "rollback", path, "v0003")
    assert code == 0 and "HEAD -> v0003 (was v0001)" in out


def test_tag_create_move_delete(demo, capsys) -> None:
    path, _ = demo
    assert run(capsys, "tag", path, "prod")[1] == "tag prod -> v0003\n"
    code, out, _ = run(capsys, "tag", path, "prod", "1")
    assert code == 0 and "moved from v0003" in out
    with Store.open(path) as store:
        assert store.tags() == {"prod": 1}
    assert run(capsys, "show", path, "prod", "--json")[0] == 0
    assert run_json(capsys, "tag", path, "prod", "--delete") == {
        "tag": "prod",
        "version": None,
        "previous": 1,
    }
    with Store.open(path) as store:
        assert store.tags() == {}
    assert_user_error(*run(capsys, "tag", path, "prod", "--delete"), "no tag 'prod'")
    assert_user_error(*run(capsys, "tag", path, "v0001"), "invalid tag name")
    assert_user_error(*run(capsys, "tag", path, "x", "v0009"), "v0009")


# ------------------------------------------------------------------ diff


def test_diff_reports_tensor_norms_added_keys_model_and_replay_samples(demo, capsys) -> None:
    path, committed = demo
    d = run_json(capsys, "diff", path, "v0001", "v0002")
    changed = {c["path"]: c for c in d["tensors"]["changed"]}
    a, b = committed["models"][0], committed["models"][1]
    for key in a:  # every weight moved
        expected = torch.linalg.vector_norm(b[key].double() - a[key].double()).item()
        assert changed[f"model/{key}"]["l2"] == pytest.approx(expected, rel=1e-9)
        assert changed[f"model/{key}"]["relative"] == pytest.approx(
            expected / torch.linalg.vector_norm(a[key].double()).item(), rel=1e-9
        )
    assert "/optimizer/state/0/momentum_buffer" in changed
    assert not any(p.startswith("/plugins/ewc/importances/0/") for p in changed)  # unchanged
    added = {x["path"] for x in d["tensors"]["added"]}
    assert added == {f"/plugins/ewc/importances/1/fisher/{k}" for k in a}
    assert d["tensors"]["removed"] == []
    (replay,) = d["replay"]
    slots_a, slots_b = committed["slots"][0], committed["slots"][1]
    assert replay["path"] == "/plugins/replay/slots"
    assert replay["entered"] == sorted(set(slots_b) - set(slots_a)) and len(replay["entered"]) == 4
    assert replay["left"] == sorted(set(slots_a) - set(slots_b)) and len(replay["left"]) == 2
    assert replay["kept"] == 2
    values = {v["path"]: (v["a"], v["b"]) for v in d["values"]}
    assert values["/plugins/replay/seen"] == (4, 8)
    assert values["/clock/train_iterations"] == (10, 20)

    backwards = run_json(capsys, "diff", path, "v0002", "v0001")
    assert {x["path"] for x in backwards["tensors"]["removed"]} == added
    same = run_json(capsys, "diff", path, "HEAD", "v0003")
    assert same["tensors"]["changed"] == [] and same["values"] == []
    code, out, _ = run(capsys, "diff", path, "v0001", "v0002")
    assert code == 0 and "4 samples entered, 2 left, 2 kept" in out and "model/body.1.weight" in out


# ------------------------------------------------------------------ gc / du


def test_gc_never_deletes_head_or_a_tagged_version(demo, capsys) -> None:
    path, committed = demo
    assert run(capsys, "tag", path, "prod", "v0001")[0] == 0
    report = run_json(capsys, "gc", path, "--keep-last", "0")
    assert report["dropped"] == ["v0002"]
    assert report["kept"] == ["v0001", "v0003"] and report["tags"] == {"prod": "v0001"}
    assert "checkpoints/model-v0002-exp1.safetensors" in report["files"]
    assert report["freed_bytes"] > 0
    assert run(capsys, "verify", path, "--all")[0] == 0
    with Store.open(path) as store:
        snap = store.load("prod")
        assert all(torch.equal(snap.model[k], v) for k, v in committed["models"][0].items())
        assert snap.state["plugins"]["replay"]["slots"].tolist() == committed["slots"][0]
    assert_user_error(*run(capsys, "show", path, "v0002"), "v0002")
    assert_user_error(*run(capsys, "gc", path, "--keep-last", "-1"), "--keep-last")


def test_du_splits_bytes_by_component_and_measures_the_disk(demo, capsys) -> None:
    path, committed = demo
    du = run_json(capsys, "du", path)
    parts = {c["name"]: c for c in du["components"]}
    assert set(parts) == {
        "model",
        "optimizer",
        "plugins/ewc",
        "plugins/replay",
        "plugins/replay#samples",
        "metadata",
    }
    with Store.open(path) as store:
        versions = store.versions()
        checkpoints = [store.manifest(v.id)["checkpoint"]["nbytes"] for v in versions]
    assert parts["model"]["logical"] == parts["model"]["unique"] == sum(checkpoints)
    ewc = parts["plugins/ewc"]
    fisher_bytes = 4 * (8 * 16 + 16 + 3 * 16 + 3)
    assert ewc["logical"] == fisher_bytes * (1 + 2 + 3) and ewc["unique"] == fisher_bytes * 3
    samples = parts["plugins/replay#samples"]
    slots = committed["slots"]  # samples referenced by several versions are stored once
    assert samples["logical"] == sum(map(len, slots)) * SAMPLE_BYTES
    assert samples["unique"] == len(set().union(*slots)) * SAMPLE_BYTES < samples["logical"]
    assert du["logical_bytes"] == sum(c["logical"] for c in du["components"])
    assert (
        du["logical_bytes"]
        == sum(v.nbytes for v in versions) + samples["logical"] + parts["metadata"]["logical"]
    )
    walked = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert du["disk"]["total"] <= walked and du["disk"]["checkpoints"] == sum(checkpoints)
    assert du["dedup_ratio"] == pytest.approx(du["logical_bytes"] / du["disk"]["total"])
    code, out, _ = run(capsys, "du", path)
    assert code == 0 and "deduplication" in out and "strategy state 'ewc'" in out


def test_commands_read_a_compacted_history(demo, capsys, tmp_path) -> None:
    path, committed = demo
    before = run_json(capsys, "diff", path, "v0001", "v0002")
    report = run_json(capsys, "compact", path)  # v0001, v0002: weights delta-coded into blobs
    assert report["versions"] == ["v0001", "v0002"] and report["files"]
    assert run_json(capsys, "compact", path)["versions"] == []  # nothing new to compact
    assert run_json(capsys, "diff", path, "v0001", "v0002") == before
    shown = run_json(capsys, "show", path, "v0001")
    assert shown["compacted"] and shown["checkpoint"] is None
    assert shown["compacted_model"]["tensors"] == len(committed["models"][0])
    assert run(capsys, "show", path, "v0001")[1].count("compacted: 4 tensors") == 1
    du = run_json(capsys, "du", path)
    model = next(c for c in du["components"] if c["name"] == "model")
    weight_bytes = sum(t.numel() * 4 for t in committed["models"][0].values())
    assert model["logical"] >= 2 * weight_bytes  # the two compacted versions' weights
    assert run(capsys, "verify", path, "--all")[0] == 0
    out = tmp_path / "v1.safetensors"
    assert run(capsys, "export", path, "v0001", "--out", out)[0] == 0
    with safe_open(out, "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in committed["models"][0].items())


# ------------------------------------------------------------------ export


def test_export_safetensors_is_self_contained(demo, capsys, tmp_path) -> None:
    path, committed = demo
    out = tmp_path / "model.safetensors"
    assert run_json(capsys, "export", path, "HEAD~1", "--out", out)["version"] == "v0002"
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["format"] == "engram-export" and meta["version"] == "v0002"
    assert json.loads(meta["experience"]) == 1
    assert json.loads(meta["metrics"])["average_accuracy"] == pytest.approx(0.85)
    with Store.open(path) as store:
        assert meta["store_id"] == store.store_id
    model = build_model(json.loads(meta["model_spec"]))  # all a deployment needs
    model.load_state_dict(weights)
    reference = build_model(SPEC)
    reference.load_state_dict(committed["models"][1])
    x = torch.randn(5, 8)
    assert torch.equal(model(x), reference(x))


def test_export_onnx_runs_like_the_stored_model(demo, capsys, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    path, committed = demo
    out = tmp_path / "model.onnx"
    code, text, err = run(capsys, "export", path, "--out", out)
    assert code == 0, err
    assert "as onnx" in text
    proto = onnx.load(out)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["version"] == "v0003" and json.loads(props["model_spec"]) == SPEC
    reference = build_model(SPEC).eval()
    reference.load_state_dict(committed["models"][2])
    x = torch.randn(7, 8)  # another batch size than the traced example
    (logits,) = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(logits, reference(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_onnx_needs_an_input_shape(tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path / "store"
    spec = {"name": "torchvision.squeezenet1_1", "args": {"num_classes": 3}}
    with Store.open(path, mode="c") as store:
        store.commit(model=build_model(spec), meta={"model_spec": spec})
    assert_user_error(*run(capsys, "export", path, "--out", tmp_path / "m.onnx"), "input_shape")
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_without_onnx_installed_says_what_to_install(demo, tmp_path) -> None:
    path, _ = demo
    code = textwrap.dedent(f"""
        import sys
        sys.modules["onnx"] = sys.modules["onnxscript"] = None  # as if not installed
        from engram.cli import main
        out = {str(tmp_path / "m.onnx")!r}
        sys.exit(main(["export", {str(path)!r}, "--format", "onnx", "--out", out]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pip install 'engram-cl[onnx]'" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ bad input


def test_bad_input_gives_one_line_and_exit_code_2(demo, capsys, tmp_path) -> None:
    path, _ = demo
    assert_user_error(*run(capsys, "show", path, "v0042"), "v0042")
    assert_user_error(*run(capsys, "show", path, "nosuchtag"), "nosuchtag", "engram ls")
    assert_user_error(*run(capsys, "show", path, "HEAD~5"), "no parent")
    assert_user_error(*run(capsys, "ls", tmp_path / "missing"), "no store at")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    assert_user_error(*run(capsys, "ls", tmp_path / "foreign"), "not an engram store")
    assert_user_error(*run(capsys, "verify", tmp_path / "foreign" / "notes.txt"), "is a file")
    assert_user_error(*run(capsys, "show"), "STORE")  # missing argument
    assert_user_error(*run(capsys, "diff", path, "v0001"), "B")
    assert_user_error(*run(capsys, "frobnicate", path), "invalid choice")
    assert_user_error(
        *run(capsys, "export", path, "--out", tmp_path / "no" / "m.safetensors"), "does not exist"
    )
    empty = tmp_path / "empty"
    Store.open(empty, mode="c").close()
    assert_user_error(*run(capsys, "show", empty), "no versions")
    assert run(capsys, "ls", empty)[1] == f"{empty}: no versions yet\n"


def test_a_corrupted_lmdb_is_a_one_line_error(demo, capsys) -> None:
    path, _ = demo
    data = path / "memory.lmdb" / "data.mdb"
    data.write_bytes(b"\0" * 4096 + data.read_bytes()[4096:8192])  # meta pages destroyed
    code, out, err = run(capsys, "ls", path)
    assert_user_error(code, out, err, str(path))


def test_write_commands_wait_for_no_one_while_a_trainer_holds_the_lock(
    demo, capsys, hold_writer_lock
) -> None:
    path, _ = demo
    holder = hold_writer_lock(path)
    assert_user_error(*run(capsys, "tag", path, "prod"), "locked by pid", str(holder.pid))
    assert_user_error(*run(capsys, "gc", path), "locked")
    assert run_json(capsys, "ls", path)["head"] == 3  # readers need no lock
    assert run(capsys, "verify", path)[0] == 0
    holder.stdin.close()  # the trainer ends
    holder.wait()
    assert run(capsys, "tag", path, "prod")[0] == 0


# ------------------------------------------------------------------ the real script


def test_console_script_exit_codes_and_light_imports(demo) -> None:
    path, _ = demo
    help_ = subprocess.run([ENGRAM, "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "diff" in help_.stdout and "export" in help_.stdout
    bad = subprocess.run([ENGRAM, "show", path, "v0099"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "v0099" in bad.stderr
    ls = subprocess.run([ENGRAM, "ls", path, "--json"], capture_output=True, text=True)
    assert ls.returncode == 0 and json.loads(ls.stdout)["head"] == 3
    # --help imports no torch; the reading commands, diff too, neither torch nor Avalanche
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from engram.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            main(["--help"])
            assert "torch" not in sys.modules, "--help imported torch"
            for argv in (["ls"], ["show"], ["verify", "--all"], ["diff", "v0001", "v0002"], ["du"]):
                assert main([argv[0], {str(path)!r}, *argv[1:]]) == 0, argv
        print(sorted(m for m in ("torch", "avalanche") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
