"""`clip_similarity`: does the image show what the prompt says (and look like the character)?"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from cmrp.errors import ConfigError, WeightsError
from cmrp.registry import REWARDS
from cmrp.rewards._ops import (
    IdentityCache,
    check_images,
    cosine_matrix,
    fit_square,
    module_device,
    named_feature_model,
    normalise,
    reason,
)
from cmrp.rewards.base import RewardContext, RewardOutput

__all__ = ["ClipSimilarity", "OpenClipEncoder", "load_open_clip"]

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


class OpenClipEncoder:
    """Wraps an open_clip model as `encode_image(Tensor[B,3,H,W] in [0,1])` / `encode_text(list[str])`.

    Preprocessing follows the model's own config (resolution, resize mode, mean/std) but works on
    tensors, so generated images never round-trip through PIL.
    """

    def __init__(self, model: Any, tokenizer: Any, preprocess_cfg: dict[str, Any]):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = preprocess_cfg.get("size", 224)
        self.size = int(size[0] if isinstance(size, list | tuple) else size)
        self.mean = tuple(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.interpolation = interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")

    @property
    def device(self) -> torch.device:
        return module_device(self.model) or torch.device("cpu")

    def to(self, device: torch.device | str) -> OpenClipEncoder:
        self.model.to(device)
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = fit_square(images.to(self.device).float(), self.size, self.resize_mode, self.interpolation)
        return self.model.encode_image(normalise(pixels, self.mean, self.std)).float()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES)


def load_open_clip(model: str, pretrained: str, cache_dir: str | None = None) -> OpenClipEncoder:
    """Load an open_clip model by name with a pretrained tag (e.g. `openai`) or a local weights file.

    Raises WeightsError naming the model and how to provide its weights when they cannot be loaded
    (offline machine, missing file, open_clip not installed).
    """
    how = (
        f"Provide them by setting the clip_similarity kwarg `pretrained:` to a local weights file "
        f"(e.g. open_clip_pytorch_model.bin for {model}), or by downloading the tag once on a machine with "
        f"network into open_clip's cache (`cache_dir:` kwarg, default the Hugging Face hub cache under "
        f"$HF_HOME, ~/.cache/huggingface), or pass an `encoder=` object to the term."
    )
    try:
        import open_clip
    except ImportError as err:
        raise WeightsError(
            f"clip_similarity cannot load CLIP model {model!r} (pretrained {pretrained!r}): the open_clip "
            f"package is not installed ({err}). Install it with `pip install open_clip_torch`, or pass an "
            f"`encoder=` object with encode_image/encode_text to the term."
        ) from None
    if model not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"clip_similarity: unknown open_clip model {model!r}.{hint}")
    if _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"clip_similarity: CLIP weights file for model {model!r} not found at {str(path)!r}. {how}"
            )
        pretrained = str(path)
    elif pretrained not in open_clip.list_pretrained_tags_by_model(model):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ConfigError(
            f"clip_similarity: open_clip has no pretrained tag {pretrained!r} for model {model!r} "
            f"(known tags: {tags}); or give a local weights file path."
        )
    try:
        net, _, _ = open_clip.create_model_and_transforms(model, pretrained=pretrained, cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as err:  # download/load failures come as many exception types
        raise WeightsError(
            f"clip_similarity could not load CLIP weights for model {model!r} (pretrained {pretrained!r}): "
            f"{reason(err)}. {how}"
        ) from None
    cfg = open_clip.get_model_preprocess_cfg(net)
    return OpenClipEncoder(net, tokenizer, cfg)


@REWARDS.register("clip_similarity")
class ClipSimilarity:
    """CLIP image-text cosine, optionally mixed with image-image cosine to the character's references.

    `cos = (1 - reference_weight) * cos(image, prompt) + reference_weight * mean_r cos(image, ref_r)`
    (the text-only cosine when the context has no reference images), `score = scale * cos + offset`.
    Defaults: `scale=1`, `offset=0`, `reference_weight=0` (raw CLIP cosine, about 0.2-0.35 for a match).

    `encoder`: any object with `encode_image(Tensor[B,3,H,W] in [0,1]) -> [B,D]` and
    `encode_text(list[str]) -> [B,D]`, or the name of one registered in `cmrp.registry.FEATURE_MODELS`
    (`sandbox-clip`: the sandbox's trained dual encoder; usable from a preset YAML); by default open_clip's
    `model` with `pretrained` (a tag such as `openai`, or a local weights file), loaded on the first call.
    """

    def __init__(
        self,
        *,
        model: str = "ViT-B-32",
        pretrained: str = "openai",
        cache_dir: str | None = None,
        scale: float = 1.0,
        offset: float = 0.0,
        reference_weight: float = 0.0,
        device: str | None = None,
        encoder: Any = None,
    ):
        if not 0.0 <= reference_weight <= 1.0:
            raise ConfigError(
                f"clip_similarity: reference_weight must be in [0, 1], got {reference_weight!r}"
            )
        self.model, self.pretrained, self.cache_dir = model, pretrained, cache_dir
        self.scale, self.offset, self.reference_weight = float(scale), float(offset), float(reference_weight)
        self.device = device
        self.encoder = encoder
        self._named = named_feature_model(encoder, "clip_similarity", "encoder") if isinstance(encoder, str) else None
        if self._named is not None:
            self.encoder = None
        self._lock = threading.Lock()
        self._ref_cache = IdentityCache()

    def _encoder(self, device: torch.device) -> Any:
        with self._lock:
            if self.encoder is None and self._named is not None:
                self.encoder = self._named()
            if self.encoder is None:
                self.encoder = load_open_clip(self.model, self.pretrained, self.cache_dir).to(
                    self.device or device
                )
            return self.encoder

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput:
        images = check_images(images, "clip_similarity")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"clip_similarity: {len(prompts)} prompts for {images.shape[0]} images")
        encoder = self._encoder(images.device)
        image_emb = encoder.encode_image(images)
        text_emb = encoder.encode_text(list(prompts))
        cos_text = torch.nn.functional.cosine_similarity(
            image_emb.float(), text_emb.float().to(image_emb), dim=-1
        )
        cos = cos_text
        info: dict[str, Any] = {"cos_text": cos_text.mean().item()}
        refs = context.reference_images if context is not None else None
        if self.reference_weight > 0 and refs is not None and refs.shape[0] > 0:
            ref_emb = self._ref_cache.get(refs, lambda r: encoder.encode_image(check_images(r, "reference")))
            cos_ref = cosine_matrix(image_emb, ref_emb).mean(dim=1)
            cos = (1 - self.reference_weight) * cos_text + self.reference_weight * cos_ref
            info["cos_reference"] = cos_ref.mean().item()
        scores = (self.scale * cos + self.offset).float().to(images.device)
        return RewardOutput(scores=scores, info=info)
