"""Where the shipped recipes, backbone cards, reward presets and sandbox bases live.

From a source checkout (or an editable install) the first three are the top-level `recipes/`, `backbones/`
and `rewards/` folders; in a wheel they are packaged as `cmrp/_assets/<kind>/`. The sandbox bases
(`sandbox://<name>` weights) are package data in `cmrp/sandbox/assets/<name>/`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cmrp.errors import WeightsError

__all__ = ["ASSET_KINDS", "asset_dir", "git_commit", "shipped_base"]

ASSET_KINDS = ("recipes", "backbones", "rewards")


def asset_dir(kind: str) -> Path:
    if kind not in ASSET_KINDS:
        raise ValueError(f"unknown asset kind {kind!r}; expected one of {ASSET_KINDS}")
    packaged = Path(__file__).resolve().parent / "_assets" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / kind


def _bases() -> Path:
    return Path(__file__).resolve().parent / "sandbox" / "assets"


def shipped_base(name: str, where: str = "weights") -> Path:
    """The folder of a base shipped in the package (`sandbox://<name>`)."""
    folder = _bases() / name
    if not name or "/" in name or not (folder / "model.safetensors").is_file():
        shipped = sorted(p.name for p in _bases().iterdir() if (p / "model.safetensors").is_file())
        raise WeightsError(
            f"{where}: sandbox://{name} is not a base shipped with cmrp (shipped: {', '.join(shipped) or 'none'}). "
            f"Train one with `cmrp sandbox pretrain --out {folder}`, or point `weights` at a folder it wrote."
        )
    return folder


def git_commit() -> str | None:
    """The commit of the source tree cmrp runs from (with `+dirty` for local changes), if it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None
