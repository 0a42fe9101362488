"""The CIFAR ResNets of RepDistiller / mdistiller (`models/resnet.py`): a 3x3 stem, three stages of BasicBlocks
(depth 6n+2) with `num_filters` = (stem, stage 1, 2, 3) channels, 8x8 average pooling and `fc`.
resnet20/32/56/110: filters (16, 16, 32, 64); resnet8x4 / resnet32x4: four times wider, (32, 64, 128, 256).

The blocks return their output only (the references' `is_last` blocks also return the pre-activation, which no
method here reads); keys, shapes, initialization and arithmetic are the references'.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        residual = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + residual)


class ResNet(nn.Module):
    """`depth` = 6n + 2 layers; stage outputs 32x32, 16x16, 8x8 on a 32x32 image."""

    feature_layers = ("layer1", "layer2", "layer3")
    embedding = "fc:input"

    def __init__(self, depth: int, num_filters: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not a CIFAR ResNet depth: 6n+2, e.g. 20, 32, 56, 110")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, (16, 16, 32, 64), num_classes)


def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, (16, 16, 32, 64), num_classes)


def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, (32, 64, 128, 256), num_classes)
