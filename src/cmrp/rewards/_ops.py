"""Small tensor helpers shared by the reward terms (torch only, no model libraries)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.registry import FEATURE_MODELS

__all__ = [
    "IdentityCache",
    "cosine_matrix",
    "fit_square",
    "module_device",
    "named_feature_model",
    "nan_stats",
    "normalise",
    "reason",
]


def reason(err: BaseException) -> str:
    """`Type: first line of the message` without a trailing full stop, to embed in a sentence."""
    text = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def named_feature_model(name: str, term: str, kwarg: str) -> Callable[[], Any]:
    """The loader of the feature net registered as `name` in `cmrp.registry.FEATURE_MODELS` (e.g.
    `sandbox-clip`): a term's `kwarg` may be such a name instead of an object. An unknown name raises
    ConfigError (with the closest known name) when the term is built, before any weights load."""
    return FEATURE_MODELS.get(name, where=f"{term} kwarg `{kwarg}`")


def fit_square(images: torch.Tensor, size: int, mode: str = "shortest", interpolation: str = "bicubic",
               crop: int | None = None):
    """Resize a batch to `size`x`size` the way image preprocessors do, without going through PIL.

    `shortest`: scale the short side to `size`, then centre-crop `crop`x`crop` (default `size`; DINOv2's
    processor resizes to 256 and crops 224); `squash`: resize both sides; `longest`: scale the long side
    to `size`, then pad with zeros (centred).
    """
    height, width = images.shape[-2:]
    if mode == "squash":
        out_hw = (size, size)
    else:
        ratio = size / (min(height, width) if mode == "shortest" else max(height, width))
        out_hw = (max(size, round(height * ratio)), max(size, round(width * ratio)))
        if mode == "longest":
            out_hw = (min(size, round(height * ratio)), min(size, round(width * ratio)))
    if (height, width) != out_hw:
        antialias = interpolation in ("bilinear", "bicubic")
        images = F.interpolate(
            images, size=out_hw, mode=interpolation, antialias=antialias, align_corners=False
        )
        images = images.clamp(0.0, 1.0)
    height, width = images.shape[-2:]
    if mode == "longest":
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(images, (left, size - width - left, top, size - height - top))
    side = min(crop or size, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[..., top : top + side, left : left + side]


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Channel-wise `(x - mean) / std`."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[A,B]` cosine similarities between rows of `a` `[A,D]` and `b` `[B,D]`."""
    a = F.normalize(a.float().flatten(1), dim=-1)
    b = F.normalize(b.float().flatten(1), dim=-1).to(a.device)
    return a @ b.T


def module_device(obj: Any) -> torch.device | None:
    """The device of an `nn.Module`'s first parameter (None for plain callables or parameterless nets)."""
    if isinstance(obj, torch.nn.Module):
        for tensor in obj.parameters():
            return tensor.device
    return None


def nan_stats(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and population std over the non-NaN entries; NaN when every entry is NaN."""
    values = scores.detach().float().flatten()
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return math.nan, math.nan
    return values.mean().item(), values.std(unbiased=False).item()


class IdentityCache:
    """Remembers one computed value per tensor object, so reference features are computed once per
    context rather than every call. Keyed on the tensor's identity and version counter (an in-place
    edit invalidates it); holds a strong reference to the last few tensors only."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: list[tuple[torch.Tensor, int, Any]] = []
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        with self._lock:
            for key, version, value in self._entries:
                if key is tensor and version == tensor._version:
                    return value
        value = compute(tensor)
        with self._lock:
            self._entries = [e for e in self._entries if e[0] is not tensor][-(self.size - 1) :]
            self._entries.append((tensor, tensor._version, value))
        return value

    def __len__(self) -> int:
        return len(self._entries)
