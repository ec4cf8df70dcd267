"""The contract between training/evaluation code and a backbone adapter.

A `typing.Protocol`, not a base class: an adapter owns its model, tokenizer and special tokens, and
the training modules only call these methods — they never touch model internals. Examples come in
model-agnostic form (`cmrp.data.tasks.Example`); the adapter's `collate` turns them into whatever
tensors its model needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from cmrp.data.tasks import Example
from cmrp.sampling.rollout import Rollout

__all__ = ["Backbone", "ImageHead", "LossDict"]

ImageHead = Literal["flow", "tokens"]
LossDict = dict[str, torch.Tensor]


@runtime_checkable
class Backbone(Protocol):
    """What every backbone adapter provides."""

    image_head: ImageHead
    model: torch.nn.Module  # the trainable module (wrapped by PEFT in LoRA modes)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> Backbone:
        """Random-init from the card's architecture, or load `card.weights` when set."""
        ...

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Backbone:
        """Load a saved backbone; raise `WeightsError` naming what is missing and how to get it."""
        ...

    def save_pretrained(self, path: str | Path) -> Path:
        """Write weights (safetensors), config and tokenizer so `from_pretrained` restores them."""
        ...

    # -- fine-tuning ---------------------------------------------------------------------------
    def lora_targets(self, kind: str = "default") -> list[str]:
        """Module-name patterns for LoRA of a kind ("default", "generation", "understanding")."""
        ...

    def trainable_groups(self) -> dict[str, list[str]]:
        """Parameter-name prefixes per group (e.g. understanding vs generation expert)."""
        ...

    # -- training ------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> Any:
        """Tokenize and pack examples into a batch for `losses` / `score_text`."""
        ...

    def losses(self, batch: Any) -> LossDict:
        """One forward pass: {"ce": mean CE over trained text tokens, "mse": mean image loss}.
        A term with nothing to train on in the batch is a zero tensor that keeps the graph."""
        ...

    def text_loss(self, batch: Any) -> torch.Tensor: ...

    def image_loss(self, batch: Any) -> torch.Tensor: ...

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_text(self, examples: list[Example]) -> torch.Tensor:
        """Sum of log-probs of the trained text segments, one value per example (MCQ by likelihood)."""
        ...

    @torch.no_grad()
    def generate_text(self, contexts: list[Example], *, max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        """Continue each context with a character turn."""
        ...

    @torch.no_grad()
    def sample_images(self, contexts: list[Example], *, n: int = 1, steps: int = 20, seed: int = 0,
                      noise: float = 0.0, window: tuple[int, int] | None = None, sde: str = "sde",
                      same_noise: bool = False) -> Rollout:
        """`n` images per context (`Rollout.images`: [len(contexts)*n, 3, H, W] in [0, 1]); the context is
        encoded once and shared by its n samples. Inside `window` (step indices [start, end)) steps are
        stochastic with noise level `noise` and their transitions are stored for `rollout_logprob`."""
        ...

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None, *,
                        return_mean: bool = False) -> Any:
        """Log-prob of stored transition `step` of samples `index` under the current weights, with
        gradients (GRPO's new policy). With `return_mean`, a tuple for `Rollout.step_kl`: flow heads
        (logp, mean, std) of the Gaussian step; token heads (logp, per-token log-probs, step positions)."""
        ...

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], options: list[list[str] | None]) -> list[str]:
        """VQA about images (self-VQA reward, evaluation): the chosen option's text, or a free answer."""
        ...

    def to(self, device: torch.device | str) -> Backbone: ...
