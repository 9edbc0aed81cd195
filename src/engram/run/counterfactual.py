"""What a resumed run would have given had its continual-learning memory been lost.

``engram-train run.compare_memory_lost=true`` (the README's first run) resumes a store
and trains the experiences left, as always. It then trains the same experiences again
in a *shadow* run that keeps only what a model file would have kept: the weights the
run resumed from — no replay buffer, no Fisher or anchors, no teacher, a fresh
optimizer, no RNG streams. The shadow writes to a temporary store that is deleted
afterwards; nothing of it reaches the real one. Both accuracy matrices are computed by
this run, and :func:`print_comparison` puts them side by side.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from engram import metrics


def memory_lost_rows(
    build: Callable[[Any], Any],
    weights: Mapping[str, Any],
    train_list: Sequence[Any],
    test_list: Sequence[Any],
    first: int,
    last: int,
) -> list[list[float]]:
    """The accuracy rows of experiences ``first..last-1`` trained from ``weights`` alone.

    Args:
        build: ``build(store) -> template`` for the run's model, optimizer and strategy
            (fresh objects), committing to ``store``.
        weights: the model's state dict the real run resumed from.
    """
    from engram.store import Store

    with (
        tempfile.TemporaryDirectory(prefix="engram-memory-lost-") as tmp,
        Store.open(f"{tmp}/store", mode="c") as store,
        build(store) as shadow,
    ):
        shadow.model.load_state_dict(weights)
        shadow.fit(train_list[first:last], test_list)
        return [list(row) for row in shadow.accuracy_matrix]


def print_comparison(kept: list[list[float]], lost_rows: list[list[float]], first: int,
                     resumed_from: str) -> None:  # fmt: skip
    """The rows trained by this run, with the memory (the store's) and without."""
    lost = [list(r) for r in kept[:first]] + lost_rows
    print(f"\nthis run resumed {resumed_from} and trained experiences {first}..{len(kept) - 1}.")
    print("Accuracy on each test experience after each experience, with the memory the")
    print("store kept, and had only the model file survived the restart (same weights, but")
    print("no replay buffer, importances, teacher, optimizer state or RNG streams):\n")
    width = len(kept[-1]) * 5 - 1
    print(f"  {'':6}  {'memory kept (engram)':<{width}}    {'memory lost':<{width}}")
    for i in range(first, len(kept)):
        left = " ".join(f"{a:.2f}" for a in kept[i])
        right = " ".join(f"{a:.2f}" for a in lost[i])
        print(f"  exp {i:<2}  {left:<{width}}    {right:<{width}}")
    for name, fn in (("average accuracy", metrics.average_accuracy),
                     ("forgetting", metrics.forgetting)):  # fmt: skip
        print(f"  {name:<16} {fn(kept):.3f}{'':{width - 15}}    {fn(lost):.3f}")
