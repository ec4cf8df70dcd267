"""MAGVIT-v2 image tokenizer as Show-o uses it: a conv encoder, a lookup-free quantizer (LFQ) and a
conv decoder, with the parameter names of the official `showlab/magvitv2` checkpoint.

- Encoder: `conv_in`, `down.{level}.block.{i}` residual blocks (`norm1, conv1, norm2, conv2`, plus
  `nin_shortcut` when the width changes), `down.{level}.downsample.conv` (stride 2, padded right and
  bottom) between levels, `mid.block_1 / attn_1 / block_2`, `norm_out`, `conv_out` to `z_channels`,
  `quant_conv` (1x1). Five levels at the official size: 16x down-sampling.
- LFQ: each of the `z_channels` (13) latent channels is quantised to its sign, so a code is a 13-bit
  number (8192 codes, most significant bit first) and the "codebook" is the fixed ±1 table of every
  bit pattern (buffers `quantize.embedding`, `quantize.power_vals`) — nothing to look up or learn.
- Decoder: `post_quant_conv`, `conv_in`, `mid`, `up.{level}` (nearest 2x + conv), `norm_out`, `conv_out`.

Pixels are in [-1, 1] inside the module (as in the official code); `encode_codes` / `decode_codes` take
and return [0, 1] images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cmrp.backbones.spatial_attention import SpatialSelfAttention

__all__ = ["MagvitConfig", "MAGVITv2"]


@dataclass
class MagvitConfig:
    """Sizes of MAGVIT-v2 (defaults: the official `showlab/magvitv2`)."""

    ch: int = 128
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    encoder_num_res_blocks: list[int] = field(default_factory=lambda: [4, 3, 4, 3, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_num_res_blocks: list[int] = field(default_factory=lambda: [4, 4, 3, 4, 3])
    z_channels: int = 13  # = codebook bits: 2**13 = 8192 codes
    in_ch: int = 3
    out_ch: int = 3
    norm_groups: int = 32

    @classmethod
    def from_dict(cls, spec: dict) -> MagvitConfig:
        return cls(**spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def codebook_size(self) -> int:
        return 2**self.z_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = _ResBlock(channels, channels, groups)
    mid.attn_1 = SpatialSelfAttention(channels, groups)
    mid.block_2 = _ResBlock(channels, channels, groups)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class _Encoder(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        levels = len(cfg.encoder_ch_mult)
        for level, (mult, blocks) in enumerate(zip(cfg.encoder_ch_mult, cfg.encoder_num_res_blocks, strict=True)):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(blocks):
                stage.block.append(_ResBlock(cin, cfg.ch * mult, g))
                cin = cfg.ch * mult
            if level != levels - 1:
                stage.downsample = _Down(cin)
            self.down.append(stage)
        self.mid = _mid(cin, g)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.quant_conv(self.conv_out(_swish(self.norm_out(h))))


class _Decoder(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        g = cfg.norm_groups
        mults, blocks = cfg.decoder_ch_mult, cfg.decoder_num_res_blocks
        cin = cfg.ch * mults[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g)
        stages: list[nn.Module] = []
        for level in reversed(range(len(mults))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(blocks[level]):
                stage.block.append(_ResBlock(cin, cfg.ch * mults[level], g))
                cin = cfg.ch * mults[level]
            if level != 0:
                stage.upsample = _Up(cin)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level (0 = full resolution), run from the deepest
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(self.post_quant_conv(z)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _LookupFreeQuantizer(nn.Module):
    """Sign quantisation of each latent channel; code = the bits read most significant first."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        weights = 2 ** torch.arange(bits - 1, -1, -1)
        table = (torch.arange(2**bits)[:, None] // weights[None, :]) % 2
        self.register_buffer("embedding", table.float() * 2 - 1)  # [2**bits, bits] of ±1
        self.register_buffer("power_vals", weights)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, bits, h, w] latents -> [B, h*w] codes in [0, 2**bits)."""
        bits = (z > 0).long()
        return (bits * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def lookup(self, codes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """[B, h*w] codes -> [B, bits, h, w] ±1 latents."""
        h, w = shape
        return self.embedding[codes.long()].view(codes.shape[0], h, w, self.bits).permute(0, 3, 1, 2).contiguous()


class MAGVITv2(nn.Module):
    """The tokenizer: `encode_codes(pixels)` -> codes, `decode_codes(codes)` -> pixels."""

    def __init__(self, cfg: MagvitConfig | None = None):
        super().__init__()
        self.cfg = cfg or MagvitConfig()
        self.encoder = _Encoder(self.cfg)
        self.decoder = _Decoder(self.cfg)
        self.quantize = _LookupFreeQuantizer(self.cfg.z_channels)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def tokens_per_image(self, image_size: int) -> int:
        side = image_size // self.cfg.downsample
        return side * side

    @torch.no_grad()
    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images in [0, 1] -> [B, (S/16)**2] long codes in [0, 8192) (row-major)."""
        weight = self.encoder.conv_in.weight
        z = self.encoder(pixels.to(weight.device, weight.dtype) * 2 - 1)
        return self.quantize.codes(z)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, N] codes (N a square number) -> [B, 3, S, S] images in [0, 1], float32 on the codes' device."""
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} image tokens do not form a square grid")
        weight = self.decoder.conv_in.weight
        z = self.quantize.lookup(codes.clamp(0, self.codebook_size - 1).to(weight.device), (side, side))
        return ((self.decoder(z.to(weight.dtype)).float() + 1) / 2).clamp(0, 1)
