"""The CIFAR VGGs of RepDistiller / mdistiller (`models/vgg.py`, the `_bn` variants the benchmark uses): five conv
blocks (3x3 conv + BN, ReLU between), max-pools after blocks 0-2, global average pooling and one `classifier`
Linear. vgg8: one conv per block; vgg13: two. On 32x32 images blocks 3 and 4 both work at 4x4 (the references
pool after block 3 only for 64x64 inputs). Keys, shapes, initialization and arithmetic are the references'; the
ReLUs after the blocks are modules here (`relu0..4`, no parameters) so that hooks read the post-ReLU stage
outputs, the references' `feats`.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _block(channels: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in channels:
        layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block ends with BN: its ReLU is applied by the net (relu<i>)


class VGG(nn.Module):
    feature_layers = ("relu1", "relu2", "relu3", "relu4")  # 16x16, 8x8, 4x4, 4x4
    embedding = "classifier:input"

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.block0 = _block(cfg[0], 3)
        self.block1 = _block(cfg[1], cfg[0][-1])
        self.block2 = _block(cfg[2], cfg[1][-1])
        self.block3 = _block(cfg[3], cfg[2][-1])
        self.block4 = _block(cfg[4], cfg[3][-1])
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def vgg8(num_classes: int = 100) -> VGG:
    """The references' `vgg8_bn` (their `vgg8` in the benchmark's model dict)."""
    return VGG(CONFIGS["vgg8"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    """The references' `vgg13_bn` (their `vgg13` in the benchmark's model dict)."""
    return VGG(CONFIGS["vgg13"], num_classes)
