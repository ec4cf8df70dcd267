"""Image grids: one row per prompt, the reference image (if any) first, then the samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["save_image_grid"]


def save_image_grid(rows: list[list[torch.Tensor | None]], path: str | Path, pad: int = 2, scale: int = 2) -> Path:
    """rows: lists of [3, H, W] tensors in [0, 1] (None leaves a blank cell). Saved as PNG."""
    from PIL import Image

    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("no images to put in a grid")
    h, w = cells[0].shape[-2:]
    ncol = max(len(r) for r in rows)
    canvas = np.full(((h + pad) * len(rows) + pad, (w + pad) * ncol + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            if img is None:
                continue
            arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = arr
    image = Image.fromarray(canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
