"""The model zoo: small plain ``torch.nn.Module``s for the offline datasets.

No BatchNorm anywhere by default: FedLD projects and FedLAW rescales every state-dict entry, and
running statistics do not survive either (see the specs' pitfalls).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scenarios.config import ModelConfig


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression (the FedProx paper's model for Synthetic(alpha, beta))."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.flatten(1)))


class CNN1D(nn.Module):
    """Two 1-D convolutions + linear head, for sequence data such as mnist1d (length 40)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int) -> None:
        super().__init__()
        in_ch = input_shape[0] if len(input_shape) == 2 else 1
        self.features = nn.Sequential(
            nn.Conv1d(in_ch, channels, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, 2 * channels, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(8),
        )
        self.head = nn.Linear(2 * channels * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, L) -> (B, 1, L)
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class CNN2D(nn.Module):
    """Two 3x3 convolutions + a small MLP head, for 8x8 digits and MNIST-like images."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int) -> None:
        super().__init__()
        in_ch = input_shape[0] if len(input_shape) == 3 else 1
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * channels * 16, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, H, W) -> (B, 1, H, W)
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The scenario's model for data of ``input_shape`` per sample and ``num_classes`` labels."""
    if cfg.name == "softmax":
        return SoftmaxRegression(input_shape, num_classes)
    if cfg.name == "mlp":
        return MLP(input_shape, num_classes, cfg.hidden)
    if cfg.name == "cnn1d":
        if len(input_shape) > 2:
            raise ValueError(
                f"model.name='cnn1d' needs sequences, got samples of shape {input_shape}; use cnn2d or mlp"
            )
        return CNN1D(input_shape, num_classes, cfg.channels)
    if cfg.name == "cnn2d":
        if len(input_shape) < 2:
            raise ValueError(
                f"model.name='cnn2d' needs images, got samples of shape {input_shape}; use cnn1d or mlp"
            )
        return CNN2D(input_shape, num_classes, cfg.channels)
    if cfg.name == "ff_mlp":
        from edge.forward_forward import FFMLP  # forward-forward's label-scoring MLP

        return FFMLP(input_shape, num_classes, cfg.hidden)
    raise ValueError(f"unknown model {cfg.name!r}")
