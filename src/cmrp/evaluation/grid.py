"""Image grids: one row per prompt, the reference image (if any) first, then the samples — labelled, and
enlarged (nearest neighbour) so that 32 px samples can be looked at."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_image_grid"]

_LABEL_WIDTH = 260  # px of the left column holding each row's label
_HEADER = 22  # px of the top band holding the column labels


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def save_image_grid(rows: list[list[torch.Tensor | None]], path: str | Path, pad: int = 2, min_cell: int = 96,
                    row_labels: list[str] | None = None, col_labels: list[str] | None = None) -> Path:
    """rows: lists of [3, H, W] tensors in [0, 1] (None leaves a blank cell). Each cell is enlarged by a whole
    factor to at least `min_cell` px; `row_labels` (e.g. the prompt) go in a left column, `col_labels` (e.g.
    "reference", "sample 1") above the columns. Saved as PNG."""
    from PIL import Image, ImageDraw

    cells = [c for row in rows for c in row if c is not None]
    if not cells:
        raise ValueError("no images to put in a grid")
    h, w = cells[0].shape[-2:]
    factor = max(1, -(-min_cell // min(h, w)))
    h, w = h * factor, w * factor
    ncol = max(len(r) for r in rows)
    left = _LABEL_WIDTH if row_labels else 0
    top = _HEADER if col_labels else 0
    canvas = np.full((top + (h + pad) * len(rows) + pad, left + (w + pad) * ncol + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            if img is None:
                continue
            arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            arr = arr.repeat(factor, axis=0).repeat(factor, axis=1)
            y, x = top + pad + r * (h + pad), left + pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = arr
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _font()
    for c, label in enumerate(col_labels or []):
        draw.text((left + pad + c * (w + pad) + 4, 4), label, fill=(40, 40, 40), font=font)
    chars = max(10, (_LABEL_WIDTH - 12) // 7)
    for r, label in enumerate(row_labels or []):
        lines = textwrap.wrap(label, chars)[: max(1, h // 16)]
        draw.multiline_text((6, top + pad + r * (h + pad) + 4), "\n".join(lines), fill=(40, 40, 40), font=font,
                            spacing=3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
