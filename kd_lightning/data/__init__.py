"""LightningDataModules. Batches are `(inputs, labels, dataset_indices)`."""

from kd_lightning.data.loader import TensorLoader
from kd_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = ["FashionMNISTDataModule", "MNISTDataModule", "TensorLoader"]
