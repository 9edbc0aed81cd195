"""engram.models: specs become models only through the allowlist."""

from __future__ import annotations

import pytest
import torch

from engram.errors import EngramError
from engram.models import build_model, grow_to, register_model


@pytest.mark.parametrize(
    "spec, shape",
    [
        ({"name": "mlp", "args": {"input_shape": [64], "n_classes": 10}}, (5, 64)),
        ({"name": "mlp", "args": {"input_shape": [3, 4], "n_classes": 2, "hidden": []}}, (5, 3, 4)),
        ({"name": "cnn", "args": {"input_shape": [64], "n_classes": 10}}, (5, 64)),
        ({"name": "cnn", "args": {"input_shape": [3, 32, 32], "n_classes": 4}}, (5, 3, 32, 32)),
        ({"name": "avalanche.SimpleMLP", "args": {"num_classes": 3, "input_size": 12}}, (5, 12)),
        ({"name": "torchvision.resnet18", "args": {"num_classes": 3}}, (2, 3, 32, 32)),
    ],
)
def test_allowed_builders_build_working_models(spec: dict, shape: tuple) -> None:
    model = build_model(spec)
    out = model(torch.rand(shape))
    assert out.shape[0] == shape[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "os.system", "args": {"command": "true"}}, "not an allowed builder"),
        ({"name": "torchvision.datasets", "args": {}}, "not an allowed builder"),
        ({"name": "avalanche.__init__"}, "not an allowed builder"),
        (
            {"name": "mlp", "args": {"input_shape": [4], "n_classes": 2, "bogus": 1}},
            "does not accept",
        ),
        ({"args": {}}, "a model spec is"),
        ({"name": "mlp", "args": [1, 2]}, "args must be a mapping"),
    ],
)
def test_anything_else_is_refused(spec: dict, message: str) -> None:
    with pytest.raises(EngramError, match=message):
        build_model(spec)


def test_registered_builders_and_json_only_args() -> None:
    @register_model("tiny_test_net")
    def tiny(width: int) -> torch.nn.Module:
        return torch.nn.Linear(width, 2)

    assert build_model({"name": "tiny_test_net", "args": {"width": 3}}).in_features == 3
    with pytest.raises(EngramError, match="not a JSON value"):
        build_model({"name": "tiny_test_net", "args": {"width": object()}})
    with pytest.raises(ValueError):
        register_model("torchvision.evil", tiny)


def test_grow_to_rebuilds_multihead_heads_from_weights() -> None:
    from engram.streams.digits import split_digits

    spec = {"name": "mlp", "args": {"input_shape": [64], "n_classes": 10, "multihead": True}}
    trained = build_model(spec)
    bench = split_digits(5, task_labels=True)
    from avalanche.models.utils import avalanche_model_adaptation

    for exp in list(bench.train_stream)[:3]:
        avalanche_model_adaptation(trained, exp)
    weights = trained.state_dict()
    fresh = build_model(spec)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(weights)  # the heads do not exist yet
    grow_to(fresh, weights)
    fresh.load_state_dict(weights)
    x = torch.rand(4, 64)
    for task in range(3):
        labels = torch.full((4,), task)
        assert torch.equal(fresh.eval()(x, labels), trained.eval()(x, labels))
