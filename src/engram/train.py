"""engram-train's public entry: ``python -m engram.train`` (and torchrun's ``-m
engram.train``), ``from engram.train import train``. The run itself is
:mod:`engram.run` (entry, config, validation, builders, runner)."""

from engram.run.entry import GateFailed, build_optimizer, build_plugins, main, model_spec, train

__all__ = ["GateFailed", "build_optimizer", "build_plugins", "main", "model_spec", "train"]

if __name__ == "__main__":
    main()
