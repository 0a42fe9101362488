"""The CIFAR-100 benchmark nets of RepDistiller and mdistiller (docs/benchmark.md), module for module.

Each net has the reference implementation's parameter count and state-dict key names (so the released
`ckpt_epoch_240.pth` teachers load as they are, `kd_lightning.models.cifar100.released`), returns logits only
(features are read with forward hooks, kd_lightning/methods/base.py), and declares
- `feature_layers`: the module paths of its stage outputs, in depth order (the references' `feats[1:]`);
- `embedding`: the penultimate embedding, the input of its classifier (the references' `pooled_feat`).
The reference code: github.com/HobbitLong/RepDistiller `models/` and github.com/megvii-research/mdistiller
`mdistiller/models/cifar/` (the two agree on every key and shape).
"""

from kd_lightning.models.cifar100.mobilenetv2 import MobileNetV2, mobile_half
from kd_lightning.models.cifar100.resnet import ResNet, resnet8x4, resnet20, resnet32, resnet32x4, resnet56, resnet110
from kd_lightning.models.cifar100.shufflenet import ShuffleNetV1, ShuffleNetV2, ShuffleV1, ShuffleV2
from kd_lightning.models.cifar100.vgg import VGG, vgg8, vgg13
from kd_lightning.models.cifar100.wrn import WideResNet, wrn_16_2, wrn_40_1, wrn_40_2

# `model=` config name -> constructor; the 14 nets of the benchmark's pairs (docs/benchmark.md).
NETS = {
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet110": resnet110,
    "resnet8x4": resnet8x4, "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2, "wrn_40_1": wrn_40_1, "wrn_40_2": wrn_40_2,
    "vgg8": vgg8, "vgg13": vgg13,
    "mobilenetv2": mobile_half, "shufflev1": ShuffleV1, "shufflev2": ShuffleV2,
}

__all__ = ["NETS", "VGG", "MobileNetV2", "ResNet", "ShuffleNetV1", "ShuffleNetV2", "WideResNet", "mobile_half",
           "resnet8x4", "resnet20", "resnet32", "resnet32x4", "resnet56", "resnet110", "ShuffleV1", "ShuffleV2",
           "vgg8", "vgg13", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
