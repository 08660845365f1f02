"""A bottleneck ResNet with timm's module names.

Names match timm's ``ResNet`` (``conv1``, ``bn1``, ``layerK.N.{conv1,bn1,conv2,bn2,conv3,bn3,
downsample.0,downsample.1}``, ``fc``). The stem is configurable so the same class runs on
224 px ImageNet shapes (7x7/2 conv + max-pool) and on 8x8 digits (3x3/1 conv, no pool).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNet(nn.Module):
    """Bottleneck ResNet; input ``[B, in_chans, H, W]``, output ``[B, num_classes]``.

    Args:
        layers: blocks per stage.
        widths: bottleneck width per stage (the stage outputs ``4 * width`` channels).
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"small"`` (3x3/1 conv, no pool).
        stem_width: channels of the stem convolution.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
        num_classes: int = 1000,
        stem: str = "imagenet",
        stem_width: int = 64,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"need 4 stages, got layers={list(layers)} widths={list(widths)}")
        self.num_classes = num_classes
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        inplanes = stem_width
        for i, (n_blocks, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(inplanes, width, stride))
                inplanes = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(self.forward_features(x)).flatten(1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 at ImageNet shapes (25.6 M parameters), random weights: for audits and MAC counts."""
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), 3, num_classes, "imagenet", 64)


def resnet_tiny_digits(num_classes: int = 10) -> ResNet:
    """A 4-stage, one-block-per-stage bottleneck ResNet for 8x8 one-channel digits."""
    return ResNet((1, 1, 1, 1), (16, 32, 64, 128), 1, num_classes, "small", 16)
