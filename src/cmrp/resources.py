"""Where the shipped recipes, backbone cards and reward presets live.

From a source checkout (or an editable install) they are the top-level `recipes/`, `backbones/`
and `rewards/` folders; in a wheel they are packaged as `cmrp/_assets/<kind>/`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSET_KINDS", "asset_dir"]

ASSET_KINDS = ("recipes", "backbones", "rewards")


def asset_dir(kind: str) -> Path:
    if kind not in ASSET_KINDS:
        raise ValueError(f"unknown asset kind {kind!r}; expected one of {ASSET_KINDS}")
    packaged = Path(__file__).resolve().parent / "_assets" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / kind
