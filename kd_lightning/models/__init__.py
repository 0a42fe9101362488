"""Teacher and student nets. Every net exposes `num_classes` so mismatches are caught before training."""

from kd_lightning.models.mnist import MLP, MnistCNN, MnistConvStudent
from kd_lightning.models.resnet import CifarResNet

__all__ = ["MLP", "CifarResNet", "MnistCNN", "MnistConvStudent"]
