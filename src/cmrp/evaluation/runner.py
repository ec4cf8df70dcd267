"""`cmrp eval`'s work: a checkpoint (loaded by `cmrp.backbones.loading`) and a baseline, every task on the held-out split, collect numbers.

Tasks, each on the character's test split (a native/RoleScape-20 held-out split, or MMRole test files):
- text role-play: held-out dialogue turns with no image -> the model's replies -> persona statistics
  (catchphrase / quirk usage, distinct-n, self-repetition, overlap with the reference reply);
- multimodal role-play: turns where the user shares an image or the character shows one -> reply, and
  for "show" turns an image drawn as the run's decoding says (after the reply: chain, think; from the query
  alone: joint) -> CLIP-T of image vs reply (cross-modal alignment), CLIP-I / DINO of the drawn image vs the
  reference, and for sandbox characters the oracle's text-image agreement (does the image show the scene,
  pose, expression and accessory the reply states?);
- T2I: held-out image prompts, `samples` images each -> CLIP-I (vs target and vs the reference
  images), CLIP-T (vs prompt), DINO identity similarity, diversity within a prompt;
- knowledge QA and VQA: multiple-choice accuracy by option likelihood and by generated answer;
- with a judge: the paper's Memorization / Personality / Diversity and MMRole-Eval's eight ratios.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmrp.backbones.loading import find_checkpoint, load_checkpoint
from cmrp.backbones.protocol import Backbone, SupportsThink, require
from cmrp.config import resolve_recipe_parts
from cmrp.data.character import Character, ImageRef
from cmrp.data.images import load_images
from cmrp.data.tasks import Example, Segment, character_corpus, image_prompts, system_prompt
from cmrp.evaluation import metrics as M
from cmrp.evaluation.features import FeatureSet
from cmrp.evaluation.judge import MMROLE_METRICS, JudgeRequest, ratio_scores
from cmrp.evaluation.mcq import knowledge_mcq_items, vqa_mcq_items
from cmrp.evaluation.oracle import image_oracle_numbers, prompt_attributes, reply_agreement
from cmrp.progress import Progress
from cmrp.registry import BACKBONES
from cmrp.rewards._ops import cosine_matrix
from cmrp.sampling.decoding import get_strategy
from cmrp.sampling.spec import SamplerSpec, recipe_sampling_settings

__all__ = ["EvalOptions", "ModelEval", "TurnItem", "evaluate_model", "load_baseline", "load_images",
           "reference_numbers", "t2i_prompts", "turn_items"]

NAN = float("nan")


@dataclass
class EvalOptions:
    max_items: int = 32  # per task
    samples: int = 2  # images per T2I prompt
    steps: int = 20  # flow sampling steps
    max_new_tokens: int = 48
    seed: int = 0
    batch_size: int = 8
    max_references: int = 16  # reference images compared against (CLIP-I, DINO)
    think: bool = False  # think decoding: "show" turns write the character's thinking before the image
    image_sees_reply: bool = True  # chain / think: "show" turns draw after the reply; joint: from the query alone
    sampling: dict[str, Any] = field(default_factory=dict)  # sampling settings (guidance, timestep shift): spec.py


@dataclass
class TurnItem:
    """A held-out character turn with what came before it."""

    context: list[Segment]
    reference: str
    history_text: str
    user_image: ImageRef | None = None
    shown_image: ImageRef | None = None
    instruction: str | None = None


@dataclass
class ModelEval:
    """Numbers per task plus what the report shows (replies, sample images)."""

    numbers: dict[str, dict[str, Any]] = field(default_factory=dict)
    replies: dict[str, list[str]] = field(default_factory=dict)
    t2i_images: list[torch.Tensor] = field(default_factory=list)  # per prompt [n, 3, H, W]
    shown_images: list[torch.Tensor] = field(default_factory=list)  # per multimodal "show" turn [3, H, W]
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per-image values (report intervals)


# -- loading ---------------------------------------------------------------------------------------------
def load_baseline(spec: str, cfg: Any, character: Character) -> tuple[Backbone, str]:
    """`base`: the run's architecture re-initialised from its backbone card exactly as `cmrp fit` did
    (same seed, same tokenizer corpus) — or the card's pretrained weights when it names some.
    Anything else: another run's output dir."""
    if spec == "base":
        import numpy as np

        card, _ = resolve_recipe_parts(cfg)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        adapter = BACKBONES.get(card.adapter, where="backbone card `adapter`").build(
            card, corpus=character_corpus(character))
        adapter.max_text_tokens = cfg.data.max_text_tokens
        adapter.model.eval()
        return adapter, f"base ({card.get('name') or cfg.backbone}, {'pretrained' if card.get('weights') else 'init'})"
    ckpt = find_checkpoint(Path(spec))
    return load_checkpoint(ckpt, cfg), str(ckpt.parent)


