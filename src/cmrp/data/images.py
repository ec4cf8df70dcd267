"""Character images: one guarded way to open a file, and one loader of tensors for references, targets
and shared images.

A PNG of a few kilobytes can declare 100000 x 100000 pixels (a decompression bomb); PIL only warns below
about 180 million pixels. The readers check every image of a character through `open_image` when they
load it (so training never meets one), and `load_images` opens through it too: it looks at the declared
size before any pixel is decoded and refuses more than `MAX_PIXELS`, naming the file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmrp.data.character import ImageRef
from cmrp.errors import DataError

__all__ = ["MAX_PIXELS", "ImageTooLarge", "load_images", "open_image"]

MAX_PIXELS = 8192 * 8192  # an 8K square; training resizes to a few hundred pixels anyway


class ImageTooLarge(DataError):
    """An image declares more pixels than cmrp reads; `reason` is the message without the file name."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Any]:
    """`PIL.Image.open(path)` with its header checked: `ImageTooLarge` (a DataError naming the file) when it
    declares more than MAX_PIXELS pixels; PIL's own decompression-bomb warning is replaced by that message."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageTooLarge(path, f"declares more than {MAX_PIXELS} pixels, more than cmrp reads (a "
                                "decompression bomb, or an image to downscale)") from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageTooLarge(path, f"{width} x {height} pixels, more than the {MAX_PIXELS} cmrp reads; "
                                "downscale it (e.g. to 1024 pixels on the long side)")
        yield image


def load_images(refs: list[ImageRef], size: tuple[int, int]):
    """[N, 3, H, W] float tensor in [0, 1], every image resized to `size` (H, W) so metrics and rewards
    compare like with like; an unreadable file is a DataError naming it."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    out = []
    for ref in refs:
        try:
            with open_image(ref.path) as img:
                img = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
                out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{ref.path}: cannot read image ({type(err).__name__}); replace or remove it") from None
    return torch.stack(out) if out else torch.zeros(0, 3, *size)
