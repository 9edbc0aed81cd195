"""Fixtures of the store's process tests: children started from a warm pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from children import Child, Pool


@pytest.fixture(scope="module")
def _pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("children"))
    yield pool
    pool.close()


@pytest.fixture
def spawn(_pool: Pool) -> Iterator[Callable[..., Child]]:
    """Run ``body`` (after the children's prelude) in a child; each is killed at
    teardown if alive.

    The child's argv is ``["-c", *args]``; its stdin stays a pipe (``Child.send``).
    """
    children: list[Child] = []

    def start(body: str, *args: object) -> Child:
        child = _pool.take(body, args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()
