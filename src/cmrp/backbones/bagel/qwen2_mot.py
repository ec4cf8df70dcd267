"""BAGEL's language model: a Qwen2 decoder turned into a Mixture-of-Transformers (MoT).

Every weight of a decoder layer exists twice: the plain one serves understanding tokens (text and
ViT tokens), the `*_moe_gen` copy serves generation tokens (noisy VAE latents). All tokens still
attend to each other in one self-attention. Parameter names follow the official checkpoint
(`language_model.model.layers.N.self_attn.q_proj_moe_gen.weight`, ...) so it loads by name.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` with a boolean mask
[B, 1, Lq, Lk]; an optional key/value cache lets a prefix (character + prompt) be encoded once and
reused by every denoising step or decoded token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KVCache", "LLMConfig", "Qwen2ForCausalLM", "Qwen2RMSNorm", "Routing", "route"]


@dataclass
class LLMConfig:
    """Sizes of the Qwen2 decoder (names as in a Qwen2 `llm_config.json`)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    layer_module: str = "Qwen2MoTDecoderLayer"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_moe(self) -> bool:
        return "Mo" in self.layer_module


class Qwen2RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class Routing:
    """Which tokens each expert serves, worked out once per forward pass: index tensors over the flattened
    [B * L] tokens. Every routed module of every layer gathers and scatters with them; a bool mask would be
    turned into indices (a host sync) again at each of them, and its masked assignment is slow to backward.
    Given which tokens are padding, neither expert computes them (about half of a mixed-task SFT batch):
    their outputs are zeros, which padding rows' own attention (each sees only itself) keeps finite."""

    shape: tuple[int, int]  # (B, L)
    und: torch.Tensor | None  # long [N_und]; None when no token is an understanding one
    gen: torch.Tensor | None  # long [N_gen]; None when none is a generation token
    kept: torch.Tensor | None = None  # long [N_valid]: the tokens that are not padding; None: no padding
    # rows of similar length attended together, each group over its own longest row only: ((rows, length), ...);
    # None: one attention over the whole padded batch
    row_groups: tuple[tuple[torch.Tensor, int], ...] | None = None

    @classmethod
    def of(cls, is_gen: torch.Tensor, valid: torch.Tensor | None = None) -> Routing:
        flat = is_gen.reshape(-1)
        b, n = is_gen.shape[:2]
        if valid is None or bool(valid.all()):
            gen = flat.nonzero().squeeze(1)
            und = (~flat).nonzero().squeeze(1)
            return cls((b, n), und if und.numel() else None, gen if gen.numel() else None)
        keep = valid.reshape(-1)
        gen = (flat & keep).nonzero().squeeze(1)
        und = (~flat & keep).nonzero().squeeze(1)
        return cls((b, n), und if und.numel() else None, gen if gen.numel() else None, keep.nonzero().squeeze(1),
                   row_groups(valid))


ATTENTION_GROUPS = 4  # at most this many attention calls per layer over a padded batch


