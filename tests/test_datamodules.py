"""The KDDataModule contract, checked the same way on every DataModule: what callers (the teacher-logit cache,
the influence CLI and its figures) read is the same for MNIST-like and CIFAR data."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fake_data import write_mnist
from kd_lightning.data import (
    SPLITS,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    KDDataModule,
    MNISTDataModule,
)
from kd_lightning.influence.compare import ImageSource


def mnist(root: Path) -> MNISTDataModule:
    write_mnist(root, n_train=100, n_test=30)
    return MNISTDataModule(data_dir=root, download=False, eval_batch_size=16)


def fashion(root: Path) -> FashionMNISTDataModule:
    write_mnist(root, folder="FashionMNIST", n_train=100, n_test=30)
    return FashionMNISTDataModule(data_dir=root, download=False, eval_batch_size=16)


def cifar10(root: Path) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=root, download=False, num_workers=0, eval_batch_size=16)


def cifar100(root: Path) -> CIFAR100DataModule:
    return CIFAR100DataModule(data_dir=root, download=False, num_workers=0, eval_batch_size=16)


def standardized(raw: Tensor, dm: KDDataModule) -> Tensor:
    """uint8 [n, H, W] or [n, H, W, C] -> float [n, C, H, W] standardized: the inputs eval_loader must yield."""
    chw = raw.unsqueeze(1) if raw.dim() == 3 else raw.permute(0, 3, 1, 2)
    mean = torch.tensor(dm.mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(dm.std, dtype=torch.float32).reshape(-1, 1, 1)
    return (chw.float() / 255 - mean) / std


@pytest.mark.parametrize("make", [mnist, fashion, cifar10, cifar100])
def test_every_datamodule_keeps_the_contract(make, cifar_root: Path) -> None:
    dm = make(cifar_root)
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm, KDDataModule) and dm.source == dm.name
    assert isinstance(dm.random_augmentation, bool) and dm.num_classes in (10, 100)
    for split in SPLITS:
        x, y, idx = (torch.cat(parts) for parts in zip(*dm.eval_loader(split)))
        n = dm.split_size(split)
        assert n > 0 and torch.equal(idx, torch.arange(n))  # every example once, in dataset order
        images, labels = dm.raw_images(split, range(n))
        assert images.dtype == torch.uint8 and len(images) == n and labels.dtype == torch.int64
        assert torch.equal(labels, y)
        torch.testing.assert_close(x, standardized(images, dm))
        some = [n - 1, 0, n // 2]  # any order, repeats allowed
        assert torch.equal(dm.raw_images(split, some)[0], images[some])
        shown, shown_labels = ImageSource(dm)(split, some)
        assert shown.dtype == torch.float32 and 0 <= shown.min() and shown.max() <= 1
        assert torch.equal(shown, images[some].float() / 255) and torch.equal(shown_labels, labels[some])
    with pytest.raises(ValueError, match="'training' is not a split"):
        dm.eval_loader("training")


@pytest.mark.parametrize(("make", "digest"), [
    (mnist, "6088b0ce82c23526"),  # since the identity holds the files' content fingerprint (issue 25.4) and the fake files are stratified
    (cifar10, "e409fe065e127948"),
])
def test_cache_identity_is_unchanged_by_the_contract(make, digest: str, cifar_root: Path) -> None:
    """The teacher-logit cache is keyed by the sha256 of cache_identity(): the values written before the
    content fingerprint was added (a refactor must not orphan or, worse, alias cached logits)."""
    dm = make(cifar_root)
    dm.prepare_data()
    dm.setup("fit")
    identity = dm.cache_identity()
    assert identity["sizes"] == {split: dm.split_size(split) for split in SPLITS}
    assert hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16] == digest
