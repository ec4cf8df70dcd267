"""Evaluation metrics as pure functions: tensors and strings in, numbers out.

Feature extractors are injected (any `encode_image` / `encode_text` encoder for CLIP, any
`images -> [B, D]` callable for DINO, any `(a, b) -> [N]` distance for diversity, any
`images -> [B, D]` module for FID/KID), so the same numbers can be computed with pretrained nets on a
GPU or with weight-free proxies in tests. Where torchmetrics defines a metric it computes it: CLIP-T
(CLIPScore, for a transformers CLIP), FID and KID; LPIPS comes in as its distance.
A metric with nothing to measure returns NaN rather than a made-up value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.backbones.protocol import Backbone
from cmrp.data.character import Character, MultipleChoice
from cmrp.data.tasks import OPTION_LETTERS, Example, Segment, format_mcq
from cmrp.evaluation.mcq import mcq_accuracy
from cmrp.rewards._ops import cosine_matrix

__all__ = [
    "catchphrase_rate",
    "clip_i",
    "clip_t",
    "dino_similarity",
    "distinct_n",
    "fid_kid",
    "mcq_accuracy_by_generation",
    "mcq_accuracy_by_likelihood",
    "mean_cosine",
    "paired_cosine",
    "parse_option",
    "persona_stats",
    "quirk_markers",
    "quirk_rate",
    "self_repetition",
    "token_f1",
    "max_reference_similarity",
    "within_prompt_diversity",
]

NAN = float("nan")


# -- image / text feature metrics ------------------------------------------------------------------
def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every (row of a, row of b) pair."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return NAN
    a = F.normalize(a.float().flatten(1), dim=-1)
    b = F.normalize(b.float().flatten(1), dim=-1).to(a.device)
    return float((a @ b.T).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of row i of a with row i of b (image i vs its own text)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_cosine: {a.shape[0]} rows vs {b.shape[0]} rows")
    if a.shape[0] == 0:
        return NAN
    return float(F.cosine_similarity(a.float().flatten(1), b.float().flatten(1).to(a.device), dim=-1).mean())


def clip_i(encoder: Any, images: torch.Tensor, references: torch.Tensor) -> float:
    """CLIP-I: mean CLIP image-image cosine between generated images and reference images."""
    if images.shape[0] == 0 or references.shape[0] == 0:
        return NAN
    return mean_cosine(encoder.encode_image(images), encoder.encode_image(references))


def clip_t(encoder: Any, images: torch.Tensor, texts: Sequence[str]) -> float:
    """CLIP-T: mean CLIP cosine of each image with its own text (the prompt, or the reply it came with).
    For a transformers CLIP (an encoder with `torchmetrics_model()`) it is torchmetrics' CLIPScore / 100
    (which floors the mean at 0); otherwise the mean paired cosine of the encoder's embeddings."""
    if len(texts) != images.shape[0]:
        raise ValueError(f"clip_t: {len(texts)} texts for {images.shape[0]} images")
    if not texts:
        return NAN
    pair = getattr(encoder, "torchmetrics_model", None)
    if callable(pair):
        from torchmetrics.functional.multimodal import clip_score

        device = getattr(encoder, "device", images.device)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).to(device)
        return float(clip_score(list(pixels), list(texts), model_name_or_path=pair)) / 100.0
    return paired_cosine(encoder.encode_image(images), encoder.encode_text(list(texts)))


def dino_similarity(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    references: torch.Tensor) -> float:
    """DINO identity similarity: mean feature cosine between generated and reference images."""
    if images.shape[0] == 0 or references.shape[0] == 0:
        return NAN
    return mean_cosine(features(images), features(references))


def max_reference_similarity(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                             references: torch.Tensor) -> float:
    """Mean over images of the highest feature cosine to any reference image: how close samples come to
    copying the training set (what Character-GRPO's train-set penalty pushes down)."""
    if images.shape[0] == 0 or references.shape[0] == 0:
        return NAN

    return float(cosine_matrix(features(images), features(references)).max(dim=1).values.mean())


def within_prompt_diversity(distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                            group_ids: torch.Tensor) -> float:
    """Mean over prompts of the mean pairwise distance between that prompt's samples (0 = all alike).
    Prompts with a single sample have no pair and are left out; NaN when no prompt has two."""
    ids = group_ids.flatten().cpu()
    per_group = []
    for gid in ids.unique():
        idx = (ids == gid).nonzero(as_tuple=True)[0]
        if idx.numel() < 2:
            continue
        i, j = torch.triu_indices(idx.numel(), idx.numel(), offset=1)
        d = distance(images[idx[i]], images[idx[j]]).float()
        per_group.append(float(d.mean()))
    return sum(per_group) / len(per_group) if per_group else NAN


