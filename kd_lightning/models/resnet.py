"""ResNets for 32x32 CIFAR images, assembled from torchvision's `ResNet` and `BasicBlock`.

The ImageNet stem (7x7 stride-2 conv, then a stride-2 max-pool) would shrink a 32x32 image to 8x8 before
the first stage; the CIFAR variant uses a 3x3 stride-1 conv and no max-pool, as in most CIFAR code.
"""

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

STAGES = ("layer1", "layer2", "layer3", "layer4")


class CifarResNet(ResNet):
    """torchvision's ResNet with a CIFAR stem, optionally cut after its first `stages` stages.

    `layers` are the BasicBlocks per stage ([3, 4, 6, 3]: ResNet34, [2, 2, 2, 2]: ResNet18). With `stages=2`
    the net is stem, layer1, layer2, global average pooling and a new linear head on layer2's 128 channels:
    the blocks it keeps are shaped exactly as the full net's.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 10, stages: int = 4) -> None:
        if not 1 <= stages <= len(STAGES):
            raise ValueError(f"stages={stages} is not a number of ResNet stages; expected 1, 2, 3 or 4")
        super().__init__(BasicBlock, list(layers), num_classes=num_classes)
        self.num_classes = num_classes
        self.feature_layers = STAGES[:stages]  # the kept stages' outputs, for feature-based distillation
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet inits convs
        self.maxpool = nn.Identity()
        for name in STAGES[stages:]:
            setattr(self, name, nn.Identity())  # ResNet.forward still calls it; it passes features through
        width = 64 * 2 ** (stages - 1) * BasicBlock.expansion
        self.fc = nn.Linear(width, num_classes)
