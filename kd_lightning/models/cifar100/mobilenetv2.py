"""MobileNetV2 of RepDistiller / mdistiller (`models/mobilenetv2.py`), the benchmark's `mobile_half`: expansion 6,
width 0.5, the ImageNet layout (stride-2 3x3 stem) on 32x32 images, a 1x1 conv to 1280 channels, average
pooling and `classifier.0`. Stage outputs (the references' feats[1:]): blocks.1 16x16, blocks.2 8x8, blocks.4
4x4, blocks.6 2x2. Keys, shapes, initialization and arithmetic are the references'.
"""

import math

import torch
from torch import nn


def _conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    feature_layers = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
    embedding = "classifier.0:input"

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100,
                 input_size: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        setting = [[1, 16, 1, 1], [expansion, 24, 2, 1], [expansion, 32, 3, 2], [expansion, 64, 4, 2],
                   [expansion, 96, 3, 1], [expansion, 160, 3, 2], [expansion, 320, 1, 1]]  # t, c, n, s
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.avgpool(self.conv2(out))
        return self.classifier(out.flatten(1))


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """The references' `MobileNetV2` student: mobilenetv2_T_w(T=6, W=0.5)."""
    return MobileNetV2(6, 0.5, num_classes)
