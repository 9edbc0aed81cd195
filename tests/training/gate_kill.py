"""Child: ``STORE POINT [OVERRIDES...]``: ``engram-train`` with the store at STORE,
SIGKILLed at POINT of the regression gate's settlement (see test_gate_crash.py):

- ``verdict``: the verdict is computed, its refs chosen, nothing committed yet;
- ``publish``: the failing version's files are written, its transaction not begun;
- ``published``: its transaction is committed (the version is visible, off HEAD);
- ``pruned``: the experience's mid-experience versions are pruned, GateFailed not raised.

Exits 99 if the run ended without reaching POINT (the kill never came).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from engram.store import commit as store_commit
from engram.training import gate, policy, template


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    store, point, *overrides = sys.argv[1:]
    if point == "verdict":
        refs = gate.gate_refs

        def killed_after_refs(*args, **kwargs):
            moves = refs(*args, **kwargs)
            if moves is not None and moves.head != "new":  # the failing experience's
                kill()
            return moves

        template.gate_refs = killed_after_refs
    elif point in ("publish", "published"):
        publish = store_commit._publish

        def killed_around_publish(*args, **kwargs):
            head, _ = args[-1]  # (where HEAD goes, tags)
            failing = head != "new"
            if failing and point == "publish":
                kill()
            publish(*args, **kwargs)
            if failing:
                kill()

        store_commit._publish = killed_around_publish
    elif point == "pruned":
        prune = policy.CommitPolicy.prune

        def killed_after_prune(self, store, before, index):
            prune(self, store, before, index)
            if store.head is None or store.head.meta["experience"] < index:  # a rejection
                kill()

        policy.CommitPolicy.prune = killed_after_prune
    else:
        sys.exit(f"unknown point {point!r}")
    from engram.train import main as train_main

    sys.argv = ["engram-train", f"store.path={store}", *overrides]
    with contextlib.suppress(SystemExit):
        train_main()
    sys.exit(99)


if __name__ == "__main__":
    main()
