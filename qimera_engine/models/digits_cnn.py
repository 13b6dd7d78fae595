"""The embedded default teacher: a small BatchNorm CNN for 8x8 grey digits."""
from __future__ import annotations

import torch
import torch.nn as nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """8x8x1 -> conv32 -> conv64 -> pool 4x4 -> conv64 -> global pool -> (B, 64) -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width), *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))
