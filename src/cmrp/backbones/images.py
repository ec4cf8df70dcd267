"""Images as the backbones take them: [3, H, W] float tensors in [0, 1] at the adapter's size, read once.

One loader for every adapter (BAGEL, Janus, Show-o): a fixed square size, or BAGEL's aspect-keeping
understanding transform (`variable`)."""

from __future__ import annotations

from pathlib import Path

import torch

from cmrp.data.tasks import Segment
from cmrp.errors import DataError

__all__ = ["ImageLoader"]


class ImageLoader:
    """Loads images as [3, S, S] float tensors in [0, 1], resized to the backbone's size; cached.

    With `variable=(min_side, max_side, stride)` images keep their aspect ratio instead (BAGEL's
    understanding transform): scaled so the long side is at most `max_side` and the short side at least
    `min_side`, each side rounded to a multiple of `stride` (the ViT patch size)."""

    def __init__(self, size: int, variable: tuple[int, int, int] | None = None):
        self.size = size
        self.variable = variable
        self._cache: dict[Path, torch.Tensor] = {}

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) an image of size h x w is resized to."""
        if self.variable is None:
            return self.size, self.size
        lo, hi, stride = self.variable
        scale = min(hi / max(h, w), 1.0)
        scale = max(scale, lo / min(h, w))
        h2, w2 = (max(stride, int(round(round(side * scale) / stride)) * stride) for side in (h, w))
        return min(h2, hi // stride * stride), min(w2, hi // stride * stride)

    def __call__(self, source: Path | Segment) -> torch.Tensor:
        """An image from a path, or a segment's in-memory pixels (e.g. a generated image)."""
        if isinstance(source, Segment):
            if source.pixels is not None:
                return self._resize(source.pixels)
            source = source.image
        path = source
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                th, tw = self.target_size(img.height, img.width)
                img = img.convert("RGB").resize((tw, th), Image.Resampling.BICUBIC)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: cannot read image ({err}); replace or remove the file") from None
        tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        self._cache[path] = tensor
        return tensor

    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.detach().float().cpu().clamp(0, 1)
        target = self.target_size(*pixels.shape[-2:])
        if tuple(pixels.shape[-2:]) != target:
            pixels = torch.nn.functional.interpolate(
                pixels[None], size=target, mode="bicubic", align_corners=False
            )[0].clamp(0, 1)
        return pixels