def row_groups(valid: torch.Tensor) -> tuple[tuple[torch.Tensor, int], ...] | None:
    """Rows sorted by length in up to `ATTENTION_GROUPS` groups, each attended over its longest row only: the
    attention of a padded batch otherwise spends most of its work on padding (each row's padding is at its end).
    None when it would not save anything (padding elsewhere, one row, or equal lengths)."""
    lengths = valid.sum(1)
    b, n = valid.shape
    positions = torch.arange(n, device=valid.device)
    if b < 2 or not bool((valid == (positions < lengths[:, None])).all()) or bool((lengths == lengths[0]).all()):
        return None
    order = torch.argsort(lengths, descending=True, stable=True)
    size = -(-b // min(ATTENTION_GROUPS, b))
    groups = []
    for start in range(0, b, size):
        rows = order[start:start + size]
        groups.append((rows, int(lengths[rows[0]])))
    return tuple(groups)


class _TakeRows(torch.autograd.Function):
    """`x.index_select(0, index)` for indices that never repeat (a routing's): the backward puts the gradient
    back with a copy. index_select's own backward accumulates (`index_add_`), which on the CPU is a scatter-add
    about ten times slower than the copy at GRPO's sizes (~300 a rollout update of the sandbox model)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (distinct) of x, differentiable with a copy for a backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(0, index)
    return _TakeRows.apply(x, index)


def as_routing(is_gen: torch.Tensor | Routing | None) -> Routing | None:
    """A bool mask [B, L] (True = generation token) as a `Routing`; a `Routing` or None as it is."""
    return Routing.of(is_gen) if isinstance(is_gen, torch.Tensor) else is_gen


def route(
    x: torch.Tensor,
    is_gen: torch.Tensor | Routing | None,
    und: Callable[[torch.Tensor], torch.Tensor],
    gen: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Apply `und` to understanding tokens and `gen` to generation tokens of x [B, L, ...] (padding named
    by the `Routing` to neither: zeros there).

    `is_gen` is a `Routing` (or a bool mask [B, L]) over x's two leading dims; None (or no MoT) means all
    tokens are `und`. Trailing dims pass through (per-head norms route [B, L, H, hd] by token).
    """
    routing = as_routing(is_gen)
    if routing is None:
        return und(x)
    if routing.kept is None:
        if gen is None or routing.gen is None:
            return und(x)
        if routing.und is None:
            return gen(x)
    if gen is None or routing.gen is None:
        parts = [(routing.kept, und)]
    else:
        parts = [(idx, fn) for idx, fn in ((routing.und, und), (routing.gen, gen)) if idx is not None]
    b, n = routing.shape
    flat = x.reshape(b * n, *x.shape[2:])
    outs = [(idx, fn(take_rows(flat, idx))) for idx, fn in parts]
    first = outs[0][1]
    # every token written below, or padding (zeros: its keys and values must stay finite)
    out = first.new_empty(b * n, *first.shape[1:]) if routing.kept is None else first.new_zeros(b * n, *first.shape[1:])
    for idx, part in outs:
        out.index_copy_(0, idx, part.to(first.dtype))
    return out.view(b, n, *first.shape[1:])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Qwen2 rotary position embedding; positions are explicit (an image shares one position)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


@dataclass
class KVCache:
    """Keys/values of an encoded prefix, per layer, plus its key-padding mask and next positions."""

    keys: list[torch.Tensor]  # each [B, KVH, Lp, hd]
    values: list[torch.Tensor]
    valid: torch.Tensor  # [B, Lp] bool: real (non-padding) prefix tokens
    next_position: torch.Tensor  # [B] long: rope position of the first token after the prefix

    def expand(self, repeats: int) -> KVCache:
        """Repeat each sample `repeats` times (G samples of one group share a prefix)."""
        rep = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
        return KVCache([rep(k) for k in self.keys], [rep(v) for v in self.values], rep(self.valid), rep(self.next_position))

    def select(self, index: torch.Tensor) -> KVCache:
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], self.valid[index], self.next_position[index])

    def prefix(self, lengths: torch.Tensor, next_position: torch.Tensor) -> KVCache:
        """The cache of each sample's first `lengths` tokens (the rest masked out, nothing recomputed: what
        attends causally to a prefix is the prefix's own keys/values), continuing at `next_position`."""
        keep = torch.arange(self.valid.shape[1], device=self.valid.device)[None] < lengths.to(self.valid.device)[:, None]
        return KVCache(self.keys, self.values, self.valid & keep, next_position.to(self.next_position.device))

    @classmethod
    def empty(cls, cfg: LLMConfig, batch: int, device=None, dtype: torch.dtype = torch.float32) -> KVCache:
        """The cache of `batch` empty contexts (no token yet; the next one is at position 0)."""
        def none() -> torch.Tensor:
            return torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim, device=device, dtype=dtype)

        layers = range(cfg.num_hidden_layers)
        return cls([none() for _ in layers], [none() for _ in layers], torch.zeros(batch, 0, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))


