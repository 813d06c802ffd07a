"""Feature extractors for few-shot learning, in a small registry.

Every backbone maps ``[B, C, H, W]`` to a flat ``[B, D]`` embedding with no
data-dependent Python control flow, so all of them trace and export to ONNX.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from edgemeta.runtime.errors import InputError

__all__ = ["BACKBONES", "register", "build_backbone", "embedding_dim", "Conv4", "ResNet12", "EdgeNet"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Register a backbone factory ``f(in_channels, **kwargs) -> nn.Module`` under ``name``."""

    def deco(factory):
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = factory
        return factory

    return deco


def build_backbone(name: str, in_channels: int, **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise InputError(f"bad arguments for backbone {name!r}: {e}") from None


@torch.no_grad()
def embedding_dim(backbone: nn.Module, in_channels: int, size: tuple[int, int]) -> int:
    """The embedding width for inputs of ``size``, measured with one dummy forward pass."""
    was_training = backbone.training
    backbone.eval()
    d = backbone(torch.zeros(1, in_channels, *size)).shape[1]
    backbone.train(was_training)
    return int(d)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


@register("conv4")
class Conv4(nn.Module):
    """The ProtoNet standard (Snell et al. 2017): 4 x [conv3x3-BN-ReLU-maxpool], flattened.

    28x28 inputs give a 64-d embedding; 84x84 give 1600-d.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, depth: int = 4) -> None:
        super().__init__()
        layers = [_conv_block(in_channels if i == 0 else channels, channels) for i in range(depth)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


@register("resnet12")
class ResNet12(nn.Module):
    """The standard few-shot ResNet-12 (Lee et al. 2019; Tian et al. 2020): 4 residual
    blocks of three 3x3 convs, widths 64-160-320-640, global average pooling -> 640-d."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640)) -> None:
        super().__init__()
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(_ResBlock(cin, w))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@register("edgenet")
class EdgeNet(nn.Module):
    """A small MobileNet-style network for edge devices: a strided stem, depthwise
    separable blocks (stride 2 where the width grows), global average pooling."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU6(inplace=True),
        ]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers.append(_DepthwiseSeparable(cin, cout, stride=2 if cout != cin else 1))
            layers.append(_DepthwiseSeparable(cout, cout, stride=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)
