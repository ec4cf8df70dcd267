"""One validation of what a reward is called with: images, prompts and group ids.

Every term and `Composite` call `check_inputs` first, so a caller's mistake (0-255 floats, NCHW vs NHWC,
NaN images from a diverged sampler, one prompt too few, group ids of the wrong length) is one
`RewardInputError` naming the argument and the fix, never a silently wrong score. Accepted images: float
`[B,3,H,W]` in [0,1] (values at most 1e-3 outside are clamped) or uint8 in [0,255] (divided by 255).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cmrp.errors import CmrpError

__all__ = ["RANGE_TOLERANCE", "RewardInputError", "check_group_ids", "check_images", "check_inputs", "check_prompts"]

RANGE_TOLERANCE = 1e-3


class RewardInputError(CmrpError, ValueError):
    """A reward was called with inputs that break its contract (shape, dtype, range, counts)."""


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else type(value).__name__


def _range_hint(low: float, high: float) -> str:
    if low >= -RANGE_TOLERANCE and high <= 255 + RANGE_TOLERANCE:
        return "they look like 0-255 pixel values: divide by 255, or pass a uint8 tensor"
    if low >= -1 - RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE:
        return "they look like [-1, 1] values: map them with (x + 1) / 2"
    return "rescale them to [0, 1]"


def check_images(images: Any, where: str) -> torch.Tensor:
    """Float32 `[B,3,H,W]` in [0,1] from a float tensor in [0,1] or a uint8 tensor; anything else raises
    RewardInputError naming `where` and the fix."""
    expected = "a tensor [B,3,H,W]: float in [0,1] or uint8 in [0,255]"
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"{where}: images must be {expected}, got {type(images).__name__} "
                               "(use cmrp.rewards.adapters.to_image_tensor for PIL images, numpy arrays or NHWC)")
    if images.dim() != 4 or images.shape[1] != 3:
        hint = " (channels last: permute(0, 3, 1, 2))" if images.dim() == 4 and images.shape[-1] == 3 else ""
        raise RewardInputError(f"{where}: images must be {expected}, got shape {_shape(images)}{hint}")
    if images.shape[0] == 0:
        raise RewardInputError(f"{where}: images is an empty batch (shape {_shape(images)}); nothing to score")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise RewardInputError(f"{where}: images must be {expected}, got dtype {images.dtype}")
    images = images.float()
    finite = torch.isfinite(images.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero(as_tuple=True)[0].tolist()
        raise RewardInputError(f"{where}: {len(bad)} of {images.shape[0]} images contain NaN or inf values "
                               f"(batch indices {bad[:8]}{', ...' if len(bad) > 8 else ''}); the sampler that "
                               "produced them diverged — check its dtype and step size")
    low, high = images.min().item(), images.max().item()
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise RewardInputError(f"{where}: float images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                               f"{_range_hint(low, high)}")
    return images.clamp(0.0, 1.0) if low < 0 or high > 1 else images


def check_prompts(prompts: Any, batch: int, where: str) -> list[str]:
    """A list of `batch` strings."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise RewardInputError(f"{where}: prompts must be a list of {batch} strings (one per image), "
                               f"got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise RewardInputError(f"{where}: {len(prompts)} prompts for {batch} images; give one prompt per image "
                               "(repeat a prompt for each sample of its group)")
    wrong = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if wrong:
        raise RewardInputError(f"{where}: prompts must be strings, got {type(prompts[wrong[0]]).__name__} "
                               f"at index {wrong[0]}")
    return list(prompts)


def check_group_ids(group_ids: Any, batch: int, where: str) -> torch.Tensor:
    """Integer group ids `[batch]` (equal id = same GRPO group) as a long tensor on the CPU; floats are
    accepted only when every value is a whole number."""
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids
    else:
        try:
            ids = torch.as_tensor(list(group_ids))
        except (TypeError, ValueError, RuntimeError):
            raise RewardInputError(f"{where}: group_ids must be {batch} integers (equal id = same group), "
                                   f"got {type(group_ids).__name__}") from None
    if ids.dim() != 1 or ids.shape[0] != batch:
        raise RewardInputError(f"{where}: group_ids must have shape ({batch},), one id per image, "
                               f"got {_shape(ids)}")
    if ids.is_complex() or ids.dtype == torch.bool or (
            ids.is_floating_point() and not bool((torch.isfinite(ids) & (ids == ids.round())).all())):
        raise RewardInputError(f"{where}: group_ids must be integers, got {ids.dtype} values "
                               f"{ids.flatten()[:4].tolist()} (number the groups 0, 1, 2, ...)")
    return ids.long().cpu()  # integral floats (torch.zeros(B)) are fine


def check_inputs(where: str, images: Any, prompts: Any, group_ids: Any) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The validated `(images float [B,3,H,W] in [0,1], prompts list[str], group_ids long [B])`."""
    images = check_images(images, where)
    batch = images.shape[0]
    return images, check_prompts(prompts, batch, where), check_group_ids(group_ids, batch, where)
