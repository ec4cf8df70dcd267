"""Adapter logic that is the same for every backbone: written once, called by each adapter.

The helpers use only the protocol (`score_text`, `generate_text`), the card or plain tensors, so an adapter
keeps what is its own (tokenizer, model) and shares what is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cmrp.data.character import MultipleChoice
from cmrp.data.tasks import Example, Segment, mcq_option_examples
from cmrp.errors import ConfigError

__all__ = ["answer_questions", "labelled_logprob", "select_lora_targets", "split_answers"]


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


def labelled_logprob(hidden: torch.Tensor, labels: torch.Tensor, head: Any, ignore: int = -100) -> torch.Tensor:
    """`score_text`'s value: per row, the summed log-probability of its labelled tokens ([B] float32, CPU).
    `labels` [B, L] are aligned with `hidden` [B, L, D] (the token each position predicts, `ignore` where none).
    The head and the softmax run on the labelled positions only: an MCQ option is a few tokens of a long
    sequence, and the full-vocabulary softmax over every position was a third of the scoring time."""
    sel = labels != ignore
    logp = torch.log_softmax(head(hidden[sel]).float(), dim=-1)
    token_logp = logp.gather(-1, labels[sel][:, None])[:, 0]
    rows = sel.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], device=hidden.device).index_add(0, rows, token_logp).cpu()


def _segment_key(segment: Segment) -> tuple:
    pixels = None if segment.pixels is None else id(segment.pixels)  # the same in-memory image (held by the caller)
    return (segment.kind, segment.role, segment.text, str(segment.image), pixels, segment.generate, segment.train)


def split_answers(examples: list[Example]) -> tuple[list[Example], list[int], list[str]] | None:
    """Scoring examples as (distinct contexts, each example's context index, each example's answer text)
    when every example ends with its one trained segment, a text answer, after an untrained context (MCQ
    options: one image and question, four answers); None otherwise. An adapter with a prefix cache encodes
    each context once and scores every answer on it."""
    index: dict[tuple, int] = {}
    contexts: list[Example] = []
    rows, answers = [], []
    for example in examples:
        if not example.segments:
            return None
        *context, answer = example.segments
        if answer.kind != "text" or not answer.train or any(s.train or s.generate for s in context):
            return None
        key = (example.task, *(_segment_key(s) for s in context))
        if key not in index:
            index[key] = len(contexts)
            contexts.append(Example(example.task, list(context)))
        rows.append(index[key])
        answers.append(answer.text)
    return contexts, rows, answers


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
