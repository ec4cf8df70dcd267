"""Image <-> latent maps for the flow head.

BAGEL generates in the latent space of the FLUX autoencoder (`FluxAutoencoder`: 16 latent channels,
8x down-sampling, latents normalised as `scale * (mean - shift)`). Its parameter names are the ones
of the original FLUX `ae.safetensors` (`encoder.conv_in`, `encoder.down.N.block.M.norm1`,
`encoder.mid.attn_1.q`, `decoder.up.N.upsample.conv`, ...), so that file loads by name.

The tiny sandbox backbone uses `PixelSpaceAutoencoder`: an exact, parameter-free space-to-depth map,
so generation quality is limited only by the transformer and nothing needs pretraining.

Both take images in [0, 1] ([B, 3, H, W]) and expose `downsample` and `z_channels`. The autoencoder is
frozen: BAGEL never trains it, and it lives outside the BAGEL module's parameters (see `Bagel.vae`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from cmrp.backbones.spatial_attention import SpatialSelfAttention
from cmrp.errors import ConfigError

__all__ = ["FluxAEConfig", "FluxAutoencoder", "PixelSpaceAutoencoder", "build_autoencoder"]


class PixelSpaceAutoencoder(nn.Module):
    """x in [0, 1], [B, 3, H, W]  <->  z in [-1, 1]-ish, [B, 3*d*d, H/d, W/d]."""

    def __init__(self, downsample: int = 2, channels: int = 3):
        super().__init__()
        self.downsample = downsample
        self.z_channels = channels * downsample * downsample

    def encode(self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic (`sample` / `generator` are accepted for the common interface; nothing is drawn)."""
        return F.pixel_unshuffle(images * 2.0 - 1.0, self.downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latents, self.downsample) + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class FluxAEConfig:
    """Sizes of a FLUX-style autoencoder (defaults: the FLUX.1 `ae.safetensors` that BAGEL ships)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_spec(cls, spec: dict) -> FluxAEConfig:
        known = {f.name for f in fields(cls)}
        extra = sorted(set(spec) - known - {"kind", "downsample"})
        if extra:
            raise ConfigError(f"architecture.vae: unknown key(s) {extra} for kind 'flux'; known: {sorted(known)}")
        cfg = cls(**{k: v for k, v in spec.items() if k in known})
        cfg.ch_mult = [int(m) for m in cfg.ch_mult]
        if "downsample" in spec and int(spec["downsample"]) != cfg.downsample:
            raise ConfigError(
                f"architecture.vae.downsample={spec['downsample']} disagrees with ch_mult {cfg.ch_mult} "
                f"(2**(len(ch_mult)-1) = {cfg.downsample}); drop `downsample` or fix ch_mult"
            )
        for c in [cfg.ch * m for m in cfg.ch_mult]:
            if c % cfg.norm_groups:
                raise ConfigError(
                    f"architecture.vae: channel count {c} (ch x ch_mult) is not divisible by norm_groups="
                    f"{cfg.norm_groups}; choose ch as a multiple of norm_groups"
                )
        return cfg

    def to_spec(self) -> dict:
        return {"kind": "flux", **asdict(self)}


def _norm(cfg: FluxAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    def __init__(self, cfg: FluxAEConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as FLUX does


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, cfg: FluxAEConfig, channels: int):
        super().__init__()
        self.block_1 = _ResBlock(cfg, channels, channels)
        self.attn_1 = SpatialSelfAttention(channels, cfg.norm_groups)
        self.block_2 = _ResBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block.M` residual blocks and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Encoder(nn.Module):
    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResBlock(cfg, cin, cout))
                cin = cout
            level = _Level(blocks)
            if i < len(cfg.ch_mult) - 1:
                level.downsample = _Downsample(cin)
            self.down.append(level)
        self.mid = _Mid(cfg, cin)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cfg, cin)
        levels: list[_Level] = []
        # built from the lowest resolution up; stored so that `up.0` is the full-resolution level
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResBlock(cfg, cin, cout))
                cin = cout
            level = _Level(blocks)
            if i > 0:
                level.upsample = _Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAutoencoder(nn.Module):
    """The FLUX KL autoencoder. `encode` returns normalised latents: a sample of the diagonal-Gaussian
    posterior (what FLUX's and BAGEL's encoders return) or its mean."""

    def __init__(self, cfg: FluxAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or FluxAEConfig()
        self.encoder = _Encoder(self.cfg)
        self.decoder = _Decoder(self.cfg)
        self.downsample = self.cfg.downsample
        self.z_channels = self.cfg.z_channels

    def encode(self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, z, H/d, W/d] normalised latents (H, W multiples of d): the posterior
        mean, or with `sample` mean + std * noise (noise from `generator`, else the global RNG)."""
        d = self.downsample
        if images.shape[-1] % d or images.shape[-2] % d:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the autoencoder's {d}")
        weight = self.encoder.conv_in.weight
        moments = self.encoder(images.to(weight.dtype) * 2.0 - 1.0)
        mean, logvar = moments[:, : self.z_channels], moments[:, self.z_channels:]
        z = mean
        if sample:
            if generator is None:
                noise = torch.randn_like(mean)
            else:
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                    device=generator.device).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [0, 1]."""
        weight = self.decoder.conv_in.weight
        z = latents.to(weight.dtype) / self.cfg.scale_factor + self.cfg.shift_factor
        return ((self.decoder(z) + 1.0) / 2.0).clamp(0.0, 1.0)


def build_autoencoder(spec: dict) -> PixelSpaceAutoencoder | FluxAutoencoder:
    """`architecture.vae` of a card: {kind: pixel, downsample: d} or {kind: flux, <FluxAEConfig sizes>}."""
    spec = dict(spec or {})
    kind = spec.get("kind", "pixel")
    if kind == "pixel":
        return PixelSpaceAutoencoder(int(spec.get("downsample", 2)))
    if kind == "flux":
        return FluxAutoencoder(FluxAEConfig.from_spec(spec))
    raise ConfigError(f"architecture.vae.kind: unknown autoencoder kind {kind!r} (supported: pixel, flux)")
