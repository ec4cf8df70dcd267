"""What a backbone's `sample_images` returns: images plus what GRPO needs to recompute log-probs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cmrp.sampling.flow import FlowTrajectory

__all__ = ["Rollout"]


@dataclass
class Rollout:
    """`n` samples per context, sample i of context c at index c*n + i (group id c).

    `trajectory` holds the SDE window's transitions (empty when sampled by ODE only); `state` is
    the adapter's own (e.g. the encoded prefix shared by a group), opaque to everyone else.
    """

    images: torch.Tensor  # [B, 3, H, W] in [0, 1], on the CPU
    group_ids: torch.Tensor  # [B] long
    trajectory: FlowTrajectory | None = None
    eta: float = 0.0
    kind: str = "sde"
    t_cap: float = 0.99
    state: Any = None

    @property
    def num_steps(self) -> int:
        """Number of stored (trainable) transitions per sample."""
        return 0 if self.trajectory is None else self.trajectory.times.shape[0]

    def __len__(self) -> int:
        return self.images.shape[0]
