"""Teacher and student nets. Every net exposes `num_classes` so mismatches are caught before training
(the contract: docs/models.md)."""

from kd_lightning.models.library import timm_net, torchvision_net
from kd_lightning.models.mnist import MLP, MnistCNN, MnistConvStudent
from kd_lightning.models.resnet import CifarResNet

__all__ = ["MLP", "CifarResNet", "MnistCNN", "MnistConvStudent", "timm_net", "torchvision_net"]
