"""Show-o: one Phi transformer over text and MAGVIT-v2 image tokens, with omni-attention.

Vocabulary (the official layout): the language model's `llm_vocab_size` text ids, then 10 new special
tokens — `[PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>` — then the
8192 image codes (code c is id `llm_vocab_size + 10 + c`), then one mask token (the last id).
`<|sot|>` / `<|eot|>` are the text tokenizer's own begin / end ids.

Image tokens are predicted at their own position (masked-token prediction, no shift); text tokens
predict the next token. Omni-attention: a text token sees every token before it (causal); a token of
a bidirectional span sees everything before the span and the whole span. A span is an image
(`<|soi|>` ... `<|eoi|>`) or, in an understanding sequence, the whole prefix `<|mmu|> <|soi|> ... <|eoi|>`
(the official `create_attention_mask_for_mmu`: every token up to the image's `<|eoi|>` sees all of it).
Padding is never attended.

The parameter names are the official checkpoint's: `showo.model.embed_tokens`, `showo.model.layers.N.
self_attn.{q,k,v}_proj / dense / q_layernorm / k_layernorm`, `showo.model.layers.N.mlp.fc1 / fc2`,
`showo.model.layers.N.input_layernorm`, `showo.model.final_layernorm`, `showo.lm_head` — transformers'
`PhiForCausalLM` under `showo.`. The official Show-o Phi always normalises queries and keys per head
(its `PhiForCausalLM` sets `qk_layernorm = True` whatever the Phi-1.5 config says), so every Show-o
checkpoint has `q_layernorm` / `k_layernorm`: `SHOWO_PHI` sets the flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cmrp.backbones.showo.magvit import MagvitConfig

__all__ = ["NEW_SPECIAL_TOKENS", "SHOWO_PHI", "Showo", "ShowoArch", "ShowoVocab", "omni_attention_mask"]

NEW_SPECIAL_TOKENS = ("[PAD]", "<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>",
                      "<|v2v|>", "<|lvg|>")

PHI_1_5 = {  # microsoft/phi-1_5, the language model of every Show-o checkpoint
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
    "max_position_embeddings": 2048, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
    "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
}
SHOWO_PHI = {**PHI_1_5, "qk_layernorm": True}  # Show-o's Phi: Phi-1.5 with per-head q/k LayerNorm


@dataclass
class ShowoArch:
    """Sizes of a Show-o model (defaults: the official 256x256 `showlab/show-o`)."""

    phi: dict[str, Any] = field(default_factory=lambda: dict(SHOWO_PHI))
    llm_vocab_size: int = 50295
    num_new_special_tokens: int = 10
    codebook_size: int = 8192
    image_size: int = 256
    vq: MagvitConfig = field(default_factory=MagvitConfig)

    @classmethod
    def from_dict(cls, spec: dict) -> ShowoArch:
        spec = dict(spec)
        vq = MagvitConfig.from_dict(spec.pop("vq", {}) or {})
        return cls(vq=vq, **spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def vocab_size(self) -> int:
        return self.llm_vocab_size + self.num_new_special_tokens + self.codebook_size + 1

    @property
    def num_vq_tokens(self) -> int:
        side = self.image_size // self.vq.downsample
        return side * side

    def phi_config(self):
        from transformers import PhiConfig

        kwargs = {"qk_layernorm": True, **{k: v for k, v in self.phi.items() if k != "vocab_size"}}
        config = PhiConfig(vocab_size=self.vocab_size, **kwargs)
        config._attn_implementation = "sdpa"
        return config


@dataclass(frozen=True)
class ShowoVocab:
    """Ids of Show-o's special tokens, image codes and mask token for one architecture."""

    llm_vocab_size: int
    codebook_size: int
    sot: int
    eot: int
    num_new_special_tokens: int = 10

    def special(self, name: str) -> int:
        return self.llm_vocab_size + NEW_SPECIAL_TOKENS.index(name)

    @property
    def pad(self) -> int:
        return self.special("[PAD]")

    @property
    def soi(self) -> int:
        return self.special("<|soi|>")

    @property
    def eoi(self) -> int:
        return self.special("<|eoi|>")

    @property
    def t2i(self) -> int:
        return self.special("<|t2i|>")

    @property
    def mmu(self) -> int:
        return self.special("<|mmu|>")

    @property
    def image_offset(self) -> int:
        return self.llm_vocab_size + self.num_new_special_tokens

    @property
    def mask(self) -> int:
        return self.image_offset + self.codebook_size


def omni_attention_mask(kinds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool (query, key) mask. `kinds` [B, L] long: 0 for a text token, k >= 1 for a token of
    the k-th bidirectional span (an image with its markers, or an understanding prefix); `valid` [B, L]
    bool (False: padding).

    Text is causal; a span's tokens also see the whole span; nothing sees padding; a padding row sees
    itself only (keeps softmax finite)."""
    b, length = kinds.shape
    idx = torch.arange(length, device=kinds.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same_span = (kinds[:, :, None] == kinds[:, None, :]) & (kinds[:, :, None] > 0)
    allowed = (causal | same_span) & valid[:, None, :] & valid[:, :, None]
    eye = torch.eye(length, dtype=torch.bool, device=kinds.device)[None]
    return allowed | (eye & ~valid[:, :, None])


class Showo(nn.Module):
    """The trainable Show-o module: `self.showo` is a transformers `PhiForCausalLM` over the extended
    vocabulary. `forward(ids, mask, positions) -> logits [B, L, vocab]`."""

    def __init__(self, arch: ShowoArch):
        super().__init__()
        from transformers import PhiForCausalLM

        self.arch = arch
        self.showo = PhiForCausalLM(arch.phi_config())

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, hidden] (apply `self.showo.lm_head` to the positions that need logits)."""
        return self.showo.model(input_ids=input_ids, attention_mask=attention_mask[:, None],
                                position_ids=position_ids, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, last: int = 0) -> torch.Tensor:
        """Logits of every position, or of the `last` positions only (`last` > 0)."""
        return self.showo(input_ids=input_ids, attention_mask=attention_mask[:, None],
                          position_ids=position_ids, use_cache=False, logits_to_keep=last).logits
