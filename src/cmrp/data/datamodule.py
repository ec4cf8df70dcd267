"""A Lightning DataModule over a character's task mix.

The mix is drawn once, deterministically from the seed: `steps * batch_size` examples, each task
picked with its recipe weight. The backbone's `collate` turns examples into tensors, so this
module stays model-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cmrp.data.tasks import Example, shuffled_mix

__all__ = ["RankBatches", "TaskMixDataModule"]


class RankBatches(DistributedSampler):
    """A rank's share of a sequence read in global batches of `world` consecutive batches: the `rank`-th
    batch of each, in order. So `world` ranks see together, per step, exactly what one process accumulating
    `world` batches sees, and a resumed run (which skips whole global batches) replays the same data.
    A DistributedSampler so Lightning keeps it: its own would reshuffle the (already seeded) order."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False)
        n, span = len(dataset), batch_size * world
        if n % span:
            raise ValueError(f"{n} items do not fill whole global batches of {world} x {batch_size}")
        self.indices = [start + rank * batch_size + i for start in range(0, n, span) for i in range(batch_size)]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _ListDataset(Dataset):
    def __init__(self, items: list[Example]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example:
        return self.items[index]


class TaskMixDataModule(L.LightningDataModule):
    def __init__(
        self,
        examples: dict[str, list[Example]],
        weights: dict[str, float],
        collate_fn: Callable[[list[Example]], object],
        *,
        steps: int,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        skip_batches: int = 0,
    ):
        super().__init__()
        self.examples = examples
        self.weights = weights
        self.collate_fn = collate_fn
        self.steps = steps
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.skip_batches = skip_batches  # batches (of every rank) already trained on by a resumed run

    def task_counts(self) -> dict[str, int]:
        return {task: len(items) for task, items in self.examples.items()}

    def train_dataloader(self) -> DataLoader:
        """`steps` counts the batches of every rank: each rank reads its `RankBatches` share of the mix."""
        mix = shuffled_mix(self.examples, self.weights, self.steps * self.batch_size, self.seed)
        dataset = _ListDataset(mix[self.skip_batches * self.batch_size:])
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # already a seeded random draw; keeping order makes resumption exact
            sampler=RankBatches(dataset, self.batch_size, rank, world),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
