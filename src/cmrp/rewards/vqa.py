"""`vqa_consistency`: do the character's facts hold for the generated image, as judged by a VQA model?"""

from __future__ import annotations

import re
import string
import threading
from collections import Counter
from typing import Any

import torch

from cmrp.errors import ConfigError
from cmrp.registry import REWARDS
from cmrp.rewards._ops import module_device
from cmrp.rewards.base import RewardContext, RewardOutput, VQAQuestion
from cmrp.rewards.inputs import check_inputs
from cmrp.rewards.pretrained import MissingModel, load_transformers, missing_hf_model

__all__ = ["BlipVqaAnswerer", "VqaConsistency", "load_blip_vqa", "match_option", "normalise_answer", "score_answer",
           "token_f1"]

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


def score_answer(question: VQAQuestion, answer: str, exact: bool = False) -> float:
    """1/0 for MCQ and yes/no questions, token F1 in [0, 1] for open questions. `exact`: 1 only when the
    lower-cased, stripped answer equals the expected one (UniCharacter's rule, vqa_scorer.py:88-99)."""
    if exact:
        return float(str(answer).strip().lower() == str(question.answer).strip().lower())
    kind = question_kind(question)
    if kind == "mcq":
        assert question.options is not None
        chosen = match_option(answer, question.options)
        return float(chosen is not None and chosen == _correct_index(question))
    if kind == "yesno":
        return float(_yes_no(answer) == normalise_answer(question.answer))
    return token_f1(answer, question.answer)


class BlipVqaAnswerer:
    """A transformers `BlipForQuestionAnswering` as `.answer(images, questions, options) -> list[str]`.

    Like UniCharacter's VQA scorer (flow_grpo/flow_grpo/vqa_scorer.py:78-86) each image goes through the
    BLIP processor as 8-bit RGB and the answer is generated greedily (`max_length` tokens); options are not
    shown to BLIP, its free answer is matched to them. Questions go in batches of `batch_size`.
    """

    def __init__(self, model: Any, processor: Any, max_length: int = 50, batch_size: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.max_length, self.batch_size = int(max_length), int(batch_size)

    def to(self, device: torch.device | str) -> BlipVqaAnswerer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], options: list[list[str] | None]) -> list[str]:
        device = module_device(self.model) or torch.device("cpu")
        uint8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        answers: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            batch = self.processor(images=list(uint8[start:start + self.batch_size]),
                                   text=list(questions[start:start + self.batch_size]),
                                   padding=True, return_tensors="pt").to(device)
            out = self.model.generate(**batch, max_length=self.max_length)
            answers += [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]
        return answers


