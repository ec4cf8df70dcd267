"""Image <-> latent maps for the flow head.

BAGEL generates in the latent space of a FLUX autoencoder (16 channels, 8x down-sampling). The tiny
sandbox backbone uses `PixelSpaceAutoencoder`: an exact, parameter-free space-to-depth map, so
generation quality is limited only by the transformer and nothing needs pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmrp.errors import ConfigError

__all__ = ["PixelSpaceAutoencoder", "build_autoencoder"]


class PixelSpaceAutoencoder(nn.Module):
    """x in [0, 1], [B, 3, H, W]  <->  z in [-1, 1]-ish, [B, 3*d*d, H/d, W/d]."""

    def __init__(self, downsample: int = 2, channels: int = 3):
        super().__init__()
        self.downsample = downsample
        self.z_channels = channels * downsample * downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2.0 - 1.0, self.downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latents, self.downsample) + 1.0) / 2.0).clamp(0.0, 1.0)


def build_autoencoder(spec: dict) -> PixelSpaceAutoencoder:
    kind = spec.get("kind", "pixel")
    if kind == "pixel":
        return PixelSpaceAutoencoder(int(spec.get("downsample", 2)))
    raise ConfigError(f"architecture.vae.kind: unknown autoencoder kind {kind!r} (supported: pixel)")