# -- inputs ----------------------------------------------------------------------------------------------
def turn_items(character: Character, max_items: int) -> tuple[list[TurnItem], list[TurnItem]]:
    """Held-out character turns: (text-only turns, turns with an image), each capped at `max_items`."""
    data = character.test
    images = {**character.train.images, **data.images}
    text_items: list[TurnItem] = []
    mm_items: list[TurnItem] = []
    for scene in data.scenes:
        history: list[Segment] = [Segment("text", "system", system_prompt(character))]
        lines: list[str] = []
        last_user_image: ImageRef | None = None
        for index, turn in enumerate(scene.turns):
            if turn.role == "character":
                shown = images.get(turn.image_id) if turn.image_id else None
                item = TurnItem(list(history), turn.text, "\n".join(lines[-6:]), last_user_image, shown,
                                turn.generation_instruction)
                target = mm_items if (shown is not None or last_user_image is not None) else text_items
                if len(target) < max_items and index >= scene.context_turns:  # context turns are no items
                    target.append(item)
                history.append(Segment("text", "character", turn.text))
                lines.append(f"{character.name}: {turn.text}")
                last_user_image = None
            else:
                user_image = images.get(turn.image_id) if turn.image_id else None
                if user_image is not None:
                    history.append(Segment("image", "user", image=user_image.path))
                    lines.append(f"User: [shares an image{': ' + user_image.caption if user_image.caption else ''}]")
                history.append(Segment("text", "user", turn.text))
                lines.append(f"User: {turn.text}")
                last_user_image = user_image
        if len(text_items) >= max_items and len(mm_items) >= max_items:
            break
    return text_items, mm_items


def _image_spec(opts: EvalOptions) -> SamplerSpec:
    """ODE sampling with `opts.steps` steps and `opts.sampling`'s guidance and timestep shift."""
    return SamplerSpec.from_settings(opts.sampling, steps=opts.steps, where="evaluation sampling settings")


def _generate(adapter: Backbone, contexts: list[Example], opts: EvalOptions) -> list[str]:
    out: list[str] = []
    for start in range(0, len(contexts), opts.batch_size):
        out += adapter.generate_text(contexts[start:start + opts.batch_size], max_new_tokens=opts.max_new_tokens)
    return out


def _sample(adapter: Backbone, contexts: list[Example], n: int, opts: EvalOptions) -> torch.Tensor:
    chunks = []
    spec = _image_spec(opts)
    per_call = max(1, opts.batch_size // max(1, n))
    for start in range(0, len(contexts), per_call):
        rollout = adapter.sample_images(contexts[start:start + per_call], spec, n=n, seed=opts.seed + start)
        chunks.append(rollout.images.float().cpu().clamp(0, 1))
    return torch.cat(chunks) if chunks else torch.zeros(0, 3, 1, 1)


def _think_sample(adapter: Backbone, contexts: list[Example], opts: EvalOptions) -> tuple[list[str], torch.Tensor]:
    """Think mode: per context the character's thinking, then one image with it in the same context."""
    thinker = require(adapter, SupportsThink, feature="decoding: think")
    thoughts: list[str] = []
    chunks = []
    spec = _image_spec(opts)
    for start in range(0, len(contexts), opts.batch_size):
        texts, rollout = thinker.think_and_sample(contexts[start:start + opts.batch_size], spec, n=1,
                                                  seed=opts.seed + start, max_think_tokens=opts.max_new_tokens,
                                                  text_seed=opts.seed + start)
        thoughts += texts
        chunks.append(rollout.images.float().cpu().clamp(0, 1))
    return thoughts, (torch.cat(chunks) if chunks else torch.zeros(0, 3, 1, 1))


def _side(images: torch.Tensor) -> tuple[int, int]:
    """(height, width) of a batch of images [N, 3, H, W]."""
    return int(images.shape[-2]), int(images.shape[-1])


def _per_item_cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1).tolist()


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


# -- tasks -----------------------------------------------------------------------------------------------
def _text_roleplay(adapter: Backbone, character, items: list[TurnItem], opts, result: ModelEval) -> None:
    replies = _generate(adapter, [Example("chat", it.context) for it in items], opts)
    result.replies["text_roleplay"] = replies
    stats = M.persona_stats(replies, character, [it.reference for it in items]) if items else {}
    result.numbers["text_roleplay"] = {"items": len(items), **stats}


