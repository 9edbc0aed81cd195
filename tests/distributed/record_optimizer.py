"""torchrun entry for the branch test: ``engram.train`` with each rank writing, once
the stored optimizer state is loaded (and a branch's changed settings applied over it),
its optimizer's settings to ``OUT.rank<R>.json``.

    torchrun --standalone --nproc-per-node=2 tests/distributed/record_optimizer.py \\
        OUT <engram-train overrides...>
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    import engram.training.state as state_module

    load = state_module.OptimizerState.load_state_dict

    def recording_load(self, state):
        load(self, state)
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        path = out.with_name(f"{out.name}.rank{os.environ['RANK']}.json")
        path.write_text(json.dumps(groups, default=list))

    state_module.OptimizerState.load_state_dict = recording_load
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    from engram.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