class PackedAttentionMoT(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(h, nh * hd, bias=True)
        self.k_proj = nn.Linear(h, nkv * hd, bias=True)
        self.v_proj = nn.Linear(h, nkv * hd, bias=True)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        norm = (lambda: Qwen2RMSNorm(hd, cfg.rms_norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        if cfg.use_moe:
            self.q_proj_moe_gen = nn.Linear(h, nh * hd, bias=True)
            self.k_proj_moe_gen = nn.Linear(h, nkv * hd, bias=True)
            self.v_proj_moe_gen = nn.Linear(h, nkv * hd, bias=True)
            self.o_proj_moe_gen = nn.Linear(nh * hd, h, bias=False)
            self.q_norm_moe_gen, self.k_norm_moe_gen = norm(), norm()

    def _gen(self, name: str) -> nn.Module | None:
        return getattr(self, f"{name}_moe_gen", None)

    def forward(
        self,
        x: torch.Tensor,  # [B, L, D]
        is_gen: torch.Tensor | Routing | None,  # [B, L] bool, or its Routing
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [B, L, hd]
        mask: torch.Tensor,  # [B, L, Lpast + L] bool, True = may attend
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, n, _ = x.shape
        hd = self.head_dim
        routing = as_routing(is_gen)
        q = route(x, routing, self.q_proj, self._gen("q_proj")).view(b, n, self.num_heads, hd)
        k = route(x, routing, self.k_proj, self._gen("k_proj")).view(b, n, self.num_kv_heads, hd)
        v = route(x, routing, self.v_proj, self._gen("v_proj")).view(b, n, self.num_kv_heads, hd)
        q = route(q, routing, self.q_norm, self._gen("q_norm"))  # per head, by token
        k = route(k, routing, self.k_norm, self._gen("k_norm"))
        cos, sin = rope[0][:, None], rope[1][:, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos.to(q.dtype) + _rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + _rotate_half(k) * sin.to(k.dtype)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if past is None and routing is not None and routing.row_groups is not None:
            attn = _grouped_attention(q, k, v, mask, routing.row_groups)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        attn = attn.transpose(1, 2).reshape(b, n, self.num_heads * hd)
        return route(attn, routing, self.o_proj, self._gen("o_proj")), present


def _grouped_attention(q, k, v, mask, groups) -> torch.Tensor:
    """SDPA of q, k, v [B, H, L, hd] under mask [B, L, L], group by group over each group's rows cut to its
    longest row. Keys past a row's length are masked for it, so the cut changes nothing; padding queries get
    zeros (their own values: padding is computed by no layer)."""
    n = q.shape[2]
    out = None
    for rows, length in groups:
        part = F.scaled_dot_product_attention(
            take_rows(q, rows)[:, :, :length], take_rows(k, rows)[:, :, :length], take_rows(v, rows)[:, :, :length],
            attn_mask=mask.index_select(0, rows)[:, None, :length, :length])
        if out is None:  # SDPA's dtype (bf16 under autocast, whatever q's)
            out = part.new_zeros(q.shape)
        out.index_copy_(0, rows, F.pad(part, (0, 0, 0, n - length)))
    assert out is not None, "no row group"
    return out


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = PackedAttentionMoT(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_moe:
            self.mlp_moe_gen = Qwen2MLP(cfg)
            self.input_layernorm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _gen(self, name: str) -> nn.Module | None:
        return getattr(self, f"{name}_moe_gen", None)

    def forward(self, x, is_gen, rope, mask, past=None):
        routing = as_routing(is_gen)
        h = route(x, routing, self.input_layernorm, self._gen("input_layernorm"))
        h, present = self.self_attn(h, routing, rope, mask, past)
        x = x + h
        h = route(x, routing, self.post_attention_layernorm, self._gen("post_attention_layernorm"))
        x = x + route(h, routing, self.mlp, self._gen("mlp"))
        return x, present


class Qwen2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen2MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_moe:
            self.norm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(
        self,
        embeds: torch.Tensor,
        is_gen: torch.Tensor | None,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        past: KVCache | None = None,
        use_cache: bool = False,
        checkpoint: bool = False,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """`valid` [B, L] (False = padding, whose rows attend only to themselves): padding is computed by no
        layer; its outputs are zeros."""
        rope = self.rotary_emb(position_ids)
        if valid is not None:  # once for every layer
            routing = Routing.of(is_gen if is_gen is not None else torch.zeros_like(valid), valid)
        else:
            routing = as_routing(is_gen)
        x = embeds
        presents = []
        for i, layer in enumerate(self.layers):
            layer_past = (past.keys[i], past.values[i]) if past is not None else None
            if checkpoint and torch.is_grad_enabled():
                # activations are recomputed in backward (training mode or not: GRPO keeps eval mode)
                x, present = torch.utils.checkpoint.checkpoint(layer, x, routing, rope, mask, layer_past,
                                                               use_reentrant=False)
            else:
                x, present = layer(x, routing, rope, mask, layer_past)
            if use_cache:
                presents.append(present)
        x = route(x, routing, self.norm, getattr(self, "norm_moe_gen", None))
        return x, (presents if use_cache else None)


class Qwen2ForCausalLM(nn.Module):
    """Holds `.model` and `.lm_head`, as in the official checkpoint (`language_model.lm_head`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
