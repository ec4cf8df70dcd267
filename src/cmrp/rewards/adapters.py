"""Adapters to other trainers' reward conventions: TRL's `reward_funcs` and Flow-GRPO's reward fn.

Both wrap any cmrp reward (a term or a `Composite`) without copying it, convert the images they are given
to the reward contract (float `[B,3,H,W]` in [0,1]) and build the `RewardContext` from what those
trainers pass along (dataset columns, per-prompt metadata in UniCharacter's format).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmrp.rewards.base import Reward, RewardContext, RewardOutput, VQAQuestion
from cmrp.rewards.inputs import RewardInputError

__all__ = ["as_flow_grpo", "as_trl", "context_from_metadata", "group_ids_from", "to_image_tensor"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _channels_last(shape: Sequence[int]) -> bool:
    """Whether `[..., a, b, c]` is HWC rather than CHW (3 channels decide first, then grey/RGBA)."""
    if shape[-3] == 3:
        return False
    if shape[-1] == 3:
        return True
    return shape[-3] not in (1, 4) and shape[-1] in (1, 4)


def _as_tensor(data: Any) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data))


def _one_to_chw(image: Any) -> torch.Tensor:
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, without importing PIL
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    tensor = _as_tensor(image)
    if tensor.dim() != 3:
        raise RewardInputError(f"expected an image with 3 dimensions (HWC or CHW), got shape {tuple(tensor.shape)}")
    return tensor.permute(2, 0, 1) if _channels_last(tensor.shape) else tensor


def to_image_tensor(images: Any) -> torch.Tensor:
    """Float `[B,3,H,W]` in [0,1] from a float tensor in [0,1], a uint8 tensor/array (NHWC or NCHW), a
    float array, or a list of PIL images / per-image arrays. Grey images are repeated to 3 channels,
    alpha is dropped."""
    if isinstance(images, list | tuple):
        images = torch.stack([_one_to_chw(image) for image in images])
    elif isinstance(images, np.ndarray):
        images = _as_tensor(images)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise RewardInputError(f"expected a batch of images [B,3,H,W] or [B,H,W,3], got {got}")
    if _channels_last(images.shape):
        images = images.permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    else:
        images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 4:
        images = images[:, :3]
    return images.contiguous()


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def group_ids_from(
    prompts: Sequence[str], metadata: Sequence[Any] | None, key: str = "group_id"
) -> torch.Tensor:
    """Group ids `[B]` from `metadata[i][key]` when every item has it, else by identical prompt."""
    if metadata and len(metadata) == len(prompts) and all(isinstance(m, dict) and key in m for m in metadata):
        labels = [_hashable(m[key]) for m in metadata]
    else:
        labels = list(prompts)
    seen: dict[Any, int] = {}
    return torch.tensor([seen.setdefault(label, len(seen)) for label in labels], dtype=torch.long)


def _questions(items: Any) -> list[VQAQuestion]:
    """UniCharacter's per-prompt `vqa_questions` (`question`, `answer`, optional `choices`, `weight`) as
    VQAQuestion; items without a question or an answer are skipped, as its scorer does."""
    out = []
    for item in items or []:
        if not isinstance(item, Mapping) or not item.get("question") or item.get("answer") in (None, ""):
            continue
        options = item.get("choices") or item.get("options")
        out.append(VQAQuestion(str(item["question"]), str(item["answer"]), list(map(str, options)) if options else None,
                               weight=float(item.get("weight", 1.0))))
    return out


_FOLDERS_KEPT = 4  # characters' reference sets kept loaded (one tensor each, so the terms' feature caches hit)
_folder_cache: OrderedDict[tuple[str, tuple[int, int]], torch.Tensor] = OrderedDict()
_folder_lock = threading.Lock()


def _folder_images(folder: str | Path, size: tuple[int, int], root: str | Path | None) -> torch.Tensor:
    """Every image file in `folder` (sorted by name) as `[R,3,H,W]` in [0,1] at `size`, cached per folder."""
    path = Path(folder).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root).expanduser() / path
    key = (str(path.resolve()), size)
    with _folder_lock:
        if key in _folder_cache:
            _folder_cache.move_to_end(key)
            return _folder_cache[key]
    if not path.is_dir():
        raise RewardInputError(f"reference_images_path {str(folder)!r}: no such folder (looked at {path}); "
                               "give an absolute path or the adapter's `root=`")
    from cmrp.data.character import ImageRef
    from cmrp.data.images import load_images

    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise RewardInputError(f"reference_images_path {str(folder)!r}: no image files in {path}")
    images = load_images([ImageRef(f.stem, f) for f in files], size)
    with _folder_lock:
        _folder_cache[key] = images
        while len(_folder_cache) > _FOLDERS_KEPT:
            _folder_cache.popitem(last=False)
    return images


def context_from_metadata(metadata: Sequence[Any] | None, base: RewardContext | None = None, *,
                          reference_images: Any = None, size: tuple[int, int] = (224, 224),
                          root: str | Path | None = None) -> RewardContext:
    """A `RewardContext` from per-sample metadata (Flow-GRPO's `metadata`, TRL's dataset columns), filling
    only what `base` leaves empty: `questions` from each item's `vqa_questions`; `reference_images` from
    `reference_images` (images in any form `to_image_tensor` takes) or else the first item's
    `reference_images_path` folder (relative to `root`), loaded at `size`; `metadata` itself. This is
    UniCharacter's prompt format (flow_grpo/dataset/personalized_t2i/*/…_with_vqa.jsonl)."""
    ctx = base or RewardContext()
    items = [m if isinstance(m, Mapping) else {} for m in (metadata or [])]
    changes: dict[str, Any] = {}
    if ctx.metadata is None and metadata is not None:
        changes["metadata"] = list(metadata)
    if ctx.questions is None and any("vqa_questions" in m for m in items):
        changes["questions"] = [_questions(m.get("vqa_questions")) for m in items]
    if ctx.reference_images is None:
        if reference_images is not None:
            changes["reference_images"] = to_image_tensor(reference_images)
        else:
            folder = next((m["reference_images_path"] for m in items if m.get("reference_images_path")), None)
            if folder is not None:
                changes["reference_images"] = _folder_images(folder, size, root)
    return dataclasses.replace(ctx, **changes) if changes else ctx


