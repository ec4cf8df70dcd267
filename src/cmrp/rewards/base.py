"""The reward contract shared by every term, the composite and the GRPO trainer.

A reward scores a batch of generated images: `reward(images, prompts, *, group_ids, context)`.
Images are float `[B,3,H,W]` in [0,1]; `group_ids` marks the GRPO groups (equal id = same group);
`context` carries what only some terms need (reference images, VQA questions, the backbone for
self-VQA). A score of NaN means "this term abstains for this sample" (e.g. no questions to ask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # the policy's type only: rewards import nothing of the backbones
    from cmrp.backbones.protocol import Backbone

__all__ = ["Reward", "RewardContext", "RewardOutput", "VQAQuestion"]


@dataclass
class VQAQuestion:
    """One question about a generated image, with what a faithful image should make the answerer say."""

    question: str
    answer: str  # the expected answer text (for MCQ: the correct option's text)
    options: list[str] | None = None  # MCQ options, None for open / yes-no questions
    answer_index: int | None = None  # index of the correct option for MCQ
    weight: float = 1.0


@dataclass
class RewardContext:
    """Per-batch information some terms need; every field is optional so terms can abstain."""

    reference_images: torch.Tensor | None = None  # [R,3,H,W] in [0,1], the character's reference images
    questions: list[list[VQAQuestion]] | None = None  # per sample b (len B), may be empty lists
    # object with .answer(images [N,3,H,W] in [0,1], questions: list[str], options: list[list[str] | None])
    # -> list[str] (the chosen option's text for MCQ items, free text otherwise); used for self-VQA
    backbone: Backbone | None = None  # the policy (self-VQA answers with its `answer`)
    metadata: list[dict] | None = None


@dataclass
class RewardOutput:
    """Scores `[B]` float32 (NaN = abstain) and anything worth logging about how they came about.

    A term that abstains because an optional input is missing says why once, in `info["abstained"]`
    (a sentence), with `info["n_abstained"]` samples affected."""

    scores: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def abstain(cls, batch: int, reason: str, device: torch.device | str = "cpu", **info: Any) -> RewardOutput:
        """Every sample abstains (NaN) for `reason`."""
        scores = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        return cls(scores, {"abstained": reason, "n_abstained": batch, **info})


@runtime_checkable
class Reward(Protocol):
    """Anything callable with this signature is a reward (terms, `Composite`, plugins)."""

    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput: ...
