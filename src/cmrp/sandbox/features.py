"""The sandbox's trained feature nets, by name, for the reward terms and evaluation.

- `sandbox-clip`: the CLIP-style dual encoder (`cmrp.sandbox.clip`), for `clip_similarity`'s `encoder:`
  and evaluation's CLIP-I / CLIP-T;
- `sandbox-image`: the attribute probe's centred, L2-normalised penultimate features
  (`cmrp.sandbox.probe.image_features`), the DINO stand-in for `trainset_penalty`'s `features:` and
  evaluation's DINO numbers.

Both load the weights shipped in the package (`cmrp/sandbox/assets`); `CMRP_SANDBOX_MODELS=DIR` points
them at retrained ones (a folder with probe.* and clip.* from `cmrp sandbox train-probe` /
`train-features`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cmrp.registry import FEATURE_MODELS
from cmrp.sandbox.clip import load_sandbox_clip
from cmrp.sandbox.probe import image_features, load_probe

__all__ = ["ProbeImageFeatures", "models_dir", "sandbox_clip", "sandbox_image_features"]


def models_dir() -> Path | None:
    """`$CMRP_SANDBOX_MODELS` when set (retrained models), else None (the shipped ones)."""
    value = os.environ.get("CMRP_SANDBOX_MODELS")
    return Path(value).expanduser() if value else None


class ProbeImageFeatures:
    """`images [B,3,H,W] in [0,1] -> [B, D]`: the probe's image features (a DINO stand-in)."""

    def __init__(self, path: Path | str | None = None):
        self.probe = load_probe(path)

    def to(self, device: torch.device | str) -> ProbeImageFeatures:
        return self  # runs on the CPU; results come back on the images' device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return image_features(images, self.probe)


@FEATURE_MODELS.register("sandbox-clip")
def sandbox_clip():
    """The shipped (or `$CMRP_SANDBOX_MODELS`) sandbox CLIP-style encoder."""
    return load_sandbox_clip(models_dir())


@FEATURE_MODELS.register("sandbox-image")
def sandbox_image_features() -> ProbeImageFeatures:
    """The shipped (or `$CMRP_SANDBOX_MODELS`) probe's image features."""
    return ProbeImageFeatures(models_dir())
