"""Model-agnostic training examples built from a `Character`.

Unified-SFT mixes five tasks. Each becomes an `Example`: a sequence of text and image
`Segment`s, some of which carry a loss (`train=True`). Backbone adapters tokenize examples
(chat template, image tokens) — data stays free of any model.

Tasks:
- chat: a dialogue history, then the character's reply (CE on the reply).
- thinking: a dialogue turn that shows an image, then the image-reasoning text
  (thinking + generation instruction; CE).
- t2i: an instruction (or, with chain decoding, the dialogue + reply) -> image (flow / token loss).
- vqa: an image and a question -> the answer (CE), open and multiple choice.
- knowledge_qa: a question about the character -> the answer (CE), open and multiple choice.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmrp.data.character import Character, CharacterSplit, MultipleChoice, Turn
from cmrp.errors import DataError
from cmrp.sampling.decoding import get_strategy

__all__ = [
    "TASKS",
    "Example",
    "ImagePrompt",
    "Segment",
    "build_examples",
    "character_corpus",
    "format_mcq",
    "image_prompts",
    "mcq_option_examples",
    "shuffled_mix",
    "system_prompt",
]

TASKS = ("chat", "thinking", "t2i", "vqa", "knowledge_qa")
SegmentRole = Literal["system", "user", "character"]
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass
class Segment:
    """A piece of an example: text in a role, or an image to understand or to generate."""

    kind: Literal["text", "image"]
    role: SegmentRole = "user"
    text: str = ""
    image: Path | None = None
    pixels: Any = None  # image only: an in-memory [3, H, W] tensor in [0, 1] instead of a file
    generate: bool = False  # image only: generated (loss on it) rather than understood
    train: bool = False  # carries a loss


@dataclass
class Example:
    task: str
    segments: list[Segment] = field(default_factory=list)


def system_prompt(character: Character) -> str:
    return f"You are {character.name}. Stay in character."


def _text(role: SegmentRole, text: str, train: bool = False) -> Segment:
    return Segment(kind="text", role=role, text=text, train=train)


def _image(path: Path, generate: bool = False) -> Segment:
    return Segment(kind="image", role="character" if generate else "user", image=path, generate=generate, train=generate)


def format_mcq(question: str, options: list[str]) -> str:
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def _mcq_answer(item: MultipleChoice) -> str:
    return f"{OPTION_LETTERS[item.answer]}. {item.options[item.answer]}"


def _character_turns(character: Character, split: CharacterSplit) -> Iterable[tuple[list[Segment], Turn]]:
    """Each character turn of each scene with the segments before it (system prompt, the dialogue, and
    images users share, to be understood); a character turn's own image is the one it generates."""
    system = _text("system", system_prompt(character))
    for scene in split.scenes:
        history: list[Segment] = [system]
        for turn in scene.turns:
            if turn.role == "character":
                yield list(history), turn
            elif turn.image_id and turn.image_id in split.images:
                history.append(_image(split.images[turn.image_id].path))  # an image the user shares (MMRole)
            history.append(_text(turn.role, turn.text))


def _chat_examples(character: Character, split: CharacterSplit, decoding: str) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {"chat": [], "thinking": [], "t2i": []}
    for history, turn in _character_turns(character, split):
        out["chat"].append(Example("chat", [*history, _text("character", turn.text, train=True)]))
        image = split.images.get(turn.image_id) if turn.image_id else None
        if image is not None:
            out["t2i"].append(Example("t2i", _image_conditioning(history, turn, decoding) + [_image(image.path, True)]))
            reasoning = _reasoning_text(turn.thinking, turn.generation_instruction)
            if reasoning:
                thinking_ctx = [*history, _text("character", turn.text)]
                out["thinking"].append(Example("thinking", [*thinking_ctx, _text("character", reasoning, train=True)]))
    return out


def _reasoning_text(thinking: str | None, instruction: str | None) -> str:
    parts = []
    if thinking:
        parts.append(f"<think>{thinking}</think>")
    if instruction:
        parts.append(instruction)
    return "\n".join(parts)


def _image_conditioning(history: list[Segment], turn: Turn, decoding: str) -> list[Segment]:
    """Chain decoding conditions the image on the reply text (p(I|Q,T)); joint does not (p(I|Q)); think
    mode also on the character's thinking (`<think>…</think>` + instruction, as the model writes it).
    The reference generation instruction is seen only as part of that thinking: at inference (chat,
    evaluation) no other decoding has it, so training on it would teach an image nobody can ask for."""
    strategy = get_strategy(decoding)
    context = list(history)
    if strategy.image_sees_reply:
        context.append(_text("character", turn.text))
    reasoning = _reasoning_text(turn.thinking, turn.generation_instruction) if strategy.think else None
    if reasoning:
        context.append(_text("character", reasoning))
    return context


