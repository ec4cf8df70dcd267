"""`brightness`: a sanity/debug reward for checking that an optimiser moves images at all."""

from __future__ import annotations

import torch

from cmrp.registry import REWARDS
from cmrp.rewards.base import RewardContext, RewardOutput
from cmrp.rewards.inputs import check_inputs

__all__ = ["Brightness", "luminance"]


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Mean Rec. 601 luma `0.299 R + 0.587 G + 0.114 B` per image, `[B]` in [0,1]."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1).flatten(1).mean(dim=1)


@REWARDS.register("brightness")
class Brightness:
    """Mean luminance of the image, or `-|luminance - target|` when `target` is given.

    Not a character reward: it is trivially learnable, so GRPO on it should brighten (or steer to
    `target`) the samples within a few steps — a quick check that rewards, advantages and the
    optimiser are wired up correctly (`rewards: brightness`).
    """

    def __init__(self, *, target: float | None = None):
        self.target = None if target is None else float(target)

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        prompts: list[str],
        *,
        group_ids: torch.Tensor,
        context: RewardContext | None = None,
    ) -> RewardOutput:
        images, prompts, group_ids = check_inputs("brightness", images, prompts, group_ids)
        lum = luminance(images)
        scores = lum if self.target is None else -(lum - self.target).abs()
        return RewardOutput(scores.float(), {"luminance": lum.mean().item()})
