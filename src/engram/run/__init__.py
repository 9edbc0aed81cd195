"""``engram-train``'s glue, the only place that knows Hydra: the entry (:mod:`.entry`,
``engram-train`` and :func:`train`), the config schema (:mod:`.config`), validation and
the Hydra resolvers (:mod:`.validation`, :mod:`.sections`), the builders that turn a
config into plain objects (:mod:`.build`), the runner (:mod:`.runner`) and the
memory-lost comparison (:mod:`.counterfactual`).

The library API stays at the package root (``engram.Store``, ``engram.load_model``,
``engram.ModelHandle``, ``engram.stateful``...); ``engram.train`` is the public entry
module (``python -m engram.train``, ``from engram.train import train``).
"""

#: What engram-train writes inside a store once the store exists (TensorBoard's events)
#: and, in stores from before 2026-12-07, Hydra's run directory: not the store's own
#: files (``engram du`` shows them apart; a failed run's empty store is removed with them).
RUN_FILES = ("tb", "hydra")
