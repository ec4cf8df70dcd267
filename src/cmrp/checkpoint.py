"""Atomic writes for everything cmrp saves: a crash mid-write never leaves a half file in place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_write", "save_safetensors_atomic"]


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
