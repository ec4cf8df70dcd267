"""The contract between training/evaluation/chat code and a backbone adapter.

A `typing.Protocol`, not a base class: an adapter owns its model, tokenizer and special tokens, and the
training modules only call these members — they never touch model internals. Every call site types its
backbone as `Backbone`, and mypy (`.ci/run`) checks them, so the protocol is exactly what callers use.

- Examples come in model-agnostic form (`cmrp.data.tasks.Example`); the adapter's `collate` turns them into
  whatever tensors its model needs.
- `losses(batch)` returns `{"text": ..., "image": ...}`: the mean loss over the trained text tokens and the
  mean image loss (a flow MSE for flow heads, a cross-entropy over image codes for token heads).
  `text_loss` / `image_loss` below are the single terms.
- `sample_images(contexts, spec, n=, seed=)` takes a frozen `cmrp.sampling.spec.SamplerSpec` (steps, SDE
  noise and window, SDE kind, same-noise, timestep shift, optional `Guidance`), the same value GRPO,
  evaluation and chat build; a keyword an adapter does not know is a TypeError, never silently dropped.

Optional features are small protocols of their own, checked in one place (`require`), which names the
recipe key and the backbones that have the feature:
- `SupportsThink` (`think_and_sample`: decoding `think`);
- `SupportsFSDP` (`fsdp_wrap_modules`: `trainer.strategy: fsdp`);
- `SupportsGradientCheckpointing` (`set_gradient_checkpointing`: `finetune.gradient_checkpointing`).

A new backbone implements `Backbone` (the contract test runs every registered adapter through it) and
whichever capabilities it has; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

from cmrp.errors import CmrpError, ConfigError
from cmrp.registry import BACKBONES

if TYPE_CHECKING:  # annotations only: importing the protocol (e.g. for `require`) stays free of torch
    import torch

    from cmrp.data.tasks import Example
    from cmrp.sampling.rollout import Rollout
    from cmrp.sampling.spec import SamplerSpec

__all__ = ["Backbone", "ImageHead", "LossDict", "SupportsFSDP", "SupportsGradientCheckpointing", "SupportsThink",
           "image_loss", "require", "supporting", "text_loss"]

ImageHead = Literal["flow", "tokens"]
LossDict: TypeAlias = "dict[str, torch.Tensor]"  # {"text": ..., "image": ...}
C = TypeVar("C")


@runtime_checkable
class Backbone(Protocol):
    """What every backbone adapter provides."""

    image_head: ImageHead
    image_size: int  # side of the square images it generates (and that evaluation compares against)
    max_text_tokens: int  # text tokens kept per segment (the recipe's `data.max_text_tokens`)
    model: torch.nn.Module  # the trainable module (wrapped by PEFT in LoRA modes)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = ...) -> Backbone:
        """Random-init from the card's architecture, or load `card.weights` when set."""
        ...

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = ...) -> Backbone:
        """Load a saved backbone; raise `WeightsError` naming what is missing and how to get it."""
        ...

    def save_pretrained(self, path: str | Path) -> Path:
        """Write weights (safetensors), config and tokenizer so `from_pretrained` restores them."""
        ...

    def to(self, device: torch.device | str) -> Backbone: ...

    @property
    def device(self) -> torch.device: ...

    # -- fine-tuning ---------------------------------------------------------------------------
    def lora_targets(self, kind: str = "default") -> list[str]:
        """Module-name patterns for LoRA of a kind ("default", "generation", "understanding"; the card's
        `lora_targets` override the adapter's defaults)."""
        ...

    def trainable_groups(self) -> dict[str, list[str]]:
        """Parameter-name prefixes per group (e.g. understanding vs generation expert)."""
        ...

    # -- training ------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> Any:
        """Tokenize and pack examples into a batch for `losses`."""
        ...

    def losses(self, batch: Any, *, timestep_shift: float | None = None) -> LossDict:
        """One forward pass: {"text": mean CE over trained text tokens, "image": mean image loss}. A term with
        nothing to train on in the batch is a zero tensor that keeps the graph. `timestep_shift` shifts the
        flow training times (None: the card's; token heads have none)."""
        ...

    # -- inference -----------------------------------------------------------------------------
    def score_text(self, examples: list[Example]) -> torch.Tensor:
        """Sum of log-probs of the trained text segments, one value per example (MCQ by likelihood)."""
        ...

    def generate_text(self, contexts: list[Example], *, max_new_tokens: int = 64, temperature: float = 0.0,
                      seed: int = 0) -> list[str]:
        """Continue each context with a character turn (greedy at temperature 0; `seed` draws otherwise)."""
        ...

    def sample_images(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0) -> Rollout:
        """`n` images per context (`Rollout.images`: [len(contexts)*n, 3, H, W] in [0, 1]), drawn as `spec`
        says; the context is encoded once and shared by its n samples. The steps in `spec.window` are stored
        for `rollout_logprob`."""
        ...

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None, *,
                        return_mean: bool = False) -> Any:
        """Log-prob of stored transition `step` of samples `index` under the current weights, with
        gradients (GRPO's new policy). With `return_mean`, a tuple for `Rollout.step_kl`: flow heads
        (logp, mean, std) of the Gaussian step; token heads (logp, per-token log-probs, step positions)."""
        ...

    def answer(self, images: torch.Tensor, questions: list[str], options: list[list[str] | None]) -> list[str]:
        """VQA about images (self-VQA reward, evaluation): the chosen option's text, or a free answer."""
        ...


