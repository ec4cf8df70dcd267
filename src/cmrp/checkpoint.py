"""Atomic writes for everything cmrp saves: a crash mid-write never leaves a half file in place; and the
sha256 that lets a reader check a saved file is the one written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_write", "file_sha256", "save_safetensors_atomic"]


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename the temp file over `target` (same directory, so atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
    return target


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], target: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(target, lambda p: save_file(tensors, str(p), metadata=metadata))


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoints are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
