"""Adapter logic that is the same for every backbone: written once, called by each adapter.

Both helpers use only the protocol (`score_text`, `generate_text`) and the card, so an adapter keeps
what is its own (tokenizer, model) and shares what is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cmrp.data.character import MultipleChoice
from cmrp.data.tasks import Example, Segment, mcq_option_examples
from cmrp.errors import ConfigError

__all__ = ["answer_questions", "select_lora_targets"]


def select_lora_targets(defaults: Mapping[str, Sequence[str]], card: Any, kind: str) -> list[str]:
    """The module-name patterns of LoRA target set `kind`: the adapter's defaults, overridden per set by the
    card's `lora_targets` mapping."""
    targets = {k: list(v) for k, v in defaults.items()}
    overrides = card.get("lora_targets") if card is not None else None
    if overrides:
        targets.update({str(k): [str(p) for p in v] for k, v in dict(overrides).items()})
    if kind not in targets:
        raise ConfigError(f"finetune.targets: unknown LoRA target set {kind!r}; known: {sorted(targets)}")
    return targets[kind]


@torch.no_grad()
def answer_questions(backbone: Any, images: torch.Tensor, questions: list[str], options: list[list[str] | None],
                     *, score_batch: int = 64, max_new_tokens: int = 24) -> list[str]:
    """VQA about `images` ([N, 3, H, W] in [0, 1]): multiple choice by option likelihood (the option whose
    answer text scores highest), open questions by greedy decoding. Returns the chosen option's text or the
    free answer, one per question."""
    answers: list[str] = [""] * len(questions)
    mcq_examples: list[Example] = []
    spans, open_idx = [], []
    for i, (question, opts) in enumerate(zip(questions, options, strict=True)):
        if opts:
            spans.append((i, len(mcq_examples), len(opts)))
            image = Segment("image", "user", pixels=images[i])
            mcq_examples += mcq_option_examples([image], MultipleChoice(question, list(opts), 0), "vqa")
        else:
            open_idx.append(i)
    if mcq_examples:
        scores = torch.cat([backbone.score_text(mcq_examples[k:k + score_batch])
                            for k in range(0, len(mcq_examples), score_batch)])
        for i, first, count in spans:
            answers[i] = options[i][int(scores[first:first + count].argmax())]
    if open_idx:
        contexts = [Example("vqa", [Segment("image", "user", pixels=images[i]),
                                    Segment("text", "user", text=questions[i])]) for i in open_idx]
        for i, text in zip(open_idx, backbone.generate_text(contexts, max_new_tokens=max_new_tokens), strict=True):
            answers[i] = text
    return answers
