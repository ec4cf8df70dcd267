"""BAGEL's understanding encoder: a SigLIP vision transformer over packed, variable-size images.

Names follow the official checkpoint: `vit_model.vision_model.embeddings.patch_embedding` is a
Linear over (row, col, channel)-ordered patch pixels (the official code converts SigLIP's Conv2d with
`weight.permute(0, 2, 3, 1).reshape(out, -1)`; `conv_to_linear_weight` does the same for a
checkpoint still holding the conv), `embeddings.position_embedding` (one row per cell of the
`num_patches_per_side`² grid), `encoder.layers.N.self_attn.q_proj`, `post_layernorm`.

BAGEL uses the penultimate layer of SigLIP-so400m: `vit_config.json` says 27 layers, the model builds
26 (`num_hidden_layers` here is the number built) and still applies `post_layernorm`.

Images of any size (multiples of the patch size, at most `image_size` per side) are packed as one
token sequence; each image attends only to its own patches. Attention is PyTorch SDPA over groups of
equal-size images (exactly a block-diagonal mask, without materialising it), or flash-attn's varlen
kernel when it is installed and the tensors are on a GPU in half precision (optional, never required).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SiglipVisionModel", "ViTConfig", "conv_to_linear_weight"]


@dataclass
class ViTConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2  # layers built (official: vit_config.json's value - 1, the penultimate)
    num_attention_heads: int = 2
    num_channels: int = 3
    image_size: int = 32
    patch_size: int = 8
    layer_norm_eps: float = 1e-6

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def conv_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A Conv2d patch-embedding weight [D, C, p, p] as the Linear weight [D, p*p*C] BAGEL stores."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class PackedImages:
    """How a packed token sequence splits into images: per-image lengths, grouped by length."""

    def __init__(self, seqlens: list[int], device=None):
        self.seqlens = [int(n) for n in seqlens]
        self.total = sum(self.seqlens)
        starts = [0]
        for n in self.seqlens[:-1]:
            starts.append(starts[-1] + n)
        self.starts = starts
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(self.seqlens):
            by_len.setdefault(n, []).append(i)
        # per group of equal-length images: the token indices [n_images * length]
        self.groups = [
            (length, torch.cat([torch.arange(starts[i], starts[i] + length) for i in images]).to(device))
            for length, images in by_len.items()
        ]
        self.device = device

    def cu_seqlens(self, device) -> torch.Tensor:
        lens = torch.tensor(self.seqlens, dtype=torch.int32, device=device)
        return F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, packed: PackedImages) -> torch.Tensor:
        """x [T, D] packed tokens of several images."""
        t, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        q, k, v = (proj(x).view(t, h, hd) for proj in (self.q_proj, self.k_proj, self.v_proj))
        flash = _flash_varlen() if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None:
            cu = packed.cu_seqlens(x.device)
            longest = max(packed.seqlens)
            out = flash(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest)
            return self.out_proj(out.reshape(t, d))
        out = torch.empty_like(q)
        for length, index in packed.groups:
            index = index.to(x.device)

            def grouped(z: torch.Tensor, length: int = length, index: torch.Tensor = index) -> torch.Tensor:
                return z.index_select(0, index).view(-1, length, h, hd).transpose(1, 2)

            o = F.scaled_dot_product_attention(grouped(q), grouped(k), grouped(v))
            out.index_copy_(0, index, o.transpose(1, 2).reshape(-1, h, hd))
        return self.out_proj(out.reshape(t, d))


class _MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, packed: PackedImages) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), packed)
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList([_EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = _VisionTransformer(cfg)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor,
                seqlens: list[int] | None = None) -> torch.Tensor:
        """Packed patches [T, p*p*c] in [-1, 1] with flattened position ids [T] (row * side + col);
        `seqlens`: tokens per image (their sum is T; None: one image). Returns [T, hidden].

        For compatibility, batched input [N, P, p*p*c] with position ids [P] (N same-size images)
        returns [N, P, hidden]."""
        if patches.dim() == 3:
            n, p, k = patches.shape
            out = self.forward(patches.reshape(n * p, k), position_ids.repeat(n), [p] * n)
            return out.view(n, p, -1)
        packed = PackedImages(seqlens if seqlens is not None else [patches.shape[0]], patches.device)
        if packed.total != patches.shape[0]:
            raise ValueError(f"seqlens sum to {packed.total} but {patches.shape[0]} patches were given")
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(position_ids)
        for layer in vm.encoder.layers:
            x = layer(x, packed)
        return vm.post_layernorm(x)
