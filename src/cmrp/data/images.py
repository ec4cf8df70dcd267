"""Character images as tensors: one loader for references, targets and shared images."""

from __future__ import annotations

from cmrp.data.character import ImageRef
from cmrp.errors import DataError

__all__ = ["load_images"]


def load_images(refs: list[ImageRef], size: tuple[int, int]):
    """[N, 3, H, W] float tensor in [0, 1], every image resized to `size` (H, W) so metrics and rewards
    compare like with like; an unreadable file is a DataError naming it."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    out = []
    for ref in refs:
        try:
            with Image.open(ref.path) as img:
                img = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
                out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{ref.path}: cannot read image ({type(err).__name__}); replace or remove it") from None
    return torch.stack(out) if out else torch.zeros(0, 3, *size)
