"""LightningDataModules, all keeping the KDDataModule contract. Batches are `(inputs, labels, dataset_indices)`."""

from kd_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from kd_lightning.data.datamodule import SPLITS, KDDataModule
from kd_lightning.data.image_folder import ImageFolderDataModule
from kd_lightning.data.loader import TensorLoader
from kd_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "KDDataModule",
    "MNISTDataModule",
    "SPLITS",
    "TensorLoader",
]
