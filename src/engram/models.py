"""Model builders: the only way a stored configuration becomes a model.

A version records how its model was built as a *model spec*, ``{"name": ..., "args":
{...}}`` with JSON values only. :func:`build_model` turns a spec back into a module
through an allowlist: engram's builders, Avalanche's models, torchvision's
classification models, and builders the user registers with :func:`register_model`.
A stored spec never makes engram import or call anything else.

    from engram.models import build_model, register_model

    @register_model("my_net")
    def my_net(input_shape, n_classes, width=64): ...

    model = build_model({"name": "mlp", "args": {"input_shape": [64], "n_classes": 10}})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from engram.errors import EngramError

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}

# Avalanche's models that a spec may name (as "avalanche.<Name>"), imported on use.
_AVALANCHE_MODELS = ("SimpleMLP", "SimpleCNN", "MTSimpleMLP", "MTSimpleCNN", "MlpVAE")


def register_model(name: str, builder: Builder | None = None) -> Any:
    """Register ``builder`` under ``name`` (usable as a decorator).

    The builder receives the spec's ``args`` as keyword arguments and returns a module.
    """

    def add(fn: Builder) -> Builder:
        if not isinstance(name, str) or not name or name.startswith(("avalanche.", "torchvision.")):
            raise ValueError(f"invalid model name {name!r}")
        _BUILDERS[name] = fn
        return fn

    return add if builder is None else add(builder)


def available_models() -> list[str]:
    """Names a spec may use: registered builders and the Avalanche/torchvision families."""
    return sorted(_BUILDERS) + [f"avalanche.{n}" for n in _AVALANCHE_MODELS] + ["torchvision.*"]


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build the model a spec describes; raises EngramError for anything not allowed."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise EngramError(f"a model spec is {{'name': str, 'args': {{...}}}}, not {spec!r}")
    name, args = spec["name"], spec.get("args") or {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise EngramError(f"model spec {name!r}: args must be a mapping of names to values")
    _check_json(args, name)
    builder = _lookup(name)
    try:
        model = builder(**args)
    except TypeError as e:
        raise EngramError(f"model {name!r} does not accept args {dict(args)}: {e}") from None
    if not isinstance(model, nn.Module):
        raise EngramError(f"model builder {name!r} returned {type(model).__name__}, not a module")
    return model


def _lookup(name: str) -> Builder:
    if name in _BUILDERS:
        return _BUILDERS[name]
    family, _, member = name.partition(".")
    if family == "avalanche" and member in _AVALANCHE_MODELS:
        import avalanche.models

        return getattr(avalanche.models, member)
    if family == "torchvision" and member:
        import torchvision.models

        if member in torchvision.models.list_models(module=torchvision.models):
            return lambda **kw: torchvision.models.get_model(member, weights=None, **kw)
    raise EngramError(
        f"model {name!r} is not an allowed builder; available: {', '.join(available_models())}"
        " (register your own with engram.models.register_model)"
    )


def _check_json(value: Any, name: str) -> None:
    if isinstance(value, Mapping):
        for v in value.values():
            _check_json(v, name)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_json(v, name)
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise EngramError(f"model spec {name!r}: arg value {value!r} is not a JSON value")


# ------------------------------------------------------------------ engram's builders


class _Classifier(nn.Module):
    """``body`` (given layers, then ``hidden`` ReLU layers), then a linear ``classifier``;
    the parameter names (``body.N.*``, ``classifier.*``) are what checkpoints hold."""

    def _build(self, layers: list[nn.Module], width: int, hidden: Sequence[int],
               n_classes: int) -> None:  # fmt: skip
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        self.body = nn.Sequential(*layers)
        self.features = width
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def get_features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (Avalanche's ``BaseModel`` API: LFL compares these)."""
        return self.body(x)


class MLP(_Classifier):
    """Flatten, then ``hidden`` ReLU layers, then a linear classifier."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, hidden: Sequence[int]):
        super().__init__()
        self._build([nn.Flatten()], math.prod(input_shape), hidden, n_classes)


class Reshape(nn.Module):
    """``x.reshape(-1, *shape)``: images stored flat or with a missing channel axis."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)


