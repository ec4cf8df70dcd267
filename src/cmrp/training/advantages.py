"""Group-relative advantages and the PPO-clipped policy loss of Character-GRPO (pure tensor maths)."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "nan_mean", "nan_std", "ppo_clipped_loss"]


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, std: str = "group", eps: float = 1e-4, clip: float = 5.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """A_i = (r_i - mean of i's group) / (std + eps), clipped to [-clip, clip].

    `std="group"` divides by the group's std, `"global"` by the std of every reward in the batch
    (pass the all-gathered batch under data parallelism). NaN rewards (every term abstained) get
    advantage 0 and are left out of the statistics. Also returns `zero_std_ratio`: the fraction of
    groups whose rewards are all equal, which therefore teach nothing.
    """
    rewards = rewards.float()
    valid = ~torch.isnan(rewards)
    adv = torch.zeros_like(rewards)
    groups = torch.unique(group_ids)
    global_std = rewards[valid].std(unbiased=False) if int(valid.sum()) > 1 else rewards.new_tensor(0.0)
    zero_std = 0
    for g in groups:
        members = (group_ids == g) & valid
        if not bool(members.any()):
            zero_std += 1
            continue
        r = rewards[members]
        group_std = r.std(unbiased=False)
        if float(group_std) == 0.0:
            zero_std += 1
        scale = group_std if std == "group" else global_std
        denom = float(scale) + eps
        adv[members] = (r - r.mean()) / denom if denom > 0 else 0.0
    adv = adv.clamp(-clip, clip)
    return adv, {"zero_std_ratio": zero_std / max(1, len(groups)), "global_std": float(global_std)}


def ppo_clipped_loss(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))) and its diagnostics (ratio, clip fraction, approx KL)."""
    ratio = torch.exp(logprob - old_logprob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio": ratio.detach(),
            "clip_frac": (torch.abs(ratio - 1.0) > clip_range).float().mean(),
            "approx_kl": 0.5 * ((logprob - old_logprob) ** 2).mean(),
        }
    return loss, stats


def nan_mean(x: torch.Tensor) -> float:
    """Mean over the non-NaN entries (abstaining rewards); NaN when there are none."""
    valid = x.float()[~torch.isnan(x.float())]
    return float(valid.mean()) if valid.numel() else float("nan")


def nan_std(x: torch.Tensor) -> float:
    """Population std over the non-NaN entries; 0 with fewer than two."""
    valid = x.float()[~torch.isnan(x.float())]
    return float(valid.std(unbiased=False)) if valid.numel() > 1 else 0.0
