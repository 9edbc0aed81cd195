"""Minibatches of tensor streams without a per-sample fetch (engram.training.batches):
the same values as Avalanche's path, and only where a sample is fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from engram.streams.digits import split_digits
from engram.training import batches, template
from engram.training.batches import BatchesCache, tensor_batches
from engram.training.template import DurableTemplate


@pytest.fixture(scope="module")
def bench():
    return split_digits(5)


def test_a_minibatch_equals_avalanches_collated_samples(bench) -> None:
    for dataset in (bench.train_stream[1].dataset.train(), bench.test_stream[3].dataset.eval()):
        fast = tensor_batches(dataset)
        assert fast is not None and len(fast) == len(dataset)
        idx = [5, 0, len(dataset) - 1, 5, 17]
        expected = dataset.collate_fn([dataset[i] for i in idx])
        got = fast.__getitems__(idx)
        assert len(got) == len(expected) == 3  # x, y, task label
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == e.dtype and torch.equal(g, e)


def test_a_random_transform_keeps_the_per_sample_path(bench) -> None:
    dataset = bench.train_stream[0].dataset.train()
    noisy = dataset.replace_current_transform_group(lambda x: x + torch.rand_like(x))
    assert tensor_batches(noisy) is None
    assert tensor_batches(dataset) is not None  # the original is untouched


class Folder(Dataset):
    """A dataset of the user's own class (it could read files, augment...)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3,), float(i)), i % 2


def test_a_leaf_that_is_not_a_tensor_dataset_keeps_the_per_sample_path() -> None:
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    dataset = _make_taskaware_classification_dataset(Folder(), targets=[0, 1, 0, 1])
    assert tensor_batches(dataset) is None


def test_a_stream_over_the_bound_is_not_copied(bench, monkeypatch) -> None:
    dataset = bench.train_stream[0].dataset.train()
    monkeypatch.setattr(batches, "MAX_BYTES", 64 * 4 * len(dataset) - 1)  # x alone is more
    assert tensor_batches(dataset) is None


def test_the_cache_serves_each_evaluation_of_one_experience(bench) -> None:
    cache = BatchesCache()
    first = cache.get(bench.test_stream[0].dataset.eval())
    assert first is not None
    assert cache.get(bench.test_stream[0].dataset.eval()) is first  # a new clone, same data
    other = cache.get(bench.test_stream[1].dataset.eval())
    assert other is not None and other is not first


def _train(store: Path) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    bench = split_digits(5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with DurableTemplate(model=model, optimizer=optimizer, store=store, train_epochs=2,
                         train_mb_size=16) as strategy:  # fmt: skip
        matrix = strategy.fit(bench.train_stream, bench.test_stream, max_experiences=3)
    return matrix, model.state_dict()


def test_training_is_bit_identical_to_the_per_sample_path(tmp_path: Path, monkeypatch) -> None:
    fast_matrix, fast_weights = _train(tmp_path / "fast")
    monkeypatch.setattr(template, "tensor_batches", lambda dataset: None)
    monkeypatch.setattr(BatchesCache, "get", lambda self, dataset: None)
    slow_matrix, slow_weights = _train(tmp_path / "slow")
    assert fast_matrix == slow_matrix
    for name, weight in slow_weights.items():
        assert torch.equal(fast_weights[name], weight), name


def test_reading_a_stream_leaves_the_global_rng_where_it_was(bench) -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert tensor_batches(bench.train_stream[2].dataset.train()) is not None
    assert torch.equal(torch.get_rng_state(), before)
