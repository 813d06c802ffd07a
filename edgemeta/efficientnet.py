"""EfficientNet-Lite 0/1/2 (Tan and Le 2019; the "lite" edge variant of the TensorFlow TPU repository).

The edge variant drops what does not quantize or run well on mobile accelerators: ReLU6
instead of swish, no squeeze-and-excitation, a stem and head that do not scale with the
width. That makes it a good photo backbone for edgemeta: the ONNX graph is convolutions,
ReLU6 (a Clip), additions and one global average pool, all of which ONNX Runtime
quantizes to int8.

The layout and arithmetic follow the reference PyTorch port (``efficientnet-lite-pytorch``)
exactly, TensorFlow's asymmetric "SAME" padding included, so its ImageNet weights load
unchanged (see :mod:`edgemeta.pretrained_weights`); the module names are our own. The
embedding is the pooled 1280-d output of the head convolution, never ImageNet's class
scores: the classifier layer is not part of the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LITE_VARIANTS", "LiteVariant", "EfficientNetLite", "reference_key", "MIN_SIZE"]

# (repeats, kernel, stride, expand ratio, in, out) of the seven stages, before width/depth scaling
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM, _HEAD = 32, 1280  # fixed in the lite variants (they do not scale with the width)
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's 0.99 decay
# 'SAME' padding computes on any size, but after the fourth of the five stride-2 layers a
# 16-pixel input is down to one pixel: smaller ones leave the last stages nothing to see
MIN_SIZE = 16


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int  # the ImageNet training resolution


LITE_VARIANTS = {
    0: LiteVariant(1.0, 1.0, 224),
    1: LiteVariant(1.0, 1.1, 240),
    2: LiteVariant(1.1, 1.2, 260),
}


def _round_filters(filters: int, width: float) -> int:
    """TensorFlow's channel rounding: a multiple of 8, never more than 10% below the scaled value."""
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one side: asymmetric for stride 2 on even inputs."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """Conv (TensorFlow 'SAME' padding, no bias) -> BatchNorm -> optional ReLU6."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # stride 1 'SAME' is symmetric, so the convolution pads itself; stride 2 pads in forward()
        self.conv = nn.Conv2d(
            cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # the spatial size is static in an exported graph, so these are constants there
            top, bottom = _same_pad(int(x.shape[-2]), self.kernel, self.stride)
            left, right = _same_pad(int(x.shape[-1]), self.kernel, self.stride)
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity when shapes match)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ``variant`` (0, 1 or 2) as a few-shot backbone: ``[B, 3, H, W] -> [B, 1280]``.

    ``blocks`` is one flat list (16 blocks in Lite0), so "freeze the stem and the first n
    blocks" is an index (see :meth:`trunk_and_tail`).
    """

    def __init__(self, in_channels: int = 3, variant: int = 0) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(LITE_VARIANTS)}, got {variant!r}")
        v = LITE_VARIANTS[variant]
        self.variant = variant
        self.stem = ConvBN(in_channels, _STEM, 3, 2)
        blocks: list[nn.Module] = []
        self.stage_starts: list[int] = []  # index in ``blocks`` of each stage's first block
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_STAGES):
            self.stage_starts.append(len(blocks))
            # the first and last stages keep their depth, as the stem and head keep their width
            n = repeats if i in (0, len(_STAGES) - 1) else int(math.ceil(v.depth * repeats))
            cin = _STEM if i == 0 else _round_filters(cin, v.width)
            cout = _round_filters(cout, v.width)
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(cout, _HEAD)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(int(x.shape[-2]), int(x.shape[-1])) < MIN_SIZE:
            # a RuntimeError, as a too-small input is for the other backbones: training's size
            # check turns it into "takes N pixels or more"
            raise RuntimeError(
                f"EfficientNet-Lite takes inputs of {MIN_SIZE}x{MIN_SIZE} pixels or more, got {tuple(x.shape[-2:])}"
            )
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return torch.flatten(self.pool(self.head(x)), 1)

    @property
    def default_freeze(self) -> int:
        """Where fine-tuning starts by default: the last two stages (from the last stride-2 one)
        and the head train; what comes before keeps its ImageNet features and runs once per
        image (see edgemeta.finetune). On Tiny-ImageNet this beat training the last stage
        only by over 2 points of validation accuracy at the same cost in episodes
        (reports/photos.md)."""
        return self.stage_starts[5]

    def trunk_and_tail(self, freeze_until: int) -> tuple[nn.Module, nn.Module]:
        """Split at block ``freeze_until``: the trunk (stem + blocks before it) and the tail
        (the remaining blocks, the head and the pool) that maps the trunk's map to the embedding.
        Both share this module's parameters."""
        if not 0 <= freeze_until <= len(self.blocks):
            raise ValueError(f"freeze_until must be in 0..{len(self.blocks)}, got {freeze_until}")
        trunk = nn.Sequential(self.stem, *self.blocks[:freeze_until])
        tail = nn.Sequential(*self.blocks[freeze_until:], self.head, self.pool, nn.Flatten(1))
        return trunk, tail


def reference_key(key: str) -> str | None:
    """Our parameter name for a key of the reference port's state dict (None: not part of the
    backbone, the ImageNet classifier ``_fc``)."""
    if key.startswith("_fc."):
        return None
    parts = key.split(".")
    convs = {"_expand_conv": "expand.conv", "_depthwise_conv": "depthwise.conv", "_project_conv": "project.conv"}
    block_bns = {"_bn0": "expand.bn", "_bn1": "depthwise.bn", "_bn2": "project.bn"}
    if parts[0] == "_blocks":
        name = convs.get(parts[2]) or block_bns.get(parts[2])
        if name is None:
            raise KeyError(key)
        return ".".join(["blocks", parts[1], name, *parts[3:]])
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}
    if parts[0] not in top:
        raise KeyError(key)
    return ".".join([top[parts[0]], *parts[1:]])
