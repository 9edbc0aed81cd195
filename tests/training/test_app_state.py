"""The template's plugins by allowlist (engram.training.app_state): a plugin whose state
nothing keeps is refused by name — when the template is built, or before the commit
after a hook gave it state — instead of resuming without it."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import plugins as P
from torch import nn

from engram.errors import EngramError
from engram.stateful import PersistentFields
from engram.store import Store
from engram.strategies.avalanche_state import ADAPTERS, REFUSED, STATELESS
from engram.training.app_state import UnkeptStateError
from engram.training.template import DurableTemplate
from helpers import one_thread


def template_with(store: Path, *plugins: Any, **kwargs: Any) -> DurableTemplate:
    model = nn.Linear(4, 3)
    return DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           store=store, plugins=list(plugins), **kwargs)  # fmt: skip


class SeenCounter(SupervisedPlugin):
    """A stateful plugin engram has never seen: it counts the minibatches trained."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.seen += 1


def test_an_unseen_stateful_plugin_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UnkeptStateError) as raised:
        template_with(tmp_path / "s", SeenCounter())
    message = str(raised.value)
    assert "SeenCounter" in message and "seen" in message and "\n" not in message
    assert "engram_transient" in message and "Stateful" in message  # what to do
    assert not (tmp_path / "s").exists()  # refused before the store was opened


def test_the_same_plugin_made_stateful_is_kept(tmp_path: Path) -> None:
    class KeptCounter(PersistentFields, SeenCounter):
        engram_name = "counter"
        persistent_fields = ("seen",)

    with template_with(tmp_path / "s", KeptCounter()) as template:
        assert list(template.named_plugins()) == ["counter"]


def test_declared_transient_attributes_are_accepted(tmp_path: Path) -> None:
    class Declared(SeenCounter):
        engram_transient = ("seen",)

    with template_with(tmp_path / "s", Declared()) as template:
        assert template.named_plugins() == {}


def test_state_a_hook_adds_later_is_refused_before_the_commit(tmp_path: Path) -> None:
    class Lazy(SupervisedPlugin):  # no attribute when built: accepted then
        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.last_loss = float(strategy.loss.detach())

    from engram.streams.digits import split_digits

    bench = split_digits(n_experiences=5, seed=0)
    model = nn.Linear(64, 10)
    template = DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               store=tmp_path / "s", plugins=[Lazy()])  # fmt: skip
    refused = pytest.raises(UnkeptStateError, match="Lazy holds state .*last_loss")
    with one_thread(), template, refused:
        template.fit(bench.train_stream[:1], bench.test_stream[:1])
    with Store.open(tmp_path / "s") as store:
        assert store.head is None  # nothing committed without the plugin's state


def test_a_subclass_of_an_adapted_plugin_with_its_own_init_is_refused(tmp_path: Path) -> None:
    class MyEWC(P.EWCPlugin):
        def __init__(self) -> None:
            super().__init__(ewc_lambda=1.0)
            self.my_importances: dict[str, Any] = {}

    with pytest.raises(UnkeptStateError, match="MyEWC extends Avalanche's EWCPlugin"):
        template_with(tmp_path / "s", MyEWC())

    class Declared(MyEWC):
        engram_transient = ("my_importances",)

    with template_with(tmp_path / "t", Declared()) as template:
        assert list(template.named_plugins()) == ["avalanche_ewc"]


def test_every_avalanche_plugin_is_adapted_refused_or_known_stateless() -> None:
    """The allowlist covers the installed Avalanche: a plugin it adds is decided here
    (this fails, naming it) rather than taken as stateless."""
    plugins = {name for name, cls in inspect.getmembers(P, inspect.isclass)
               if issubclass(cls, SupervisedPlugin) and cls is not SupervisedPlugin}  # fmt: skip
    undecided = plugins - ADAPTERS.keys() - REFUSED.keys() - STATELESS.keys()
    assert not undecided


def test_an_avalanche_plugin_engram_does_not_know_is_refused(tmp_path: Path) -> None:
    # A plugin class from Avalanche's package that no table names (a newer release's):
    # defined here with Avalanche's module, as a new release would ship it.
    Unknown = type("ShinyNewPlugin", (SupervisedPlugin,), {"__module__": "avalanche.new"})
    with pytest.raises(EngramError, match="does not know whether Avalanche's ShinyNewPlugin"):
        template_with(tmp_path / "s", Unknown())
