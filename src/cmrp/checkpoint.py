"""Atomic writes for everything cmrp saves: a crash mid-write never leaves a half file in place; and the
sha256 that lets a reader check a saved file is the one written (for a whole folder: `write_folder_manifest`
when it is complete, `folder_damage` before it is read)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cmrp.jsonio import write_json

__all__ = ["FOLDER_MANIFEST", "atomic_write", "file_sha256", "folder_damage", "save_safetensors_atomic",
           "write_folder_manifest"]

FOLDER_MANIFEST = "files.json"  # size and sha256 of every file of a finished checkpoint folder


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


def write_folder_manifest(folder: str | Path, parts: tuple[str, ...]) -> Path:
    """Record the size and sha256 of every file under `folder`/`parts` (files or sub-folders that exist), so
    a reader can tell a file changed after it was written, even one whose size stayed the same."""
    folder = Path(folder)
    files = {}
    for part in parts:
        top = folder / part
        for path in sorted([top] if top.is_file() else top.rglob("*") if top.is_dir() else []):
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return atomic_write(folder / FOLDER_MANIFEST, lambda p: write_json(p, {"format": 1, "files": files}, indent=1))


def folder_damage(folder: str | Path) -> str | None:
    """Why a folder's files differ from its `FOLDER_MANIFEST` (the first one found), or None when they all match
    or it has none (a folder written before cmrp recorded one)."""
    import json

    folder = Path(folder)
    try:
        files = json.loads((folder / FOLDER_MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = [(str(name), entry["size"], entry["sha256"]) for name, entry in files.items()]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{folder / FOLDER_MANIFEST}: unreadable or not written by cmrp"
    for name, size, digest in entries:
        path = folder / name
        try:
            if path.stat().st_size != size:
                return f"{path}: {path.stat().st_size} bytes, {FOLDER_MANIFEST} says {size}"
            if file_sha256(path) != digest:
                return f"{path}: its content does not match the sha256 in {FOLDER_MANIFEST}"
        except OSError as err:
            return f"{path}: {'missing' if isinstance(err, FileNotFoundError) else err.strerror or type(err).__name__}"
    return None
