"""CIFAR-10 and CIFAR-100 DataModules: one implementation over torchvision's two datasets.

Splits: the official training file is split train/val (0.9/0.1, fixed seed 42, as torch's `random_split`);
the official test file is the test split. Training images are randomly cropped (32, padding 4) and flipped;
val, test and `eval_loader` images are only normalized, with the training set's per-channel mean and std.
Both views of the training file share one in-memory copy of it.

The data comes from `data_dir` (torchvision's layout, `<data_dir>/cifar-10-batches-py/...`), downloaded
there by torchvision when `download=true`. There is no fallback: missing or corrupted files are an error.
"""

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from kd_lightning.data.datamodule import KDDataModule
from kd_lightning.errors import ConfigError, DataError


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_loader_settings(datamodule: Any) -> dict[str, Any]:
    """num_workers, pin_memory, persistent_workers of a DataModule whose loaders decode in workers; those left null
    (None) get defaults for this machine."""
    num_workers = datamodule.num_workers
    if num_workers is None:
        # Every available core, shared by the processes (GPUs) of this machine: one worker crops, flips and
        # normalizes about 2,000 CIFAR images/s per core (measured on a 2-core CPU); a GPU needs many such workers.
        num_workers = max(1, available_cores() // (datamodule.trainer.num_devices if datamodule.trainer else 1))
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available() if datamodule.pin_memory is None else datamodule.pin_memory,
        "persistent_workers": num_workers > 0 if datamodule.persistent_workers is None else datamodule.persistent_workers,
    }


class IndexedSubset(Dataset):
    """Items `(transform(image), label, i)` for the i-th of `indices` in `dataset`.

    `i`, the position in the split, is the index batches carry: per-example side data (a teacher-logit cache)
    built over `eval_loader(split)` is looked up by it, whatever the shuffling.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), label, i


class CIFARDataModule(KDDataModule):
    dataset_cls: type[datasets.CIFAR10] = datasets.CIFAR10
    name = "cifar10"
    num_classes = 10
    input_shape = (3, 32, 32)
    # Per-channel mean and std of the official training set's pixels, scaled to [0, 1].
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    random_augmentation = True  # training inputs are random crops/flips: teacher logits are not cacheable

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        train_val_split: Sequence[float] = (0.9, 0.1),
        split_seed: int = 42,
        seed: int = 0,
        download: bool = True,
        num_classes: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes != self.num_classes:
            raise ConfigError(f"data.num_classes={num_classes} is not accepted: {self.name} has {self.num_classes}")
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_val_split = tuple(train_val_split)
        self.split_seed, self.seed, self.download = split_seed, seed, download
        self.num_workers, self.pin_memory, self.persistent_workers = num_workers, pin_memory, persistent_workers
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        self.train_transform = v2.Compose(
            [v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *normalize]
        )
        self.eval_transform = v2.Compose([v2.ToImage(), *normalize])
        self.source: str | None = None
        self.splits: dict[str, IndexedSubset] = {}  # un-augmented views of train, val and test
        self.train_set: IndexedSubset | None = None  # the augmented view of train
        self._download_error: str | None = None

    # ---- where the data comes from -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download when the files are missing (runs once per node). A failure is kept for `setup` to report."""
        if not self.download:
            return
        try:  # one archive holds both files; train=False reads only the (smaller) test file back
            self.dataset_cls(self.data_dir, train=False, download=True)
        except Exception as err:  # noqa: BLE001 - reported by setup with the files it expected
            self._download_error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        try:
            train_file = self.dataset_cls(self.data_dir, train=True)
            test_file = self.dataset_cls(self.data_dir, train=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            raise DataError(self._missing_message()) from None
        self.source = self.name
        generator = torch.Generator().manual_seed(self.split_seed)
        train_idx, val_idx = (s.indices for s in random_split(range(len(train_file)), self.train_val_split, generator))
        self.train_set = IndexedSubset(train_file, train_idx, self.train_transform)
        self.splits = {
            "train": IndexedSubset(train_file, train_idx, self.eval_transform),
            "val": IndexedSubset(train_file, val_idx, self.eval_transform),
            "test": IndexedSubset(test_file, range(len(test_file)), self.eval_transform),
        }

    def _missing_message(self) -> str:
        folder = self.data_dir / self.dataset_cls.base_folder
        expected = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        expected.append(self.dataset_cls.meta["filename"])
        missing = [name for name in expected if not (folder / name).is_file()]
        if not missing:
            md5s = dict(self.dataset_cls.train_list + self.dataset_cls.test_list)
            md5s[self.dataset_cls.meta["filename"]] = self.dataset_cls.meta["md5"]
            bad = next((name for name, md5 in md5s.items() if not check_integrity(str(folder / name), md5)), None)
            return (
                f"{folder / (bad or '')} is corrupt or truncated (fails torchvision's md5 check): delete it and run "
                f"again with data.download=true to download it"
            )
        reason = self._download_error or ("download disabled (data.download=false)" if not self.download else
                                          "not downloaded: prepare_data() did not run")
        return (
            f"{self.name} not found in data_dir={self.data_dir} ({reason}): expected {folder.name}/ with "
            f"{', '.join(expected)} (missing: {', '.join(missing)}); extract {self.dataset_cls.filename} "
            f"there, or run once with network access and data.download=true"
        )

    # ---- the examples of a split (the KDDataModule contract) ------------------------------------------------
    def data_files(self) -> list[tuple[str, Path]]:
        folder = self.dataset_cls.base_folder
        names = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        return [(f"{folder}/{name}", self.data_dir / folder / name) for name in names]

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return len(self.splits[split])

    def raw_images(self, split: str, indices: Iterable[int]) -> tuple[Tensor, Tensor]:
        self.check_split(split)
        subset = self.splits[split]
        rows = [subset.indices[i] for i in indices]  # torchvision keeps uint8 [N, 32, 32, 3] images in `.data`
        labels = torch.tensor([subset.dataset.targets[r] for r in rows], dtype=torch.long)
        return torch.as_tensor(subset.dataset.data[rows]), labels

    # ---- loaders ---------------------------------------------------------------------------------------------
    def loader_settings(self) -> dict[str, Any]:
        return worker_loader_settings(self)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            # A fixed generator makes the order (and, with workers, their augmentation seeds) a function of `seed`.
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            drop_last=train,  # no ragged last training batch (a batch of 1 would break batch norm)
            **self.loader_settings(),
        )

    def eval_loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """`split` in dataset order, without random augmentation (for teacher-logit caches and influence)."""
        self.check_split(split)
        return self._loader(self.splits[split], batch_size or self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 10 classes (the settings of CIFARDataModule)."""


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 100 (fine) classes."""

    dataset_cls = datasets.CIFAR100
    name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
