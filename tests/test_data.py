"""MNIST-like DataModules: real IDX files through torchvision, the offline fallback, and the missing-data error."""

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import random_split

from fake_data import mnist_sample_order, write_mnist
from kd_lightning.data import FashionMNISTDataModule, MNISTDataModule, TensorLoader
from kd_lightning.data.mnist import SAMPLE_SOURCE, load_mnist_sample


def make(dm_cls=MNISTDataModule, **kwargs) -> MNISTDataModule:
    dm = dm_cls(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_reads_idx_files_through_torchvision(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=400, n_test=100)
    dm = make(data_dir=tmp_path, download=False)
    assert dm.source == "mnist"
    assert {k: len(v[0]) for k, v in dm.splits.items()} == {"train": 320, "val": 80, "test": 100}
    # The test split is the official test file, untouched; train and val partition the training file.
    images, labels = (t[mnist_sample_order()] for t in load_mnist_sample())  # in the files' order
    assert torch.equal(dm.splits["test"][0], images[400:500])
    assert torch.equal(dm.splits["test"][1], labels[400:500])
    # Same split as torch's random_split with generator seed 42.
    train_idx, val_idx = random_split(range(400), [0.8, 0.2], generator=torch.Generator().manual_seed(42))
    assert torch.equal(dm.splits["train"][0], images[list(train_idx)])
    assert torch.equal(dm.splits["val"][1], labels[list(val_idx)])


def test_fashion_mnist_reads_its_own_folder(tmp_path: Path) -> None:
    write_mnist(tmp_path, folder="FashionMNIST", n_train=100, n_test=50)
    dm = make(FashionMNISTDataModule, data_dir=tmp_path, download=False)
    assert dm.source == "fashion_mnist"
    assert len(dm.splits["test"][0]) == 50


def test_batches_are_normalized_and_indexed(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=400, n_test=100)
    dm = make(data_dir=tmp_path, download=False, batch_size=64, eval_batch_size=1000)
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    images, labels = dm.splits["train"]
    torch.testing.assert_close(x, (images[idx].unsqueeze(1).float() / 255 - 0.1307) / 0.3081)
    assert torch.equal(y, labels[idx])
    assert len(dm.val_dataloader()) == 1 and len(dm.test_dataloader()) == 1


def test_fallback_when_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def fail(self) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(MNISTDataModule.dataset_cls, "download", fail)
    with caplog.at_level(logging.WARNING):
        dm = make(data_dir=tmp_path, download=True, offline_fallback=True)
    assert dm.source == SAMPLE_SOURCE
    assert {k: len(v[0]) for k, v in dm.splits.items()} == {"train": 3200, "val": 800, "test": 1000}
    warning = caplog.text
    assert "no route to host" in warning and "NOT comparable with full MNIST" in warning
    # The splits are disjoint and cover the 5,000 digits.
    rows = torch.cat([v[0].reshape(len(v[0]), -1) for v in dm.splits.values()])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(load_mnist_sample()[0].reshape(5000, -1), dim=0))


def test_fallback_split_is_fixed() -> None:
    a, b = make(data_dir="/nonexistent", download=False), make(data_dir="/nonexistent", download=False, seed=7)
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split][1], b.splits[split][1])


def test_missing_data_without_fallback_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make(data_dir=tmp_path, download=False, offline_fallback=False)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and "download disabled" in message


def test_fashion_mnist_has_no_fallback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fashion_mnist not found in .*FashionMNIST/raw"):
        make(FashionMNISTDataModule, data_dir=tmp_path, download=False, offline_fallback=True)


def test_tensor_loader_visits_every_example_once_per_epoch() -> None:
    images, labels = torch.arange(10, dtype=torch.uint8).reshape(10, 1), torch.arange(10)
    loader = TensorLoader(images, labels, batch_size=4, transform=lambda x: x, shuffle=True, seed=3)
    epochs = [torch.cat([idx for _, _, idx in loader]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert len(loader) == 3
    for x, y, idx in loader:
        assert torch.equal(x.squeeze(1).long(), y) and torch.equal(y, idx)


def test_tensor_loader_shards_across_ranks() -> None:
    images, labels = torch.zeros(10, 1), torch.arange(10)
    shards = [
        torch.cat([idx for _, _, idx in TensorLoader(images, labels, 2, lambda x: x, shuffle=True, seed=1, rank=r, world_size=3)])
        for r in range(3)
    ]
    assert all(len(s) == 4 for s in shards)  # 10 padded to 12 by repetition, 4 per rank
    assert set(torch.cat(shards).tolist()) == set(range(10))


@pytest.mark.parametrize("n", [7, 10, 1001])
@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_evaluation_shards_cover_every_example_once(n: int, world_size: int) -> None:
    """Evaluation shards (even_shards=False) over the ranks hold each example exactly once, even when n does not
    divide; training shards (even_shards=True) are padded to the same number of batches on every rank."""
    from kd_lightning.data.loader import TensorLoader

    images, labels = torch.zeros(n, 2, dtype=torch.uint8), torch.arange(n)
    seen, batches = [], []
    for rank in range(world_size):
        shard = TensorLoader(images, labels, 4, lambda x: x.float(), rank=rank, world_size=world_size,
                             even_shards=False)
        seen += [i for _, _, idx in shard for i in idx.tolist()]
        train = TensorLoader(images, labels, 4, lambda x: x.float(), shuffle=True, rank=rank,
                             world_size=world_size, even_shards=True)
        batches.append(len(list(train)))
    assert sorted(seen) == list(range(n))
    assert len(set(batches)) == 1