def fid_kid(features: torch.nn.Module, real: torch.Tensor, generated: torch.Tensor, *, min_images: int = 2,
            kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, Any]:
    """FID and KID (torchmetrics) between real and generated images in [0,1], on `features` (an
    `images -> [N, D]` module: torch-fidelity's InceptionV3 for the standard numbers, anything for tests).

    Small samples: below `min_images` on either side both are NaN (the covariance needs two); KID's subset
    size is capped at the smaller set. FID from a few dozen images is strongly biased upward, so compare
    it only between runs with the same image counts (which the result records)."""
    n_real, n_gen = int(real.shape[0]), int(generated.shape[0])
    out: dict[str, Any] = {"fid": NAN, "kid_mean": NAN, "kid_std": NAN, "fid_real_images": n_real,
                           "fid_generated_images": n_gen}
    if min(n_real, n_gen) < max(2, min_images):
        out["fid_note"] = f"not computed: needs at least {max(2, min_images)} real and generated images"
        return out
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    device = next(features.parameters(), torch.zeros(0)).device
    real, generated = real.float().clamp(0, 1).to(device), generated.float().clamp(0, 1).to(device)
    fid = FrechetInceptionDistance(feature=features, normalize=True).to(device)
    with warnings.catch_warnings():  # KID's "saves all features in a buffer" warning
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, subsets=kid_subsets,
                                      subset_size=min(kid_subset_size, n_real, n_gen), normalize=True).to(device)
    with torch.no_grad():
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(generated, real=False)
        out["fid"] = float(fid.compute())
        kid_mean, kid_std = kid.compute()
    out["kid_mean"], out["kid_std"] = float(kid_mean), float(kid_std)
    return out