def _multimodal_roleplay(adapter: Backbone, character, items: list[TurnItem], feats: FeatureSet, refs: torch.Tensor,
                         opts, result: ModelEval) -> None:
    replies = _generate(adapter, [Example("chat", it.context) for it in items], opts)
    result.replies["multimodal_roleplay"] = replies
    numbers: dict[str, Any] = {"items": len(items)}
    if items:
        numbers.update(M.persona_stats(replies, character, [it.reference for it in items]))
    cosines: list[float] = []
    show = [(i, it) for i, it in enumerate(items) if it.shown_image is not None]
    if show:
        # as in chat: the image sees the generated reply (chain, think) or only the query (joint); nothing
        # else of the reference turn (its generation instruction) is an input any decoding has at inference
        reply_segment = [Segment("text", "character", replies[i]) for i, _ in show]
        contexts = [Example("t2i", [*it.context, *(reply_segment[k:k + 1] if opts.image_sees_reply else [])])
                    for k, (_, it) in enumerate(show)]
        if opts.think:
            result.replies["multimodal_thinking"], drawn = _think_sample(adapter, contexts, opts)
        else:
            drawn = _sample(adapter, contexts, 1, opts)
        result.shown_images = list(drawn)
        texts = [replies[i] for i, _ in show]
        reply_cos = _per_item_cosine(feats.clip.encode_image(drawn), feats.clip.encode_text(texts))
        cosines += reply_cos
        targets = load_images([it.shown_image for _, it in show if it.shown_image is not None], _side(drawn))
        numbers["clip_t_reply_drawn"] = _mean(reply_cos)
        numbers["clip_i_target"] = _mean(_per_item_cosine(feats.clip.encode_image(drawn),
                                                          feats.clip.encode_image(targets)))
        numbers["dino_references"] = M.dino_similarity(feats.dino, drawn, refs) if refs.shape[0] else NAN
        numbers["show_turns"] = len(show)
        numbers.update(image_oracle_numbers(  # sandbox characters: the attribute probe reads the drawn images
            character, drawn, [prompt_attributes(it.instruction or "", it.shown_image) for _, it in show]))
        numbers.update(reply_agreement(character, drawn, texts))  # does the image show what the reply says?
    seen = [(i, it) for i, it in enumerate(items) if it.user_image is not None]
    if seen:
        size = _side(refs) if refs.shape[0] else (64, 64)
        shared = load_images([it.user_image for _, it in seen if it.user_image is not None], size)
        seen_cos = _per_item_cosine(feats.clip.encode_image(shared),
                                    feats.clip.encode_text([replies[i] for i, _ in seen]))
        cosines += seen_cos
        numbers["clip_t_reply_user_image"] = _mean(seen_cos)
        numbers["user_image_turns"] = len(seen)
    numbers["cross_modal_clip_t"] = _mean(cosines)
    result.numbers["multimodal_roleplay"] = numbers


def t2i_prompts(character: Character, cfg: Any, max_items: int):
    """Held-out image prompts, each prompt text once (several dialogue turns may show the same image)."""
    seen: set[str] = set()
    prompts = []
    for p in image_prompts(character, split="test", decoding=cfg.decoding):
        if p.prompt not in seen:
            seen.add(p.prompt)
            prompts.append(p)
    return prompts[:max_items]


