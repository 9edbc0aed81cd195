"""Continual-learning strategies as Avalanche plugins with persistent state.

Each plugin implements :class:`engram.stateful.Stateful` and ``hparams()``; the
:class:`~engram.training.template.DurableTemplate` commits and restores them.
"""

from engram.strategies.agem import AGEMPlugin
from engram.strategies.der import DERPlugin
from engram.strategies.ewc import EWCPlugin
from engram.strategies.lwf import LwFPlugin
from engram.strategies.mas import MASPlugin
from engram.strategies.replay import ERPlugin
from engram.strategies.si import SIPlugin

__all__ = ["AGEMPlugin", "DERPlugin", "ERPlugin", "EWCPlugin", "LwFPlugin", "MASPlugin", "SIPlugin"]
