"""engram.ModelHandle: loads on first use, follows its ref, swaps model and version
together, keeps serving through failed loads, and sees another process's commits."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import engram
from engram.errors import CorruptionError, EngramError, VersionNotFoundError
from engram.inference import load_model
from engram.models import build_model
from engram.store import Store, VersionInfo

pytestmark = pytest.mark.timeout(60)

SPEC = {"name": "mlp", "args": {"input_shape": [4], "n_classes": 3, "hidden": [8]}}


def commit(store: Store, seed: int) -> VersionInfo:
    """A version whose weights differ for each seed."""
    torch.manual_seed(seed)
    return store.commit(model=build_model(SPEC), meta={"model_spec": SPEC})


def stored_weights(store: Store, version: int) -> dict[str, torch.Tensor]:
    return store.load(version, state=False).model


def same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    mine = model.state_dict()
    return mine.keys() == weights.keys() and all(torch.equal(mine[k], weights[k]) for k in mine)


class Recorder:
    """A ``load=`` that records what it was asked for, then calls load_model."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def __call__(self, store: Store, version: Any, device: Any) -> torch.nn.Module:
        self.calls.append((version, device))
        return load_model(store, version, device=device)


def test_first_load_serves_the_tagged_version_until_the_tag_moves(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store.open(path, mode="c") as store:
        first = commit(store, 1)
        commit(store, 2)  # HEAD: the handle follows the tag, not HEAD
        store.tag("prod", first.id)
        expected = stored_weights(store, first.id)
    assert engram.ModelHandle is engram.handle.ModelHandle and "ModelHandle" in engram.__all__
    with engram.ModelHandle(path, "prod", check_every=0) as handle:
        assert handle.store.mode == "r" and handle.version is None  # nothing loaded yet
        model = handle.model
        assert handle.version.id == first.id and not model.training
        assert same_weights(model, expected)
        assert handle.get() == (model, handle.version) and handle.get()[0] is model
        assert handle.refresh() is False and handle.model is model  # the tag did not move
    with pytest.raises(EngramError, match="closed"):
        handle.get()


@pytest.mark.parametrize("ref", ["prod", "HEAD"])
def test_a_moved_ref_is_loaded_by_id_and_served_with_its_version(tmp_path: Path, ref: str) -> None:
    with Store.open(tmp_path / "store", mode="c") as store:
        first = commit(store, 1)
        store.tag("prod", first.id)
        loads = Recorder()
        handle = engram.ModelHandle(store, ref, check_every=0, load=loads)  # a Store: used as is
        old, version = handle.get()
        assert version.id == first.id and same_weights(old, stored_weights(store, first.id))
        second = commit(store, 2)
        store.tag("prod", second.id)
        model, version = handle.get()
        assert version.id == second.id and handle.version is version
        assert same_weights(model, stored_weights(store, second.id))
        assert same_weights(old, stored_weights(store, first.id))  # a served model stays valid
        assert loads.calls == [(first.id, "cpu"), (second.id, "cpu")]  # ids, never the ref
        handle.close()
        assert store.head.id == second.id  # a given store is left open


def test_no_check_before_check_every_has_passed(tmp_path: Path) -> None:
    now = [100.0]
    with Store.open(tmp_path / "store", mode="c") as store:
        first = commit(store, 1)
        store.tag("prod", first.id)
        handle = engram.ModelHandle(store, "prod", check_every=5, clock=lambda: now[0])
        model = handle.model
        second = commit(store, 2)
        store.tag("prod", second.id)
        now[0] = 104.9
        assert handle.model is model and handle.version.id == first.id
        now[0] = 105.0
        assert handle.version.id == first.id  # .version never checks
        assert handle.get()[1].id == second.id
        store.tag("prod", first.id)
        now[0] = 106.0
        assert handle.get()[1].id == second.id
        assert handle.refresh() is True and handle.version.id == first.id  # forced now


class Lines:
    """A child's stdout read by a thread, so that each wait for a line has a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [self.lines.put(s) for s in proc.stdout], daemon=True
        ).start()

    def next(self, timeout: float = 60.0) -> str:
        try:
            return self.lines.get(timeout=timeout).strip()
        except queue.Empty:
            pytest.fail(f"the writer process printed nothing for {timeout:.0f}s")


def test_threads_see_consistent_pairs_while_another_process_moves_the_tag(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    with Store.open(path, mode="c") as store:
        ids = commit(store, 1).id, commit(store, 2).id
        store.tag("prod", ids[0])
        expected = {v: stored_weights(store, v) for v in ids}
    # The writer is another process: LMDB allows one handle on a store per process.
    mover = textwrap.dedent(f"""
        import sys
        from engram.store import Store
        with Store.open({str(path)!r}, mode="w") as store:
            print("ready", flush=True)
            for line in sys.stdin:
                store.tag("prod", int(line))
                print("moved", flush=True)
    """)
    active, most_active, guard = [0], [0], threading.Lock()

    def counting_load(store: Store, version: int, device: Any) -> torch.nn.Module:
        with guard:
            active[0] += 1
            most_active[0] = max(most_active[0], active[0])
        try:
            return load_model(store, version, device=device)
        finally:
            with guard:
                active[0] -= 1

    stop, errors, calls = threading.Event(), [], [0] * 8
    awaited, seen = [ids[0]], threading.Event()

    with engram.ModelHandle(path, "prod", check_every=0, load=counting_load) as handle:

        def reader(i: int) -> None:
            try:
                while not stop.is_set():
                    model, version = handle.get()
                    if not same_weights(model, expected[version.id]):
                        errors.append(f"{version.name} served with other weights")
                    if version.id == awaited[0]:
                        seen.set()
                    calls[i] += 1
            except Exception as e:  # reported by the main thread
                errors.append(repr(e))

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        proc = subprocess.Popen(
            [sys.executable, "-c", mover], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            lines = Lines(proc)
            assert lines.next() == "ready"
            for target in [ids[1], ids[0]] * 3:
                seen.clear()
                awaited[0] = target
                proc.stdin.write(f"{target}\n")
                proc.stdin.flush()
                assert lines.next() == "moved"
                assert seen.wait(30), f"no reader was served v{target:04d} within 30 s"
        finally:
            stop.set()
            proc.stdin.close()
            proc.wait(timeout=30)
            for t in threads:
                t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and all(calls)
    assert most_active[0] == 1  # never two loads at once


def test_a_version_that_fails_to_load_leaves_the_old_model_serving(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store", mode="c") as store:
        first = commit(store, 1)
        store.tag("prod", first.id)
        loads = Recorder()
        handle = engram.ModelHandle(store, "prod", check_every=0, load=loads)
        model = handle.model
        broken = commit(store, 2)
        store.tag("prod", broken.id)
        store.checkpoint_path(broken.id).unlink()  # published, then its file is lost
        with pytest.warns(UserWarning, match=r"loading v0002 failed \(CorruptionError.*v0001"):
            assert handle.get() == (model, handle.version) and handle.version.id == first.id
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, not one per retry
            assert handle.model is model
        assert loads.calls.count((broken.id, "cpu")) == 2  # retried at the next check
        fixed = commit(store, 3)
        store.tag("prod", fixed.id)
        assert handle.get()[1].id == fixed.id
        assert same_weights(handle.model, stored_weights(store, fixed.id))
        # with nothing cached there is nothing to serve: the error is raised
        with pytest.raises(CorruptionError, match="v0002"):
            engram.ModelHandle(store, "v0002").get()


def test_a_removed_tag_leaves_the_cached_model_serving(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store", mode="c") as store:
        first = commit(store, 1)
        store.tag("prod", first.id)
        handle = engram.ModelHandle(store, "prod", check_every=0)
        model = handle.model
        store.untag("prod")
        with pytest.warns(UserWarning, match=r"no tag 'prod'.*still serving v0001"):
            assert handle.model is model
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert handle.get()[1].id == first.id
        second = commit(store, 2)
        store.tag("prod", second.id)
        assert handle.get()[1].id == second.id
        with pytest.raises(VersionNotFoundError, match="nosuch"):
            engram.ModelHandle(store, "nosuch").get()
    with pytest.raises(ValueError, match="check_every"):
        engram.ModelHandle(tmp_path / "store", check_every=-1)


def test_a_version_committed_by_another_process_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store.open(path, mode="c") as store:
        store.tag("prod", commit(store, 1).id)
    writer = textwrap.dedent(f"""
        import torch
        from engram.models import build_model
        from engram.store import Store
        spec = {SPEC!r}
        with Store.open({str(path)!r}, mode="w") as store:
            torch.manual_seed(7)
            store.tag("prod", store.commit(model=build_model(spec), meta={{"model_spec": spec}}).id)
    """)
    with engram.ModelHandle(path, "prod", check_every=0) as handle:  # open read-only throughout
        assert handle.version is None and handle.get()[1].id == 1
        subprocess.run([sys.executable, "-c", writer], check=True, timeout=120)
        model, version = handle.get()
        assert version.id == 2
    with Store.open(path) as store:
        assert same_weights(model, stored_weights(store, 2))
