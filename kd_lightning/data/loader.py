"""Batches straight from tensors held in memory, in the manner of airbench: no per-item transforms, no workers.

Per batch the loader gathers rows of one uint8 tensor by index and normalizes them in one vectorized call,
which costs microseconds where a torchvision Dataset + DataLoader spends milliseconds on PIL conversions.
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


class TensorLoader:
    """Iterates over `(inputs, labels, indices)` batches of in-memory tensors.

    `indices` are the examples' positions in `images`, so per-example side data (a teacher-logit cache)
    is looked up by them and can never be misaligned by shuffling. Shuffled order is a fixed function of
    `seed` and the epoch; under DDP each rank takes an interleaved shard of the same permutation (padded
    by repetition to equal length, as torch's DistributedSampler does).
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
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        self.images, self.labels = images, labels
        self.batch_size, self.transform = batch_size, transform
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def _num_examples(self) -> int:
        """Examples this rank sees per epoch."""
        return -(-len(self.images) // self.world_size)

    def __len__(self) -> int:
        n = self._num_examples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> Tensor:
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            padded = self._num_examples() * self.world_size
            order = torch.cat([order, order[: padded - n]])[self.rank :: self.world_size]
        return order.to(self.images.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._order(self.epoch)
        self.epoch += 1
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.transform(self.images.index_select(0, idx)), self.labels.index_select(0, idx), idx