# -- persona statistics ----------------------------------------------------------------------------
_WORD = re.compile(r"[\w'~-]+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over the whole set of texts (low = repetitive)."""
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else NAN


def self_repetition(texts: Sequence[str], n: int = 3) -> float:
    """Mean over texts of the share of a text's n-grams that repeat an earlier n-gram of the same text
    (degenerate loops such as "la la la la" score near 1). Texts shorter than n are left out."""
    rates = []
    for text in texts:
        grams = _ngrams(_tokens(text), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else NAN


def _norm(text: str) -> str:
    return " ".join(_tokens(text))


def catchphrase_rate(texts: Sequence[str], catchphrases: Sequence[str]) -> float:
    """Share of texts that contain at least one catchphrase (case and punctuation ignored)."""
    phrases = [p for p in (_norm(c) for c in catchphrases) if p]
    if not texts or not phrases:
        return NAN
    hits = sum(any(f" {p} " in f" {_norm(t)} " for p in phrases) for t in texts)
    return hits / len(texts)


def quirk_markers(description: str) -> list[str]:
    """The literal markers a quirk description quotes, e.g. "ends every sentence with '~nya'" -> ['~nya']."""
    return [m for m in re.findall(r"['\"]([^'\"]{1,20})['\"]", description) if m.strip()]


def quirk_rate(texts: Sequence[str], description: str, name: str = "") -> float:
    """Share of texts that show the speech quirk. Checkable quirks: quoted markers ('~nya', '!!'),
    speaking in the third person (the name, no I/me/my), stuttering on the first word ("H-Hello").
    NaN when the description names nothing a program can check."""
    if not texts or not description:
        return NAN
    markers = quirk_markers(description)
    lowered = description.lower()
    if markers:
        def shows(t: str) -> bool:
            return any(m in t for m in markers)
    elif "third person" in lowered and name:
        def shows(t: str) -> bool:
            return name.lower() in t.lower() and not re.search(r"\b(i|me|my|i'm|i've)\b", t.lower())
    elif "stutter" in lowered:
        def shows(t: str) -> bool:
            return re.match(r"^\s*([A-Za-z])-\1", t, flags=re.IGNORECASE) is not None
    else:
        return NAN
    return sum(shows(t) for t in texts) / len(texts)


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between a reply and the reference reply (SQuAD-style overlap)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return 0.0 if pred or ref else 1.0
    common: dict[str, int] = {}
    ref_counts: dict[str, int] = {}
    for w in ref:
        ref_counts[w] = ref_counts.get(w, 0) + 1
    for w in pred:
        if ref_counts.get(w, 0) > common.get(w, 0):
            common[w] = common.get(w, 0) + 1
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def persona_stats(texts: Sequence[str], character: Character | None = None,
                  references: Sequence[str] | None = None) -> dict[str, float]:
    """Style numbers of a set of replies; catchphrase / quirk rates when the profile lists them
    (`profile.fields["catchphrases"]`, `profile.fields["quirk_description"]`)."""
    texts = list(texts)
    out = {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "self_repetition": self_repetition(texts),
        "mean_words": (sum(len(_tokens(t)) for t in texts) / len(texts)) if texts else NAN,
        "empty_rate": (sum(not t.strip() for t in texts) / len(texts)) if texts else NAN,
    }
    if character is not None:
        fields = character.profile.fields or {}
        phrases = fields.get("catchphrases") or []
        if isinstance(phrases, str):
            phrases = [phrases]
        if phrases:
            out["catchphrase_rate"] = catchphrase_rate(texts, [str(p) for p in phrases])
        quirk = fields.get("quirk_description") or ""
        if isinstance(quirk, str) and quirk:
            rate = quirk_rate(texts, quirk, character.name)
            if not math.isnan(rate):
                out["quirk_rate"] = rate
    if references is not None:
        refs = list(references)
        if len(refs) != len(texts):
            raise ValueError(f"persona_stats: {len(texts)} replies vs {len(refs)} references")
        out["token_f1"] = sum(token_f1(t, r) for t, r in zip(texts, refs, strict=True)) / len(texts) if texts else NAN
    return out


# -- multiple choice ---------------------------------------------------------------------------------
MCQItems = list[tuple[list[Segment], MultipleChoice]]


def mcq_accuracy_by_likelihood(backbone: Backbone, items: MCQItems, task: str) -> float:
    """Accuracy when the model picks the option whose answer text it finds most likely."""
    return mcq_accuracy(backbone, items, task)


_LETTER_PATTERNS = (
    r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\b",  # "Answer: B", "the answer is (C)"
    r"^\s*\(?([A-J])(?:[.):]|\s*$)",  # "B. ...", "(B)", "B" (not the article in "A dragon")
    r"\(([A-J])\)",  # "... (B) ..."
)


def parse_option(text: str, options: Sequence[str]) -> int | None:
    """The option a free-text answer chooses: a letter ("B", "(B)", "Answer: B") or, failing that, the
    one option whose text it contains. None when it names no option or several."""
    letters = OPTION_LETTERS[: len(options)]
    stripped = text.strip()
    for pattern in _LETTER_PATTERNS:
        match = re.search(pattern, stripped, flags=re.IGNORECASE | re.MULTILINE)
        if match and match.group(1).upper() in letters:
            return letters.index(match.group(1).upper())
    norm = f" {_norm(stripped)} "
    found = [i for i, opt in enumerate(options) if _norm(opt) and f" {_norm(opt)} " in norm]
    if len(found) > 1:  # an option contained in another ("red" in "dark red"): keep the longest
        longest = max(found, key=lambda i: len(_norm(options[i])))
        if all(_norm(options[i]) in _norm(options[longest]) for i in found):
            return longest
        return None
    return found[0] if found else None


def mcq_accuracy_by_generation(backbone: Backbone, items: MCQItems, task: str, *, max_new_tokens: int = 16,
                               batch_size: int = 16) -> tuple[float, float]:
    """Accuracy when the model writes its answer and the chosen option is parsed from the text.
    Returns (accuracy, parse_rate); an answer naming no option counts as wrong."""
    if not items:
        return NAN, NAN
    contexts = [Example(task, [*prefix, Segment("text", "user", format_mcq(item.question, item.options))])
                for prefix, item in items]
    answers: list[str] = []
    for start in range(0, len(contexts), batch_size):
        answers += backbone.generate_text(contexts[start:start + batch_size], max_new_tokens=max_new_tokens)
    correct = parsed = 0
    for answer, (_, item) in zip(answers, items, strict=True):
        choice = parse_option(answer, item.options)
        parsed += choice is not None
        correct += choice == item.answer
    return correct / len(items), parsed / len(items)
