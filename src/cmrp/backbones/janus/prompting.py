"""Janus-Pro's chat sequences as tensors: one causal sequence per example, right-padded for losses
(`JanusBatch`) or left-padded for sampling (`_Prefix`, rows [conditional | unconditional])."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["HEADERS", "IGNORE", "JanusBatch"]

IGNORE = -100
HEADERS = {"user": "<|User|>: ", "character": "<|Assistant|>:"}  # Janus-Pro's roles (its chat template)


@dataclass
class JanusBatch:
    """Right-padded sequences: ids, validity, next-token labels, image slots and pixels."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] bool: real tokens
    labels: torch.Tensor  # [B, L]: the text token position i predicts (IGNORE: none)
    und_mask: torch.Tensor  # [B, L] bool: placeholder slots of understood images
    gen_mask: torch.Tensor  # [B, L] bool: VQ-code slots of generated images
    gen_pred_mask: torch.Tensor  # [B, L] bool: positions whose next token is a VQ code
    und_pixels: torch.Tensor | None  # [n_und, 3, S, S] in [0, 1]
    gen_pixels: torch.Tensor | None  # [n_gen, 3, S, S] in [0, 1]
    task_ids: list[str] = field(default_factory=list)
    gen_keys: list[str | None] = field(default_factory=list)  # image file of each generated image (code cache)

    def to(self, device) -> JanusBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return JanusBatch(**moved)


@dataclass
class _Seq:
    ids: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # text | und | gen
    trained: list[bool] = field(default_factory=list)  # this token is a text target
    und: list[torch.Tensor] = field(default_factory=list)
    gen: list[torch.Tensor] = field(default_factory=list)
    gen_keys: list[str | None] = field(default_factory=list)

    def add(self, ids: list[int], kind: str = "text", trained: bool = False) -> None:
        self.ids += ids
        self.kinds += [kind] * len(ids)
        self.trained += [trained] * len(ids)


@dataclass
class _Prefix:
    """Left-padded contexts ending where generation starts; rows [conditional | unconditional]."""

    ids: torch.Tensor  # [R, P]
    mask: torch.Tensor  # [R, P] bool
    und_mask: torch.Tensor  # [R, P] bool
    und_pixels: torch.Tensor | None
    contexts: int  # number of conditional rows (C)

