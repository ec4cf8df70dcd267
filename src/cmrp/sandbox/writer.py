"""Writes a sandbox character to disk in the native format, rendering its images as PNGs.

The sandbox goes through the same files as real data, so the quickstart and the tests exercise
the native reader and validator too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cmrp.data.character import Character
from cmrp.data.native import read_character, write_character
from cmrp.sandbox.renderer import render
from cmrp.sandbox.world import build_character

__all__ = ["make_character", "write_sandbox_character"]


def write_sandbox_character(
    seed: int, out_dir: Path | str, *, n_reference_images: int = 10, n_scenes: int = 160, image_size: int = 32
) -> Path:
    """Generate the character for `seed` into `out_dir` (native format); returns the directory."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    out = Path(out_dir).expanduser().resolve()
    character = build_character(seed, out, n_reference_images=n_reference_images, n_scenes=n_scenes)
    for split in (character.train, character.test):
        for image in split.images.values():
            image.path.parent.mkdir(parents=True, exist_ok=True)
            render(image.attributes, image_size).save(image.path, format="PNG")
    return write_character(character, out)


def make_character(
    seed: int,
    *,
    n_reference_images: int = 10,
    n_scenes: int = 160,
    image_size: int = 32,
    out_dir: Path | str | None = None,
) -> Character:
    """The sandbox character for `seed`, read back from disk. Images need files: without `out_dir`
    they go to a new temporary directory, which is kept because the returned paths point into it."""
    target = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"cmrp-sandbox-{seed}-"))
    path = write_sandbox_character(
        seed, target, n_reference_images=n_reference_images, n_scenes=n_scenes, image_size=image_size
    )
    return read_character(path)
