"""Adapter to the Flow-GRPO reward callable shape `fn(images, prompts, metadata) -> (scores, info)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cmrp.rewards.base import Reward, RewardContext

__all__ = ["as_flow_grpo", "group_ids_from", "to_image_tensor"]


def _channels_last(shape: Sequence[int]) -> bool:
    """Whether `[..., a, b, c]` is HWC rather than CHW (3 channels decide first, then grey/RGBA)."""
    if shape[-3] == 3:
        return False
    if shape[-1] == 3:
        return True
    return shape[-3] not in (1, 4) and shape[-1] in (1, 4)


def _as_tensor(data: Any) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data))


def _one_to_chw(image: Any) -> torch.Tensor:
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, without importing PIL
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    tensor = _as_tensor(image)
    if tensor.dim() != 3:
        raise ValueError(f"expected an image with 3 dimensions (HWC or CHW), got shape {tuple(tensor.shape)}")
    return tensor.permute(2, 0, 1) if _channels_last(tensor.shape) else tensor


def to_image_tensor(images: Any) -> torch.Tensor:
    """Float `[B,3,H,W]` in [0,1] from a float tensor in [0,1], a uint8 tensor/array (NHWC or NCHW), a
    float array, or a list of PIL images / per-image arrays. Grey images are repeated to 3 channels,
    alpha is dropped."""
    if isinstance(images, list | tuple):
        images = torch.stack([_one_to_chw(image) for image in images])
    elif isinstance(images, np.ndarray):
        images = _as_tensor(images)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected a batch of images [B,3,H,W] or [B,H,W,3], got {got}")
    if _channels_last(images.shape):
        images = images.permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    else:
        images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 4:
        images = images[:, :3]
    return images.contiguous()


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def group_ids_from(
    prompts: Sequence[str], metadata: Sequence[Any] | None, key: str = "group_id"
) -> torch.Tensor:
    """Group ids `[B]` from `metadata[i][key]` when every item has it, else by identical prompt."""
    if metadata and len(metadata) == len(prompts) and all(isinstance(m, dict) and key in m for m in metadata):
        labels = [_hashable(m[key]) for m in metadata]
    else:
        labels = list(prompts)
    seen: dict[Any, int] = {}
    return torch.tensor([seen.setdefault(label, len(seen)) for label in labels], dtype=torch.long)


def as_flow_grpo(
    reward: Reward, *, context: RewardContext | None = None, group_key: str = "group_id"
) -> Callable[..., tuple[np.ndarray, dict[str, Any]]]:
    """Wrap a cmrp reward as Flow-GRPO's `fn(images, prompts, metadata, **kwargs) -> (scores, info)`.

    `scores` is a float32 numpy array `[B]` (NaN where every term abstained). `context` is the
    `RewardContext` passed on every call (a `context=` keyword overrides it per call); the call's
    metadata is put into it when it has none. Other keyword arguments are ignored.
    """

    def fn(images: Any, prompts: Sequence[str], metadata: Sequence[Any] | None = None, **kwargs: Any):
        batch = to_image_tensor(images)
        prompts = list(prompts)
        if len(prompts) != batch.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {batch.shape[0]} images")
        ctx = kwargs.get("context") or context or RewardContext()
        if ctx.metadata is None and metadata is not None:
            ctx = dataclasses.replace(ctx, metadata=list(metadata))
        out = reward(batch, prompts, group_ids=group_ids_from(prompts, metadata, group_key), context=ctx)
        return out.scores.detach().float().cpu().numpy(), out.info

    return fn