def _t2i(adapter: Backbone, character, prompts, feats: FeatureSet, refs: torch.Tensor, opts, result: ModelEval) -> None:
    numbers: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": opts.samples}
    if not prompts:
        result.numbers["t2i"] = numbers
        return
    n = opts.samples
    all_images = {**character.train.images, **character.test.images}
    images = _sample(adapter, [p.context for p in prompts], n, opts)
    result.t2i_images = [images[i * n:(i + 1) * n] for i in range(len(prompts))]
    group_ids = torch.arange(len(prompts)).repeat_interleave(n)
    texts = [p.prompt for p in prompts for _ in range(n)]
    emb = feats.clip.encode_image(images)
    numbers["clip_t"] = M.clip_t(feats.clip, images, texts)
    numbers["clip_i_references"] = M.clip_i(feats.clip, images, refs)
    numbers["dino_references"] = M.dino_similarity(feats.dino, images, refs)
    numbers["dino_max_reference"] = M.max_reference_similarity(feats.dino, images, refs)
    numbers["diversity"] = M.within_prompt_diversity(feats.distance, images, group_ids)
    result.samples["t2i"] = _per_image(emb, feats.clip.encode_text(texts), feats, images, refs)
    numbers.update(image_oracle_numbers(  # sandbox characters: the attribute probe reads the samples
        character, images, [prompt_attributes(p.prompt, all_images.get(p.image_id)) for p in prompts for _ in range(n)]))
    with_target = [(i, all_images[p.image_id]) for i, p in enumerate(prompts) if p.image_id in all_images]
    if with_target:
        targets = load_images([ref for _, ref in with_target], _side(images))
        t_emb, t_dino = feats.clip.encode_image(targets), feats.dino(targets)
        dino_all = feats.dino(images)
        clip_target, dino_target = [], []
        for k, (i, _) in enumerate(with_target):
            clip_target.append(M.mean_cosine(emb[i * n:(i + 1) * n], t_emb[k:k + 1]))
            dino_target.append(M.mean_cosine(dino_all[i * n:(i + 1) * n], t_dino[k:k + 1]))
        numbers["clip_i_target"] = _mean(clip_target)
        numbers["dino_target"] = _mean(dino_target)
        numbers["prompts_with_target"] = len(with_target)
    if feats.inception is not None:  # FID/KID of the samples vs the character's real images (references, targets)
        real = torch.cat([refs, targets]) if with_target else refs
        numbers.update(M.fid_kid(feats.inception, real, images))
    result.numbers["t2i"] = numbers


def _per_image(emb: torch.Tensor, text_emb: torch.Tensor, feats: FeatureSet, images: torch.Tensor,
               refs: torch.Tensor) -> dict[str, list[float]]:
    """Each image's value of the T2I similarity numbers (their means are the numbers), for the report's
    confidence intervals."""
    out = {"clip_t": _per_item_cosine(emb, text_emb)}
    if refs.shape[0]:
        clip_refs = cosine_matrix(emb, feats.clip.encode_image(refs))
        dino_refs = cosine_matrix(feats.dino(images), feats.dino(refs))
        out.update({"clip_i_references": clip_refs.mean(1).tolist(), "dino_references": dino_refs.mean(1).tolist(),
                    "dino_max_reference": dino_refs.max(1).values.tolist()})
    return out


def _mcq(adapter: Backbone, character, opts, result: ModelEval) -> None:
    for task, items in (("knowledge_qa", knowledge_mcq_items(character, "test", opts.max_items)),
                        ("vqa", vqa_mcq_items(character, "test", opts.max_items))):
        by_gen, parse_rate = M.mcq_accuracy_by_generation(adapter, items, task, batch_size=opts.batch_size)
        result.numbers[task] = {
            "items": len(items),
            "mcq_acc_likelihood": M.mcq_accuracy_by_likelihood(adapter, items, task),
            "mcq_acc_generated": by_gen,
            "answer_parse_rate": parse_rate,
        }


def _judge(adapter: Backbone, character, text_items: list[TurnItem], mm_items: list[TurnItem], judge: Any, opts,
           result: ModelEval) -> None:
    profile = character.profile.text
    base = {"name": character.name, "profile": profile}
    questions = character.test.judge_questions
    numbers: dict[str, Any] = {}
    answers: dict[str, list[tuple[str, str]]] = {}
    for kind in ("memorization", "personality"):
        qs = list(questions.get(kind, []))[:opts.max_items]
        system = Segment("text", "system", system_prompt(character))
        replies = _generate(adapter, [Example("chat", [system, Segment("text", "user", q)]) for q in qs], opts)
        answers[kind] = list(zip(qs, replies, strict=True))
        result.replies[f"judge_{kind}"] = replies
    requests: list[JudgeRequest] = []
    slots: list[tuple[str, int]] = []
    for kind in ("memorization", "personality"):
        for k, (q, reply) in enumerate(answers[kind]):
            requests.append(JudgeRequest(kind, {**base, "question": q, "response": reply}))
            slots.append((kind, k))
    spread = answers["personality"] or answers["memorization"]
    if len(spread) >= 2:
        listing = "\n".join(f"{k + 1}. Q: {q}\n   A: {a}" for k, (q, a) in enumerate(spread))
        requests.append(JudgeRequest("diversity", {**base, "responses": listing}))
        slots.append(("diversity", 0))
    turns = (text_items + mm_items)[:opts.max_items]
    replies = result.replies.get("text_roleplay", []) + result.replies.get("multimodal_roleplay", [])
    for k, it in enumerate(turns):
        image = it.user_image or it.shown_image
        fields = {**base, "image": (image.caption or image.id) if image else "none", "context": it.history_text,
                  "response": replies[k] if k < len(replies) else "", "reference": it.reference}
        requests.append(JudgeRequest("mmrole_pairwise", fields, kind="pairs"))
        slots.append(("mmrole", k))
    results = judge.score_many(requests)
    scores: dict[str, list[float | None]] = {"memorization": [], "personality": [], "diversity": []}
    pairs = []
    for (kind, _), res in zip(slots, results, strict=True):
        if kind == "mmrole":
            pairs.append(res.value)
        else:
            scores[kind].append(res.value)
    for kind, values in scores.items():
        got = [v for v in values if v is not None]
        numbers[kind] = sum(got) / len(got) if got else None
        numbers[f"{kind}_missing"] = len(values) - len(got)
    ratios = ratio_scores(pairs, MMROLE_METRICS)
    numbers.update({f"mmrole_{k}": v for k, v in ratios.items()})
    numbers["mmrole_items"] = len(pairs)
    numbers["mmrole_missing"] = sum(p is None for p in pairs)
    result.numbers["judge"] = numbers