def load_blip_vqa(model: str, *, cache_dir: str | None = None, local_files_only: bool | None = None,
                  max_length: int = 50) -> BlipVqaAnswerer:
    """BLIP VQA (`Salesforce/blip-vqa-base`, or a local directory) with its processor, local files first."""
    return load_transformers(
        model, ("BlipForQuestionAnswering", "BlipProcessor"),
        lambda net, processor: BlipVqaAnswerer(net, processor, max_length),
        cache_dir=cache_dir, local_files_only=local_files_only, what=f"vqa_consistency: BLIP VQA model {model!r}",
        alternative="or set the vqa_consistency kwarg `model:` to a local save_pretrained directory, or drop it "
                    "for self-VQA.")


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
    """Asks `context.questions[b]` about `images[b]` and scores the answers.

    MCQ: 1 when the chosen option (text after normalisation, or a letter such as `B` / `B.`) is the
    correct one; yes/no: 1 when the first yes/no word of the answer matches; open: token F1 after
    normalisation (lowercase, no punctuation or articles), so sentence-long answers get credit for
    containing the answer. `exact_match: true` instead gives 1 only for the expected answer, lower-cased
    (UniCharacter's rule). A sample's score is the weighted mean over its questions; a sample without
    questions abstains (NaN, `info["abstained"]` says why) unless `fallback_question` is set, e.g.
    `"Does this image accurately depict: {prompt}?"`, which is asked with expected answer "yes" (as
    UniCharacter does, flow_grpo/flow_grpo/vqa_scorer.py:108-134). All questions of a batch go to the
    answerer in one call.

    The answerer: `answerer=` (an object with `.answer(images, questions, options) -> list[str]`, or that
    callable itself); else `model:` a BLIP VQA hub id or directory (transformers `BlipForQuestionAnswering`,
    e.g. `Salesforce/blip-vqa-base`, loaded from local caches on the first call, `max_length` answer
    tokens); else `context.backbone`, i.e. the policy being trained answers about its own images (self-VQA).
    """

    def __init__(
        self,
        *,
        answerer: Any = None,
        model: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        max_length: int = 50,
        exact_match: bool = False,
        fallback_question: str | None = None,
        device: str | None = None,
    ):
        if fallback_question is not None and "{prompt}" not in fallback_question:
            raise ConfigError(f"vqa_consistency: fallback_question must contain {{prompt}}, got {fallback_question!r}")
        self.answerer = answerer
        self.model, self.cache_dir, self.local_files_only = model, cache_dir, local_files_only
        self.max_length, self.exact_match, self.fallback_question = int(max_length), bool(exact_match), fallback_question
        self.device = device
        self._lock = threading.Lock()

    def missing_weights(self) -> list[MissingModel]:
        """The BLIP files the first call would load and cannot find locally (self-VQA needs none)."""
        if self.answerer is not None or self.model is None:
            return []
        return missing_hf_model("vqa_consistency", self.model, "BlipForQuestionAnswering + BlipProcessor",
                                cache_dir=self.cache_dir, processor=True,
                                alternative="or set the kwarg `model:` to a local directory, or drop it for self-VQA")

    def _answerer(self, context: RewardContext | None, device: torch.device) -> Any:
        with self._lock:
            if self.answerer is None and self.model is not None:
                self.answerer = load_blip_vqa(self.model, cache_dir=self.cache_dir,
                                              local_files_only=self.local_files_only,
                                              max_length=self.max_length).to(self.device or device)
            if self.answerer is not None:
                return self.answerer
        return context.backbone if context is not None else None

    def _questions(self, per_sample: list[list[VQAQuestion]] | None, prompts: list[str]) -> list[list[VQAQuestion]]:
        batch = len(prompts)
        if per_sample is None:
            per_sample = [[] for _ in range(batch)]
        elif len(per_sample) != batch:
            raise ValueError(f"vqa_consistency: context.questions has {len(per_sample)} entries for {batch} images")
        if self.fallback_question is None:
            return [list(questions) for questions in per_sample]
        return [list(questions) or [VQAQuestion(self.fallback_question.format(prompt=prompt), "yes")]
                for questions, prompt in zip(per_sample, prompts, strict=True)]

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput:
        images, prompts, group_ids = check_inputs("vqa_consistency", images, prompts, group_ids)
        batch = images.shape[0]
        per_sample = self._questions(context.questions if context is not None else None, prompts)
        owners = [b for b, questions in enumerate(per_sample) for _ in questions]
        flat = [q for questions in per_sample for q in questions]
        if not flat:
            return RewardOutput.abstain(batch, "no VQA questions in RewardContext.questions", images.device,
                                        n_questions=0)
        answerer = self._answerer(context, images.device)
        if answerer is None:
            raise ConfigError(
                "vqa_consistency has questions to ask but no answerer: set RewardContext.backbone (self-VQA, "
                "the GRPO trainer does this), give the term `model:` (a BLIP VQA model) or pass an `answerer` "
                "object with .answer(images, questions, options), e.g. "
                "build_reward(preset, term_kwargs={'vqa_consistency': {'answerer': model}})."
            )
        index = torch.tensor(owners, dtype=torch.long, device=images.device)
        answers = _ask(
            answerer, images.index_select(0, index), [q.question for q in flat], [q.options for q in flat]
        )
        if len(answers) != len(flat):
            raise ValueError(
                f"vqa_consistency: the answerer returned {len(answers)} answers for {len(flat)} questions"
            )

        scores = torch.full((batch,), float("nan"), dtype=torch.float32)
        totals, weights = [0.0] * batch, [0.0] * batch
        by_kind: dict[str, list[float]] = {"mcq": [], "yesno": [], "open": []}
        for owner, question, answer in zip(owners, flat, answers, strict=True):
            value = score_answer(question, answer, self.exact_match)
            by_kind[question_kind(question)].append(value)
            totals[owner] += question.weight * value
            weights[owner] += question.weight
        for b in range(batch):
            if weights[b] > 0:
                scores[b] = totals[b] / weights[b]
        info: dict[str, Any] = {"n_questions": len(flat)}
        without = sum(w == 0 for w in weights)
        if without:
            info["abstained"] = f"{without} of {batch} samples have no VQA questions in RewardContext.questions"
            info["n_abstained"] = without
        for kind, values in by_kind.items():
            if values:
                info[f"{kind}_mean"] = sum(values) / len(values)
        grouped: list[list[str]] = [[] for _ in range(batch)]
        for owner, answer in zip(owners, answers, strict=True):
            grouped[owner].append(answer)
        info["answers"] = grouped
        return RewardOutput(scores.to(images.device), info)
