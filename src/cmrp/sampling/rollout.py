"""What a backbone's `sample_images` returns: images plus what GRPO needs to recompute log-probs.

GRPO is written once over Rollouts. A rollout's trainable "steps" depend on the image head:
- flow heads: the SDE window's transitions (`FlowTrajectory`), each a Gaussian step;
- token heads: groups of image tokens (`TokenTrajectory`): an autoregressive head's chunk of
  positions, or one MaskGIT step's newly decided positions; each step's log-prob is the mean
  log-prob of its tokens under the sampling distribution (CFG, temperature and top-k included).
Only `Rollout.step_kl` (the KL-to-reference term) differs by head kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cmrp.sampling.flow import FlowTrajectory

__all__ = ["Rollout", "TokenTrajectory"]


@dataclass
class TokenTrajectory:
    """Sampled image tokens and, for the stored (trainable) steps, which positions each decided."""

    tokens: torch.Tensor  # [B, L] long: every image token of each sample
    steps: torch.Tensor  # [B, K, L] bool: the positions decided by stored step k
    logprobs: torch.Tensor  # [B, K] fp32: mean log-prob of step k's tokens when sampled


@dataclass
class Rollout:
    """`n` samples per context, sample i of context c at index c*n + i (group id c).

    `trajectory` holds the stored steps (empty when none were trained); `state` is the adapter's
    own (e.g. the encoded prefix shared by a group), opaque to everyone else.
    """

    images: torch.Tensor  # [B, 3, H, W] in [0, 1], on the CPU
    group_ids: torch.Tensor  # [B] long
    trajectory: FlowTrajectory | TokenTrajectory | None = None
    eta: float = 0.0
    kind: str = "sde"
    t_cap: float = 0.99
    state: Any = None

    @property
    def num_steps(self) -> int:
        """Number of stored (trainable) steps per sample."""
        return 0 if self.trajectory is None else self.trajectory.logprobs.shape[1]

    @property
    def logprobs(self) -> torch.Tensor:
        """[B, num_steps] log-prob of each stored step when it was sampled (GRPO's old policy)."""
        if self.trajectory is None:
            return torch.zeros(len(self), 0)
        return self.trajectory.logprobs

    def step_kl(self, current: tuple, reference: tuple) -> torch.Tensor:
        """[B] KL estimate between the current and the reference policy at one stored step, from what
        the adapter's `rollout_logprob(..., return_mean=True)` returned under each.

        Flow heads return (logp, mean, std): the KL of two Gaussians with the same std,
        |mean - ref_mean|² / (2 std²), averaged over dimensions. Token heads return (logp,
        token_logp [B, L], positions [B, L] bool): the k3 estimator exp(r) - r - 1 with
        r = ref_logp - logp per sampled token (unbiased, always >= 0), averaged over the step's positions.
        """
        if isinstance(self.trajectory, TokenTrajectory):
            _, token_logp, positions = current
            r = (reference[1] - token_logp).float()
            k3 = (torch.exp(r) - r - 1) * positions
            return k3.sum(1) / positions.sum(1).clamp(min=1)
        _, mean, std = current
        ref_mean = reference[1]
        return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)

    def __len__(self) -> int:
        return self.images.shape[0]