def evaluate_model(adapter: Backbone, character: Character, cfg: Any, feats: FeatureSet, opts: EvalOptions,
                   judge: Any = None, label: str = "eval") -> ModelEval:
    """Every task for one model; the same inputs and seeds for the model and its baseline. Images are
    sampled as the recipe says: its decoding (think mode) and its `grpo:` guidance and timestep shift."""
    import dataclasses

    strategy = get_strategy(cfg.decoding)
    opts = dataclasses.replace(opts, think=opts.think or strategy.think, image_sees_reply=strategy.image_sees_reply,
                               sampling={**recipe_sampling_settings(cfg.grpo), **opts.sampling})
    if opts.think:  # before anything runs: one clear error for a backbone without think decoding
        require(adapter, SupportsThink, feature=f"decoding: {cfg.decoding}")
    result = ModelEval()
    adapter.model.eval()
    text_items, mm_items = turn_items(character, opts.max_items)
    prompts = t2i_prompts(character, cfg, opts.max_items)
    size = (adapter.image_size, adapter.image_size)
    refs = load_images(character.reference_images[:opts.max_references], size)
    steps = [
        ("text_roleplay", lambda: _text_roleplay(adapter, character, text_items, opts, result)),
        ("multimodal_roleplay", lambda: _multimodal_roleplay(adapter, character, mm_items, feats, refs, opts,
                                                             result)),
        ("t2i", lambda: _t2i(adapter, character, prompts, feats, refs, opts, result)),
        ("mcq", lambda: _mcq(adapter, character, opts, result)),
    ]
    if judge is not None:
        steps.append(("judge", lambda: _judge(adapter, character, text_items, mm_items, judge, opts, result)))

    with torch.no_grad(), Progress(len(steps), label, unit="task") as progress:
        for name, step in steps:
            t = time.perf_counter()
            step()
            result.timings[f"{name}_s"] = time.perf_counter() - t
            progress.update(1, done=name)
    return result


def reference_numbers(character: Character, cfg: Any, feats: FeatureSet, opts: EvalOptions,
                      size: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """The same statistics on the reference data itself (the held-out replies and target images): what a
    model that reproduced the data exactly would score, to read the other columns against."""
    text_items, mm_items = turn_items(character, opts.max_items)
    out: dict[str, dict[str, Any]] = {}
    if text_items:
        out["text_roleplay"] = M.persona_stats([it.reference for it in text_items], character)
    if mm_items:
        out["multimodal_roleplay"] = M.persona_stats([it.reference for it in mm_items], character)
    prompts = t2i_prompts(character, cfg, opts.max_items)
    images = {**character.train.images, **character.test.images}
    with_target = [p for p in prompts if p.image_id in images]
    refs = load_images(character.reference_images[:opts.max_references], size)
    if with_target:
        targets = load_images([images[p.image_id] for p in with_target], size)
        out["t2i"] = {
            "clip_t": M.clip_t(feats.clip, targets, [p.prompt for p in with_target]),
            "clip_i_references": M.clip_i(feats.clip, targets, refs),
            "dino_references": M.dino_similarity(feats.dino, targets, refs),
            **image_oracle_numbers(character, targets, [prompt_attributes(p.prompt, images[p.image_id])
                                                        for p in with_target]),
        }
    return out