class ConvNet(_Classifier):
    """3x3 conv blocks (2x2 pooling while the image is large enough), then an MLP.

    Inputs are (C, H, W) images, (H, W) grey images, or flat vectors of a square number
    of pixels (scikit-learn's 8x8 digits are 64 values).
    """

    def __init__(self, input_shape: Sequence[int], n_classes: int, channels: Sequence[int],
                 hidden: Sequence[int]) -> None:  # fmt: skip
        super().__init__()
        shape = tuple(input_shape)
        side = math.isqrt(shape[0]) if len(shape) == 1 else 0
        if len(shape) == 1 and side * side == shape[0]:
            shape = (1, side, side)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise EngramError(f"model 'cnn' needs image inputs (C, H, W), not {list(input_shape)}")
        c, h, w = shape
        layers: list[nn.Module] = [Reshape(shape)]
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if min(h, w) >= 8:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        layers.append(nn.Flatten())
        self._build(layers, c * h * w, hidden, n_classes)


def _multihead(body: nn.Module, features: int) -> nn.Module:
    """Replace a single classifier with one head per task (task-incremental learning)."""
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    class MultiHead(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.classifier = MultiHeadClassifier(features, initial_out_features=2)

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.classifier(self.body(x), task_label)

    return MultiHead()


def mlp(input_shape: Sequence[int], n_classes: int, hidden: Sequence[int] = (256,),
        multihead: bool = False) -> nn.Module:  # fmt: skip
    net = MLP(input_shape, n_classes, hidden)
    return _multihead(net.body, net.features) if multihead else net


def cnn(input_shape: Sequence[int], n_classes: int, channels: Sequence[int] = (32, 64),
        hidden: Sequence[int] = (128,), multihead: bool = False) -> nn.Module:  # fmt: skip
    net = ConvNet(input_shape, n_classes, channels, hidden)
    return _multihead(net.body, net.features) if multihead else net


register_model("mlp", mlp)
register_model("cnn", cnn)


# --------------------------------------------------- dynamically grown modules


def grow_to(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Create the heads of Avalanche's dynamic classifiers that ``weights`` holds.

    Training grows a multi-head or incremental classifier as experiences arrive (model
    adaptation). A process that only loads a version for inference has no experiences;
    this rebuilds the same modules from the checkpoint's keys and shapes instead, so
    ``model.load_state_dict(weights)`` then fits exactly.
    """
    from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule

    for prefix, module in list(model.named_modules()):  # heads first, then their sizes
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, MultiHeadClassifier):
            heads = {
                k[len(dot) + len("classifiers.") :].split(".")[0]
                for k in weights
                if k.startswith(f"{dot}classifiers.")
            }
            for tid in sorted(heads):
                if tid not in module.classifiers:
                    module.classifiers[tid] = IncrementalClassifier(
                        module.in_features, module.starting_out_features,
                        masking=False, auto_adapt=False,
                    )  # fmt: skip
                buffer = f"active_units_T{tid}"
                if f"{dot}{buffer}" in weights:
                    stored = weights[f"{dot}{buffer}"]
                    module.register_buffer(buffer, torch.zeros_like(stored))
    for prefix, module in list(model.named_modules()):
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, IncrementalClassifier):
            key = f"{dot}classifier.weight"
            current = tuple(module.classifier.weight.shape)
            if key in weights and tuple(weights[key].shape) != current:
                out, inp = weights[key].shape
                module.classifier = nn.Linear(inp, out)
                if f"{dot}active_units" in weights:
                    module.register_buffer(
                        "active_units", torch.zeros_like(weights[f"{dot}active_units"])
                    )
    # Plain attributes adaptation keeps outside the state dict, read by forward().
    for module in model.modules():
        if isinstance(module, MultiTaskModule):
            heads = [m for m in module.modules() if isinstance(m, MultiHeadClassifier)]
            for head in heads:
                tasks = {int(t) for t in head.classifiers}
                widths = [c.classifier.out_features for c in head.classifiers.values()]
                module.known_train_tasks_labels |= tasks
                module.max_class_label = max([module.max_class_label, *widths])
