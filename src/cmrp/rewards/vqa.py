"""`vqa_consistency`: do the character's facts hold for the generated image, as judged by a VQA model?"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import torch

from cmrp.errors import ConfigError
from cmrp.registry import REWARDS
from cmrp.rewards._ops import check_images
from cmrp.rewards.base import RewardContext, RewardOutput, VQAQuestion

__all__ = ["VqaConsistency", "match_option", "normalise_answer", "score_answer", "token_f1"]

_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?[.:)]?\s*$")
_LETTER_PREFIX = re.compile(r"^\s*(?:option\s+)?\(?([A-Za-z])[.:)]\s+", re.IGNORECASE)


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, articles dropped, whitespace collapsed: how answers compare."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(word for word in words if word not in _ARTICLES)


def token_f1(predicted: str, expected: str) -> float:
    """SQuAD-style token F1 after normalisation, so a sentence containing the answer gets partial credit."""
    pred, gold = normalise_answer(predicted).split(), normalise_answer(expected).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _yes_no(text: str) -> str | None:
    for word in normalise_answer(text).split():
        if word in ("yes", "no"):
            return word
    return None


def match_option(answer: str, options: list[str]) -> int | None:
    """Which option an answer picks: exact text (normalised), a bare letter `B` / `B.` / `(b)`, a letter
    prefix `B. red`, or the one option named inside a sentence (the longer of nested ones, "dark red"
    over "red"). None if nothing matches."""
    normalised = [normalise_answer(option) for option in options]
    said = normalise_answer(answer)
    if said in normalised:
        return normalised.index(said)
    for pattern in (_BARE_LETTER, _LETTER_PREFIX):
        found = pattern.match(answer)
        if found:
            index = ord(found.group(1).upper()) - ord("A")
            if 0 <= index < len(options):
                return index
    padded = f" {said} "
    inside = [i for i, option in enumerate(normalised) if option and f" {option} " in padded]
    if not inside:
        return None
    # "dark red" names "red" too: keep only the matches not contained in another match
    maximal = [
        i for i in inside if not any(j != i and f" {normalised[i]} " in f" {normalised[j]} " for j in inside)
    ]
    return maximal[0] if len(maximal) == 1 else None


def _correct_index(question: VQAQuestion) -> int | None:
    if question.answer_index is not None:
        return question.answer_index
    assert question.options is not None
    return match_option(question.answer, question.options)


def question_kind(question: VQAQuestion) -> str:
    """`mcq` (has options), `yesno` (expected answer is yes/no) or `open`."""
    if question.options:
        return "mcq"
    if normalise_answer(question.answer) in ("yes", "no"):
        return "yesno"
    return "open"


def score_answer(question: VQAQuestion, answer: str) -> float:
    """1/0 for MCQ and yes/no questions, token F1 in [0, 1] for open questions."""
    kind = question_kind(question)
    if kind == "mcq":
        assert question.options is not None
        chosen = match_option(answer, question.options)
        return float(chosen is not None and chosen == _correct_index(question))
    if kind == "yesno":
        return float(_yes_no(answer) == normalise_answer(question.answer))
    return token_f1(answer, question.answer)


def _ask(
    answerer: Any, images: torch.Tensor, questions: list[str], options: list[list[str] | None]
) -> list[str]:
    ask = getattr(answerer, "answer", answerer)
    if not callable(ask):
        raise ConfigError(
            f"vqa_consistency: the answerer {type(answerer).__name__} has no .answer(images, questions, options)"
        )
    return list(ask(images, questions, options))


@REWARDS.register("vqa_consistency")
class VqaConsistency:
    """Asks `context.questions[b]` about `images[b]` and scores the answers (self-VQA by default).

    MCQ: 1 when the chosen option (text after normalisation, or a letter such as `B` / `B.`) is the
    correct one; yes/no: 1 when the first yes/no word of the answer matches; open: token F1 after
    normalisation (lowercase, no punctuation or articles), so sentence-long answers get credit for
    containing the answer. A sample's score is the weighted mean over its questions, NaN when it has
    none. All questions of a batch go to the answerer in one call.

    `answerer`: an object with `.answer(images, questions, options) -> list[str]` (or that callable
    itself); by default `context.backbone`, i.e. the policy being trained answers about its own images.
    """

    def __init__(self, *, answerer: Any = None):
        self.answerer = answerer

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput:
        images = check_images(images, "vqa_consistency")
        batch = images.shape[0]
        scores = torch.full((batch,), float("nan"), dtype=torch.float32)
        per_sample = context.questions if context is not None else None
        if per_sample is None:
            return RewardOutput(scores.to(images.device), {"n_questions": 0})
        if len(per_sample) != batch:
            raise ValueError(
                f"vqa_consistency: context.questions has {len(per_sample)} entries for {batch} images"
            )

        owners = [b for b, questions in enumerate(per_sample) for _ in questions]
        flat = [q for questions in per_sample for q in questions]
        if not flat:
            return RewardOutput(scores.to(images.device), {"n_questions": 0})
        answerer = self.answerer if self.answerer is not None else context.backbone
        if answerer is None:
            raise ConfigError(
                "vqa_consistency has questions to ask but no answerer: set RewardContext.backbone (self-VQA, "
                "the GRPO trainer does this) or pass an `answerer` object with .answer(images, questions, "
                "options), e.g. build_reward(preset, term_kwargs={'vqa_consistency': {'answerer': model}})."
            )
        index = torch.tensor(owners, dtype=torch.long, device=images.device)
        answers = _ask(
            answerer, images.index_select(0, index), [q.question for q in flat], [q.options for q in flat]
        )
        if len(answers) != len(flat):
            raise ValueError(
                f"vqa_consistency: the answerer returned {len(answers)} answers for {len(flat)} questions"
            )

        totals, weights = [0.0] * batch, [0.0] * batch
        by_kind: dict[str, list[float]] = {"mcq": [], "yesno": [], "open": []}
        for owner, question, answer in zip(owners, flat, answers, strict=True):
            value = score_answer(question, answer)
            by_kind[question_kind(question)].append(value)
            totals[owner] += question.weight * value
            weights[owner] += question.weight
        for b in range(batch):
            if weights[b] > 0:
                scores[b] = totals[b] / weights[b]
        info: dict[str, Any] = {"n_questions": len(flat)}
        for kind, values in by_kind.items():
            if values:
                info[f"{kind}_mean"] = sum(values) / len(values)
        grouped: list[list[str]] = [[] for _ in range(batch)]
        for owner, answer in zip(owners, answers, strict=True):
            grouped[owner].append(answer)
        info["answers"] = grouped
        return RewardOutput(scores.to(images.device), info)