def build_examples(
    character: Character, tasks: Iterable[str] = TASKS, *, split: str = "train", decoding: str = "chain"
) -> dict[str, list[Example]]:
    """All examples of the requested tasks, keyed by task name."""
    data = character.train if split == "train" else character.test
    wanted = set(tasks)
    unknown = wanted - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
    out: dict[str, list[Example]] = {t: [] for t in TASKS if t in wanted}
    chat = _chat_examples(character, data, decoding)
    for task in ("chat", "thinking"):
        if task in wanted:
            out[task] = chat[task]
    if "t2i" in wanted:
        out["t2i"] = chat["t2i"] + [
            Example("t2i", [_text("user", item.instruction), _image(data.images[item.image_id].path, True)])
            for item in data.t2i
            if item.image_id in data.images
        ]
    if "vqa" in wanted:
        for item in data.vqa:
            image = data.images.get(item.image_id)
            if image is None:
                continue
            for qa in item.open:
                out["vqa"].append(Example("vqa", [_image(image.path), _text("user", qa.question), _text("character", qa.answer, True)]))
            for mcq in item.mcq:
                prompt = format_mcq(mcq.question, mcq.options)
                out["vqa"].append(Example("vqa", [_image(image.path), _text("user", prompt), _text("character", _mcq_answer(mcq), True)]))
    if "knowledge_qa" in wanted:
        system = _text("system", system_prompt(character))
        for qa in data.knowledge_open:
            out["knowledge_qa"].append(Example("knowledge_qa", [system, _text("user", qa.question), _text("character", qa.answer, True)]))
        for mcq in data.knowledge_mcq:
            prompt = format_mcq(mcq.question, mcq.options)
            out["knowledge_qa"].append(Example("knowledge_qa", [system, _text("user", prompt), _text("character", _mcq_answer(mcq), True)]))
    return out


@dataclass
class ImagePrompt:
    """A context the character answers with an image (GRPO prompts, evaluation): the context
    segments, the text that describes the wanted image (for rewards and metrics: the target image's
    caption, else the item's caption, else its instruction), and the target image when one exists."""

    context: Example
    prompt: str
    image_id: str | None = None


def image_prompts(character: Character, *, split: str = "train", decoding: str = "chain") -> list[ImagePrompt]:
    """Every image-generation context of a split: dialogue turns that show an image (conditioned as
    `decoding` says) and stand-alone T2I instructions — the same contexts the t2i task trains on."""
    data = character.train if split == "train" else character.test
    out: list[ImagePrompt] = []
    def caption(image_id: str | None) -> str | None:
        image = data.images.get(image_id) if image_id else None
        return image.caption if image is not None and image.caption else None

    for history, turn in _character_turns(character, data):
        if turn.image_id:
            context = Example("t2i", _image_conditioning(history, turn, decoding))
            text = caption(turn.image_id) or turn.generation_instruction or turn.text
            out.append(ImagePrompt(context, text, turn.image_id))
    for item in data.t2i:
        text = caption(item.image_id) or item.caption or item.instruction
        out.append(ImagePrompt(Example("t2i", [_text("user", item.instruction)]), text, item.image_id))
    return out


def mcq_option_examples(prefix: list[Segment], item: MultipleChoice, task: str) -> list[Example]:
    """One example per option, the option's answer text trained, for scoring by likelihood."""
    prompt = format_mcq(item.question, item.options)
    return [
        Example(task, [*prefix, _text("user", prompt), _text("character", f"{OPTION_LETTERS[i]}. {opt}", True)])
        for i, opt in enumerate(item.options)
    ]


def character_corpus(character: Character) -> list[str]:
    """Every piece of text of a character (for training a local tokenizer)."""
    texts = [character.profile.text, system_prompt(character)]
    for split in (character.train, character.test):
        for scene in split.scenes:
            for turn in scene.turns:
                texts += [turn.text, turn.thinking or "", turn.generation_instruction or ""]
        texts += [q.question + " " + q.answer for q in split.knowledge_open]
        texts += [format_mcq(m.question, m.options) for m in split.knowledge_mcq]
        for item in split.vqa:
            texts += [q.question + " " + q.answer for q in item.open]
            texts += [format_mcq(m.question, m.options) for m in item.mcq]
        texts += [t.instruction for t in split.t2i] + [t.caption for t in split.t2i if t.caption]
    return [t for t in texts if t]


def shuffled_mix(examples: dict[str, list[Example]], weights: dict[str, float], n: int, seed: int) -> list[Example]:
    """Draw `n` examples: a task by weight, then an example of that task uniformly."""
    rng = random.Random(seed)
    tasks = [t for t, w in weights.items() if w > 0 and examples.get(t)]
    if not tasks:  # `cmrp validate` and fit's preflight say this first, naming the data
        counts = ", ".join(f"{t} {len(examples.get(t, []))}" for t, w in weights.items() if w > 0)
        raise DataError(f"no training examples for any task with a weight above 0 ({counts or 'no task weighted'})")
    task_weights = [weights[t] for t in tasks]
    picks = rng.choices(tasks, weights=task_weights, k=n)
    return [rng.choice(examples[t]) for t in picks]

