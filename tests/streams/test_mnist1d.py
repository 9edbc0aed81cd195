"""MNIST-1D streams: generated offline by ``mnist1d.data.make_dataset``, deterministic."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.store import Store
from engram.streams import MNIST1D, NAMES, build_benchmark
from engram.streams import mnist1d as m1d
from engram.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for test_train
from test_train import config  # the Hydra compose helper of tests/test_train.py


def inputs(experience, n: int = 8) -> torch.Tensor:
    return torch.stack([experience.dataset[i][0] for i in range(n)])


def labels(experience) -> set[int]:
    return {int(y) for y in experience.dataset.targets}


def test_names_are_registered() -> None:
    assert set(MNIST1D) == {"split_mnist1d", "permuted_mnist1d"} and set(MNIST1D) <= set(NAMES)


def test_generated_tensors_shapes_dtypes_and_classes() -> None:
    x, y, x_test, y_test = m1d.mnist1d_tensors(0)
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40)
    assert x.dtype == x_test.dtype == torch.float32 and y.dtype == y_test.dtype == torch.int64
    assert set(y.tolist()) == set(y_test.tolist()) == set(range(10))
    assert torch.isfinite(x).all() and abs(float(x.mean())) < 0.1  # standardised


def test_generation_is_deterministic_for_a_seed_and_leaves_global_rngs_alone() -> None:
    py, np_state = random.getstate(), np.random.get_state()
    a = m1d.mnist1d_tensors(3, num_samples=500)
    b = m1d.mnist1d_tensors(3, num_samples=500)
    other = m1d.mnist1d_tensors(4, num_samples=500)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], other[0])
    assert random.getstate() == py  # make_dataset reseeds them; they are put back
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


def test_split_mnist1d_experiences_hold_disjoint_class_pairs() -> None:
    b = build_benchmark({"name": "split_mnist1d", "n_experiences": 5, "seed": 0})
    assert b.input_shape == (40,) and b.n_classes == 10 and not b.task_labels
    train_exps, test_exps = list(b.train_stream), list(b.test_stream)
    assert len(train_exps) == len(test_exps) == 5
    seen: set[int] = set()
    for i, (tr, te) in enumerate(zip(train_exps, test_exps, strict=True)):
        pair = {2 * i, 2 * i + 1}
        assert set(tr.classes_in_this_experience) == pair == labels(tr) == labels(te)
        assert not seen & pair
        seen |= pair
        x = inputs(tr)
        assert x.shape == (8, 40) and x.dtype == torch.float32
    assert seen == set(range(10))
    assert sum(len(e.dataset) for e in train_exps) == 4000


def test_split_mnist1d_with_task_labels() -> None:
    b = build_benchmark({"name": "split_mnist1d", "n_experiences": 2, "task_labels": True})
    assert b.task_labels
    assert [e.task_label for e in b.train_stream] == [0, 1]


def test_permuted_mnist1d_is_domain_incremental_first_unpermuted() -> None:
    b = build_benchmark({"name": "permuted_mnist1d", "n_experiences": 3, "seed": 0})
    assert b.input_shape == (40,) and b.n_classes == 10 and not b.task_labels
    x_train, y_train, x_test, _ = m1d.mnist1d_tensors(0)
    exps = list(b.train_stream)
    assert len(exps) == 3 and len(list(b.test_stream)) == 3
    for e, te in zip(exps, b.test_stream, strict=True):
        assert sorted(e.classes_in_this_experience) == list(range(10)) == sorted(labels(te))
        assert len(e.dataset) == 4000 and len(te.dataset) == 1000
    first = inputs(exps[0])
    assert torch.equal(first, x_train[:8])  # experience 0: the identity permutation
    assert torch.equal(inputs(b.test_stream[0]), x_test[:8])
    for e in exps[1:]:
        other = inputs(e)
        assert not torch.equal(other, first)
        assert torch.equal(other.sort(dim=1).values, first.sort(dim=1).values)  # same points
        assert [int(e.dataset[i][1]) for i in range(8)] == y_train[:8].tolist()
    assert not torch.equal(inputs(exps[1]), inputs(exps[2]))  # each its own permutation


def test_benchmarks_are_built_without_network_or_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist1d.data
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated, not downloaded")

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)  # get_dataset would write ./mnist1d_data.pkl
    for name in MNIST1D:
        b = build_benchmark({"name": name, "n_experiences": 2, "seed": 1})
        assert len(list(b.train_stream)) == 2
    assert list(tmp_path.iterdir()) == []


def test_engram_train_on_split_mnist1d_commits_a_version(tmp_path: Path) -> None:
    cfg = config(tmp_path / "s", "benchmark=split_mnist1d", "run.max_experiences=1")
    matrix = train(cfg)
    assert len(matrix) == 1 and matrix[0][0] > 0.5  # two classes after one epoch
    with Store.open(tmp_path / "s") as store:
        head = store.head
        assert head is not None and len(store.versions()) >= 1
        assert head.meta["experience"] == 0
        assert head.meta["model_spec"]["args"]["input_shape"] == [40]