def _nan_to(values: torch.Tensor, fill: float) -> list[float]:
    return [fill if math.isnan(v) else float(v) for v in values.detach().float().cpu().tolist()]


def _multi_scores(out: RewardOutput, abstain_value: float) -> dict[str, list[float]]:
    """Flow-GRPO's multi-score dict: `avg` (what its loop turns into advantages) and one entry per term."""
    total = out.scores.detach().float().cpu()
    if torch.isnan(total).any():
        bad = torch.isnan(total).nonzero(as_tuple=True)[0].tolist()
        reasons = {name: entry["info"].get("abstained") for name, entry in out.info.items()
                   if isinstance(entry, Mapping) and isinstance(entry.get("info"), Mapping)}
        why = "; ".join(f"{name}: {text}" for name, text in reasons.items() if text) or out.info.get("abstained")
        raise RewardInputError(f"every reward term abstained for samples {bad[:8]}, so `avg` has no value there and "
                               f"Flow-GRPO's advantages would be NaN ({why or 'no reason given'}); give the terms "
                               "what they need")
    details = {"avg": total.tolist()}
    for name, entry in out.info.items():
        if isinstance(entry, Mapping) and isinstance(entry.get("scores"), torch.Tensor):
            details[name] = _nan_to(entry["scores"], abstain_value)
    return details


def as_flow_grpo(
    reward: Reward, *, context: RewardContext | None = None, group_key: str = "group_id", multi: bool = False,
    abstain_value: float = -10.0, root: str | Path | None = None,
) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """Wrap a cmrp reward as a Flow-GRPO reward fn, called as its training loops do:
    `fn(images, prompts, metadata, only_strict=True)` (yifan123/flow_grpo scripts/train_sd3.py:663) or
    UniCharacter's `fn(images, prompts, metadata, ref_images=None, only_strict=True)`
    (flow_grpo/flow_grpo/rewards.py:215). Images: float NCHW in [0,1], uint8 NCHW/NHWC, arrays or PIL.

    `multi=False`: returns `(scores, info)` — a float32 numpy array `[B]` (NaN where every term abstained)
    and the reward's info, the shape of one scorer inside Flow-GRPO's `multi_score`. `multi=True`: returns
    `(details, {})` with `details["avg"]` the total and one list per term of a `Composite`, the shape of
    `multi_score` itself (flow_grpo/rewards.py:377-401), whose loop reads `avg` for the advantages and logs
    every key. A term's abstaining samples read `abstain_value` there (-10: the value Flow-GRPO's eval
    logging leaves out, train_sd3.py:311); a sample on which every term abstains is an error, as `avg`
    would be NaN.

    The context: `context` (or a `context=` keyword per call), completed from the call's metadata by
    `context_from_metadata` (questions from `vqa_questions`, references from `ref_images` or
    `reference_images_path` under `root`). Groups: `metadata[i][group_key]` when every item has it, else
    identical prompts. Other keyword arguments (`only_strict`) are accepted and ignored.
    """

    def fn(images: Any, prompts: Sequence[str], metadata: Sequence[Any] | None = None, ref_images: Any = None,
           **kwargs: Any):
        batch = to_image_tensor(images)
        prompts = list(prompts)
        if len(prompts) != batch.shape[0]:
            raise RewardInputError(f"{len(prompts)} prompts for {batch.shape[0]} images; give one prompt per image")
        ctx = context_from_metadata(metadata, kwargs.get("context") or context, reference_images=ref_images,
                                    size=(int(batch.shape[-2]), int(batch.shape[-1])), root=root)
        out = reward(batch, prompts, group_ids=group_ids_from(prompts, metadata, group_key), context=ctx)
        if multi:
            return _multi_scores(out, abstain_value), {}
        return out.scores.detach().float().cpu().numpy(), out.info

    return fn


