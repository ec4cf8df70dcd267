"""The in-memory `Character`: everything cmrp knows about one role-play character.

Every reader (native, RoleScape-20, MMRole) produces this model and every task builder consumes it,
so training and evaluation never depend on an on-disk layout. It is plain data: no model, no
tokenizer, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Character",
    "CharacterSplit",
    "ImageRef",
    "MultipleChoice",
    "OpenQA",
    "Profile",
    "Scene",
    "T2IItem",
    "Turn",
    "VQAItem",
]

Role = Literal["user", "character"]


@dataclass
class Profile:
    """Who the character is: the free-text profile plus structured fields (traits, catchphrases, ...)."""

    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageRef:
    """An image of the character. `attributes` holds ground truth where known (the sandbox renderer)."""

    id: str
    path: Path
    caption: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Turn:
    """One turn of a dialogue. A character turn may show an image (`image_id`) and carry the
    image-reasoning text that leads to it (`thinking`, then `generation_instruction`). A user turn's
    `image_id` is an image the user shares for the character to talk about (MMRole dialogues)."""

    role: Role
    text: str
    image_id: str | None = None
    thinking: str | None = None
    generation_instruction: str | None = None


@dataclass
class Scene:
    """A dialogue: alternating user / character turns. On a test split, the first `context_turns` turns are
    given context, not held-out replies to score (an MMRole test record: its history, then one reply)."""

    id: str
    turns: list[Turn]
    context_turns: int = 0


@dataclass
class OpenQA:
    question: str
    answer: str


@dataclass
class MultipleChoice:
    """A multiple-choice question; `answer` indexes `options`."""

    question: str
    options: list[str]
    answer: int
    difficulty: str | None = None


@dataclass
class VQAItem:
    """Questions about one image, open and multiple choice."""

    image_id: str
    open: list[OpenQA] = field(default_factory=list)
    mcq: list[MultipleChoice] = field(default_factory=list)


@dataclass
class T2IItem:
    """A text-to-image instruction; `image_id` names a target image when one exists. `caption` says what
    the image should show in plain words, for rewards and evaluation, when the instruction does not (it
    may name the character instead of describing it); None: the instruction is that description."""

    instruction: str
    image_id: str | None = None
    caption: str | None = None


@dataclass
class CharacterSplit:
    """One split (train or test) of a character's material."""

    images: dict[str, ImageRef] = field(default_factory=dict)
    scenes: list[Scene] = field(default_factory=list)
    knowledge_open: list[OpenQA] = field(default_factory=list)
    knowledge_mcq: list[MultipleChoice] = field(default_factory=list)
    vqa: list[VQAItem] = field(default_factory=list)
    t2i: list[T2IItem] = field(default_factory=list)
    judge_questions: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Character:
    """A character: profile, train split (reference images, dialogues, QA) and held-out test split."""

    name: str
    profile: Profile
    train: CharacterSplit
    test: CharacterSplit = field(default_factory=CharacterSplit)
    root: Path | None = None
    source_format: str = "native"
    warnings: list[str] = field(default_factory=list)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # per file read: what it gave (`data validate`)

    @property
    def reference_images(self) -> list[ImageRef]:
        return list(self.train.images.values())
