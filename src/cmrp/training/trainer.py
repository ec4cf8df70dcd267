"""Trainer setup shared by the stages and the run: which process writes, and the Lightning strategy for a
recipe's `trainer.strategy`."""

from __future__ import annotations

from cmrp.backbones.protocol import Backbone, SupportsFSDP, require

__all__ = ["is_main_process", "trainer_strategy"]


def is_main_process() -> bool:
    """Rank 0 of a distributed run (or the only process): the one that writes files and prints."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def trainer_strategy(name: str, adapter: Backbone | None = None):
    """`ddp` with unused-parameter detection: a task mix leaves an expert (ViT, generation) idle in some
    batches, which plain DDP rejects. `fsdp`: FSDP2 (`cmrp.training.sharding`), one unit per module class
    the adapter names (`fsdp_wrap_modules()`, e.g. BAGEL's decoder layer) plus the root. Other names go to
    Lightning as they are (`cmrp validate` has checked them: no `deepspeed*`). Without `adapter` (a dry plan):
    FSDP with the root unit only."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    if name == "fsdp":
        from cmrp.training.sharding import ShardedStrategy

        if adapter is None:
            return ShardedStrategy(wrap_modules=())
        sharded = require(adapter, SupportsFSDP, feature="trainer.strategy: fsdp")
        return ShardedStrategy(wrap_modules=sharded.fsdp_wrap_modules())
    return name