# -- TRL ------------------------------------------------------------------------------------------
_TRL_EXTRA = ("trainer_state", "log_extra", "log_metric", "environments", "completion_ids")


def _text(value: Any) -> str:
    """The text of a TRL prompt/completion: a string, or a conversation (the last message's text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[-1], Mapping):
        content = value[-1].get("content", "")
        if isinstance(content, str):
            return content
        return " ".join(str(block.get("text", "")) for block in content if isinstance(block, Mapping)
                        and block.get("type") == "text")
    raise RewardInputError(f"cannot read text from a {type(value).__name__}: expected a string or a list of "
                           "chat messages")


def _row_image(value: Any, key: str) -> Any:
    if isinstance(value, list | tuple) and value and not isinstance(value[0], int | float):  # TRL's `images` lists
        if len(value) != 1:
            raise RewardInputError(f"TRL column {key!r} holds {len(value)} images for one row; a reward scores one "
                                   "image per completion")
        return value[0]
    return value


def as_trl(reward: Reward, *, image_key: str = "image", text: str = "completions",
           context: RewardContext | None = None, name: str | None = None, root: str | Path | None = None,
           log_metrics: bool = True) -> Callable[..., list[float | None]]:
    """Wrap a cmrp reward as a TRL `GRPOTrainer` reward function.

    TRL calls `reward_func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)`, where
    `reward_kwargs` holds every other dataset column (one value per completion) plus `trainer_state`,
    `log_extra` and `log_metric`, and expects one float per completion, None where the function does not
    apply (trl/trainer/grpo_trainer.py `_calculate_rewards`, TRL 1.16). Here: the images are the dataset
    column `image_key` (one PIL image / array / tensor per row); the text scored with them is what the
    model wrote (`text="completions"`, the last message of a conversational completion) or the
    `"prompts"`; the group of a completion is its prompt (TRL samples `num_generations` per prompt); the
    other columns complete `context` as Flow-GRPO metadata does (`vqa_questions`,
    `reference_images_path` under `root`). NaN scores (the reward abstains) come back as None. With
    `log_metrics`, each term's batch mean goes to TRL's `log_metric` as `cmrp/<term>/mean`. The function's
    `__name__` (TRL's column name for it) is `name`, else the reward's preset name, else `cmrp_reward`.
    """
    if text not in ("completions", "prompts"):
        raise RewardInputError(f"as_trl: text must be 'completions' or 'prompts', got {text!r}")

    def reward_func(*, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        if image_key not in kwargs:
            names = sorted(k for k in kwargs if k not in _TRL_EXTRA)
            raise RewardInputError(f"as_trl: the dataset has no {image_key!r} column to take images from (columns: "
                                   f"{', '.join(names) or 'none besides prompt'}); set image_key=")
        rows = kwargs[image_key]
        if len(rows) != len(completions) or len(prompts) != len(completions):
            raise RewardInputError(f"as_trl: {len(prompts)} prompts, {len(completions)} completions and "
                                   f"{len(rows)} {image_key!r} values; TRL passes one of each per completion")
        images = to_image_tensor([_row_image(value, image_key) for value in rows])
        texts = [_text(c) for c in (completions if text == "completions" else prompts)]
        groups = group_ids_from([repr(p) for p in prompts], None)
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_EXTRA and k != image_key}
        metadata = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        ctx = context_from_metadata(metadata, context, size=(int(images.shape[-2]), int(images.shape[-1])), root=root)
        out = reward(images, texts, group_ids=groups, context=ctx)
        log_metric = kwargs.get("log_metric")
        if log_metrics and callable(log_metric):
            for term, entry in out.info.items():
                if isinstance(entry, Mapping) and isinstance(entry.get("mean"), float) and math.isfinite(entry["mean"]):
                    log_metric(f"cmrp/{term}/mean", entry["mean"])
        return [None if math.isnan(v) else float(v) for v in out.scores.detach().float().cpu().tolist()]

    reward_func.__name__ = name or getattr(reward, "name", None) or "cmrp_reward"
    return reward_func
