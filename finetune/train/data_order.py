"""The order in which a run sees its training data, and its position in it.

Each epoch's order is a pure function of (seed, epoch): the trainer's own sampler (a random
permutation, or GRPO's repeat sampler) drawn from a generator seeded with `seed + epoch`. A
position is therefore two integers, and resuming at one costs no data access: the micro-batches
already consumed are skipped by slicing a list of indices, never by loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

EpochOrder = Callable[[int], list[int]]


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # micro-batches already consumed in `epoch`


def trainer_epoch_order(trainer: Any, dataset: Any, seed: int) -> EpochOrder:
    """The trainer's sampler, re-seeded per epoch (TRL's GRPO sampler groups repeated prompts)."""
    import torch

    from finetune.train.seams.transformers import train_sampler

    def order(epoch: int) -> list[int]:
        sampler = train_sampler(trainer, dataset)
        if hasattr(sampler, "generator"):
            sampler.generator = torch.Generator().manual_seed(seed + epoch)
        return list(iter(sampler))

    return order


def micro_batches(indices: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def epoch_batches(indices: list[int], batch_size: int, drop_last: bool, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Rank `rank`'s micro-batches of an epoch when `world` processes train together, as accelerate
    shards a loader: consecutive micro-batches go to the ranks in turn, and a short last round is
    completed from the epoch's start so that every rank takes the same number of steps."""
    if world == 1:
        return micro_batches(indices, batch_size, drop_last)
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    return list(BatchSamplerShard(BatchSampler(indices, batch_size, drop_last), world, rank, even_batches=True))


class BatchStream:
    """Collated micro-batches of a dataset in epoch order, from a position that can be saved.

    In a gang every rank reads its own share (`shard`: rank, processes); positions count each rank's
    micro-batches, so they are the same on every rank."""

    def __init__(
        self, dataset: Any, collate: Callable[[list[Any]], Any], batch_size: int, drop_last: bool,
        order: EpochOrder, position: DataPosition | None = None, num_workers: int = 0, shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.dataset, self.collate, self.batch_size, self.drop_last = dataset, collate, batch_size, drop_last
        self.order, self.num_workers, self.shard = order, num_workers, shard
        self.position = position or DataPosition()
        self._epoch_batches: list[list[int]] = []
        self._iterator: Iterator[Any] | None = None

    def seek(self, position: DataPosition) -> None:
        self.position = DataPosition(position.epoch, position.batch)
        self._iterator = None

    @property
    def batches_per_epoch(self) -> int:
        self._ensure_epoch()
        return len(self._epoch_batches)

    def _ensure_epoch(self) -> None:
        if self._iterator is None:
            self._epoch_batches = epoch_batches(self.order(self.position.epoch), self.batch_size, self.drop_last, *self.shard)
            if not self._epoch_batches:
                raise ValueError("the training data is smaller than one batch")
            self._iterator = self._loader(self._epoch_batches[self.position.batch :])

    def _loader(self, batches: list[list[int]]) -> Iterator[Any]:
        import torch
        from torch.utils.data import DataLoader

        # A private generator: creating the loader must not draw from the run's global RNG.
        loader = DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(0),
        )
        return iter(loader)

    def next_step(self, accumulation: int) -> list[Any]:
        """The micro-batches of one optimizer step: `accumulation` of them, fewer at the end of an epoch
        (as HF's Trainer does); the next call starts the next epoch."""
        self._ensure_epoch()
        if self.position.batch >= len(self._epoch_batches):
            self.seek(DataPosition(self.position.epoch + 1, 0))
            self._ensure_epoch()
        take = min(accumulation, len(self._epoch_batches) - self.position.batch)
        assert self._iterator is not None
        batches = [next(self._iterator) for _ in range(take)]
        self.position.batch += take
        return batches

    def at_epoch_start(self) -> bool:
        """Whether the next step starts an epoch."""
        return self.position.batch == 0 or self.at_epoch_end()

    def at_epoch_end(self) -> bool:
        """Whether the last step consumed its epoch's last micro-batch."""
        return self.position.batch >= self.batches_per_epoch

    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (HF's `state.epoch`)."""
        return self.position.epoch + self.position.batch / max(1, self.batches_per_epoch)
