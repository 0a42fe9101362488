"""The contract every DataModule of this project keeps, written once.

Callers (train.py, the teacher-logit cache in teacher.py, the influence CLI and its figures) use only what is
declared here, never how a DataModule stores its examples, so they work on every dataset without branching:

- `name`, `num_classes`, `input_shape` (one example's tensor shape, C×H×W), `mean`, `std`: what the dataset is
  (class attributes; eval.py checks a checkpoint's net against `input_shape` and `num_classes`);
- `random_augmentation`: whether training inputs are random views of an example (then the teacher's outputs on
  training batches cannot be cached; the un-augmented `eval_loader` views always can);
- `source`: which data `setup()` actually loaded (`mnist`, `mnist-sample-5k`, `cifar10`, ...), recorded with
  every result;
- per split (`train`, `val`, `test`): `split_size(split)`, `raw_images(split, indices)` (the stored pixels, for
  figures and files) and `eval_loader(split)` (the split in dataset order, un-augmented, batches
  `(inputs, labels, dataset_indices)`);
- training batches (`train_dataloader()`) are `(inputs, labels, dataset_indices)` too, the indices being the
  examples' positions in the train split (in `range(split_size("train"))`, as `eval_loader("train")` and
  `raw_images("train", ...)` index them), whatever the shuffling, augmentation or DDP sharding: per-example
  state kept across steps (a teacher-logit cache, CRD's memory bank) is looked up and updated by them;
  `split_labels(split)` gives the labels of a whole split in that order;
- `cache_identity()`: what fixes every split's examples and un-augmented inputs, the key of per-example caches
  and (through the teacher's data identity) of the teacher cache. It includes `content`, the fingerprint of the
  files `setup()` read (`data_files()`, see kd_lightning/data/fingerprint.py), so that other files of the same
  count and shape never reuse a cache built on the old ones.

How a DataModule stores its splits (`splits`: tensors for MNIST, dataset views for CIFAR) is its own business.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from kd_lightning.data.fingerprint import files_digest

SPLITS = ("train", "val", "test")
LABEL_CHUNK = 4096  # examples read at a time by split_labels (a CIFAR chunk's pixels: 12 MB)


class KDDataModule(pl.LightningDataModule):
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float | tuple[float, ...]  # per-channel statistics the inputs are standardized with
    std: float | tuple[float, ...]
    random_augmentation: bool
    split_seed: int
    train_val_split: tuple[float, ...]
    source: str | None  # set by setup()

    def split_size(self, split: str) -> int:
        """The number of examples in `split` (after setup)."""
        raise NotImplementedError

    def raw_images(self, split: str, indices: Iterable[int]) -> tuple[Tensor, Tensor]:
        """The stored uint8 images ([n, H, W] grey or [n, H, W, 3] colour) and int64 labels of `split`'s examples
        at `indices` (dataset order, as `eval_loader` batches index them)."""
        raise NotImplementedError

    def eval_loader(self, split: str, batch_size: int | None = None) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        """`split` in dataset order, without random augmentation (for teacher-logit caches and influence)."""
        raise NotImplementedError

    def split_labels(self, split: str) -> Tensor:
        """The int64 labels of every example of `split`, in dataset order (the order batch indices refer to).
        Read through `raw_images` in chunks, so a DataModule needs nothing more; override it where cheaper."""
        n = self.split_size(split)
        chunks = [self.raw_images(split, range(start, min(start + LABEL_CHUNK, n)))[1]
                  for start in range(0, n, LABEL_CHUNK)]
        return torch.cat(chunks).long() if chunks else torch.zeros(0, dtype=torch.long)

    def data_files(self) -> list[tuple[str, Path]]:
        """The files `setup()` read, as `(stable name, path)` pairs (after setup)."""
        raise NotImplementedError

    def content_fingerprint(self) -> str:
        """sha256 over the content of `data_files()` (memoized by path, size and mtime)."""
        if getattr(self, "_content_fingerprint", None) is None:
            self._content_fingerprint = files_digest(self.data_files(), hash_content=getattr(self, "hash_content", True))
        return self._content_fingerprint

    def cache_identity(self) -> dict:
        """What fixes every split's examples and un-augmented inputs: the key of caches of per-example outputs."""
        return {
            "content": self.content_fingerprint(),
            "datamodule": type(self).__name__,
            "source": self.source,
            "split_seed": self.split_seed,
            "train_val_split": list(self.train_val_split),
            "normalize": [_as_json(self.mean), _as_json(self.std)],
            "sizes": {split: self.split_size(split) for split in SPLITS},
        }

    @staticmethod
    def check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not a split; expected one of {SPLITS}")


def _as_json(value: float | Sequence[float]) -> float | list[float]:
    return value if isinstance(value, float) else list(value)