# -- optional features -------------------------------------------------------------------------------
@runtime_checkable
class SupportsThink(Protocol):
    """Think decoding: a text turn (the plan), then images drawn with it in the same context."""

    def think_and_sample(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0,
                         max_think_tokens: int = 64, temperature: float = 0.0,
                         text_seed: int = 0) -> tuple[list[str], Rollout]:
        """(thinking texts, rollout): `n` images per context sampled as `sample_images` would from the
        context followed by its thinking."""
        ...


@runtime_checkable
class SupportsFSDP(Protocol):
    """Sharded training (`trainer.strategy: fsdp`)."""

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        """Module classes that become one FSDP unit each."""
        ...


@runtime_checkable
class SupportsGradientCheckpointing(Protocol):
    """Activation recomputation in the backward pass (`finetune.gradient_checkpointing`)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None: ...


def supporting(capability: type) -> list[str]:
    """Registered backbone names whose adapter has `capability` (a plugin that fails to import is left out)."""
    names = []
    for name in BACKBONES.names():
        try:
            cls = BACKBONES.get(name)
        except (ImportError, CmrpError):
            continue
        if isinstance(cls, type) and issubclass(cls, capability):
            names.append(name)
    return names


def require(backbone: object, capability: type[C], *, feature: str, otherwise: str = "") -> C:
    """`backbone` as `capability`, or one ConfigError naming the recipe `feature` that asks for it, the
    backbone that lacks it and the backbones that have it (`otherwise`: the other fix, e.g. another option)."""
    if isinstance(backbone, capability):
        return backbone
    methods = ", ".join(m for m in vars(capability) if not m.startswith("_"))
    have = supporting(capability)
    use = (" or ".join(have) if have else "a backbone that has it") + (f", or {otherwise}" if otherwise else "")
    raise ConfigError(f"{feature} needs a backbone with {methods} ({capability.__name__}); "
                      f"{type(backbone).__name__} has none — use {use}")


# -- derived members -----------------------------------------------------------------------------------
def text_loss(backbone: Backbone, batch: Any) -> torch.Tensor:
    """The text term of `backbone.losses(batch)`."""
    return backbone.losses(batch)["text"]


def image_loss(backbone: Backbone, batch: Any) -> torch.Tensor:
    """The image term of `backbone.losses(batch)`."""
    return backbone.losses(batch)["image"]
