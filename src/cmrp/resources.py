"""Where the shipped recipes, backbone cards and reward presets live.

From a source checkout (or an editable install) they are the top-level `recipes/`, `backbones/`
and `rewards/` folders; in a wheel they are packaged as `cmrp/_assets/<kind>/`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["ASSET_KINDS", "asset_dir", "git_commit"]

ASSET_KINDS = ("recipes", "backbones", "rewards")


def asset_dir(kind: str) -> Path:
    if kind not in ASSET_KINDS:
        raise ValueError(f"unknown asset kind {kind!r}; expected one of {ASSET_KINDS}")
    packaged = Path(__file__).resolve().parent / "_assets" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / kind


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
