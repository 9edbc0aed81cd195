"""torchrun entry for the SIGKILL-inside-the-collective-commit tests: ``engram.train``
with one rank killing itself at a named point of its Nth collective commit.

    torchrun --standalone --nproc-per-node=2 tests/distributed/kill_in_commit.py \\
        POINT N MARKER <engram-train overrides...>

POINT:

* ``rank1-sent``: rank 1, right after it sent its part to rank 0 (before rank 0's
  reply): rank 0 may still commit the version that holds it;
* ``rank0-checkpoint``: rank 0, inside ``Store.commit`` once the version's checkpoint
  file is written and before its manifest (the other ranks' parts may still be on
  their way: their receive overlaps that write).

Before the kill the victim writes ``MARKER`` ("killed: POINT N"), so the test knows the
process died where intended and not elsewhere.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die(marker: Path, point: str, n: int) -> None:
    marker.write_text(f"killed: {point} {n}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    calls = [0]
    if point == "rank1-sent" and rank == 1:
        from engram.distributed import wire

        send = wire.send

        def dying_send(tree, *args, **kwargs):  # a non-main rank sends only in the commit
            send(tree, *args, **kwargs)
            if "part" not in tree:  # the tensors rank 0 asked for (a first commit's 2nd round)
                return
            calls[0] += 1
            if calls[0] == n:
                die(marker, point, n)

        wire.send = dying_send
    elif point == "rank0-checkpoint" and rank == 0:
        import engram.store.commit as commit_module

        write = commit_module.write_checkpoint

        def dying_write(*args, **kwargs):
            info = write(*args, **kwargs)
            calls[0] += 1
            if calls[0] == n:  # checkpoint written, manifest not yet
                die(marker, point, n)
            return info

        commit_module.write_checkpoint = dying_write  # where the commit protocol calls it
    sys.argv = [sys.argv[0], *sys.argv[4:]]
    from engram.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
