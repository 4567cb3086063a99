"""The model zoo: shapes, no BatchNorm, clear errors for mismatched data."""

import pytest
import torch

from clients.models import build_model
from scenarios.config import ModelConfig


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("softmax", (60,)),
        ("mlp", (40,)),
        ("mlp", (1, 8, 8)),
        ("cnn1d", (40,)),
        ("cnn2d", (1, 8, 8)),
        ("cnn2d", (1, 28, 28)),
    ],
)
def test_forward_shapes_and_no_batchnorm(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(name=name), shape, 10)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(
        k.endswith(("weight", "bias")) for k in model.state_dict()
    )  # no buffers to mis-aggregate


def test_mismatched_model_and_data() -> None:
    with pytest.raises(ValueError, match="cnn2d"):
        build_model(ModelConfig(name="cnn2d"), (40,), 10)
    with pytest.raises(ValueError, match="cnn1d"):
        build_model(ModelConfig(name="cnn1d"), (1, 8, 8), 10)
