"""A Lightning DataModule over a character's task mix.

The mix is drawn once, deterministically from the seed: `steps * batch_size` examples, each task
picked with its recipe weight. The backbone's `collate` turns examples into tensors, so this
module stays model-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader, Dataset

from cmrp.data.tasks import Example, shuffled_mix

__all__ = ["TaskMixDataModule"]


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
        mix = shuffled_mix(self.examples, self.weights, self.steps * self.batch_size, self.seed)
        return DataLoader(
            _ListDataset(mix[self.skip_batches * self.batch_size:]),
            batch_size=self.batch_size,
            shuffle=False,  # already a seeded random draw; keeping order makes resumption exact
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
