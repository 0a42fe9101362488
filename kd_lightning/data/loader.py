"""Batches straight from tensors held in memory, in the manner of airbench: no per-item transforms, no workers.

Per batch the loader gathers rows of one uint8 tensor by index and normalizes them in one vectorized call,
which costs microseconds where a torchvision Dataset + DataLoader spends milliseconds on PIL conversions.
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# (epoch, batches of it already trained on): where a fit stands, read when an epoch's iteration starts
Progress = Callable[[], tuple[int, int]]


class TensorLoader:
    """Iterates over `(inputs, labels, indices)` batches of in-memory tensors.

    `indices` are the examples' positions in `images`, so per-example side data (a teacher-logit cache, CRD's
    memory bank) is looked up by them and can never be misaligned by shuffling (the KDDataModule contract,
    kd_lightning/data/datamodule.py, for training batches as for evaluation ones). The shuffled order is a fixed function of
    `seed` and the epoch. With `progress` (given for training) the epoch and the number of batches to skip are
    read from the fit itself when iteration starts, so a fit resumed mid-epoch continues with the same
    permutation at the first batch it has not trained on. Under DDP each rank takes an interleaved shard of
    the permutation; `even_shards` pads it by repetition to equal length (as torch's DistributedSampler does:
    training needs the same number of steps on every rank), otherwise shards differ by at most one example
    (evaluation: every example counted once).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        transform: Callable[[Tensor], Tensor],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        progress: Progress | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        self.images, self.labels = images, labels
        self.batch_size, self.transform = batch_size, transform
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        self.progress = progress
        self.epoch = 0  # without `progress`: counts iterations

    def _num_examples(self) -> int:
        """Examples this rank sees per epoch."""
        n = len(self.images)
        if self.even_shards:
            return -(-n // self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return -(-self._num_examples() // self.batch_size)

    def _order(self, epoch: int) -> Tensor:
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.even_shards:
                order = torch.cat([order, order[: self._num_examples() * self.world_size - n]])
            order = order[self.rank :: self.world_size]
        return order.to(self.images.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self.progress is not None:
            epoch, skip = self.progress()
        else:
            epoch, skip = self.epoch, 0
            self.epoch += 1
        order = self._order(epoch)
        for b in range(skip, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.transform(self.images.index_select(0, idx)), self.labels.index_select(0, idx), idx
