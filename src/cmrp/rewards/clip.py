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
    cosine_matrix,
    fit_square,
    module_device,
    named_feature_model,
    normalise,
    reason,
)
from cmrp.rewards.base import RewardContext, RewardOutput
from cmrp.rewards.inputs import check_images, check_inputs
from cmrp.rewards.pretrained import (
    MissingModel,
    hf_fetch_hint,
    hf_hub_cache,
    load_transformers,
    missing_hf_model,
)

__all__ = ["ClipSimilarity", "HfClipEncoder", "OpenClipEncoder", "load_hf_clip", "load_open_clip"]

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")
LIBRARIES = ("open_clip", "transformers")


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


def _tensor(out: Any) -> torch.Tensor:
    """transformers >= 5 returns a ModelOutput from get_*_features; the projected embedding is its pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _size(value: Any, key: str, default: int) -> int:
    got = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return int(got) if got else default


class _TensorFeatures(torch.nn.Module):
    """A transformers CLIPModel whose get_image_features / get_text_features return tensors, as torchmetrics'
    CLIPScore expects (torchmetrics 1.9 breaks on transformers 5's ModelOutput: Lightning-AI/torchmetrics#3407)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


class HfClipEncoder:
    """Wraps a transformers `CLIPModel` and its `CLIPProcessor` as `encode_image` / `encode_text`.

    `interpolation=None` preprocesses images with the processor itself (uint8 in, as torchmetrics'
    CLIPScore does, so both give the same embeddings); `bilinear` / `bicubic` resize tensors directly
    (short side to the processor's size, centre crop, its mean/std), as UniCharacter's CLIP scorer does
    with torchvision transforms (flow_grpo/flow_grpo/clip_scorer.py:23-29, bilinear by default).
    """

    def __init__(self, model: Any, processor: Any, interpolation: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.interpolation = interpolation
        image_processor = getattr(processor, "image_processor", processor)
        self.size = _size(getattr(image_processor, "size", None) or {}, "shortest_edge", 224)
        self.crop = _size(getattr(image_processor, "crop_size", None) or {}, "height", self.size)
        self.mean = tuple(getattr(image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.std = tuple(getattr(image_processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))

    @property
    def device(self) -> torch.device:
        return module_device(self.model) or torch.device("cpu")

    def to(self, device: torch.device | str) -> HfClipEncoder:
        self.model.to(device)
        return self

    def torchmetrics_model(self) -> tuple[Any, Any]:
        """`(model, processor)` for torchmetrics' `CLIPScore(model_name_or_path=lambda: ...)`."""
        return _TensorFeatures(self.model), self.processor

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.interpolation is None:
            uint8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            pixels = self.processor(images=list(uint8), return_tensors="pt")["pixel_values"]
        else:
            pixels = fit_square(images.float(), self.size, "shortest", self.interpolation, crop=self.crop)
            pixels = normalise(pixels, self.mean, self.std)
        return _tensor(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        return _tensor(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))).float()


def load_hf_clip(model: str, *, cache_dir: str | None = None, local_files_only: bool | None = None,
                 interpolation: str | None = None) -> HfClipEncoder:
    """A transformers CLIP (hub id such as `openai/clip-vit-large-patch14`, or a local directory) with its processor;
    from local files first, the hub only when not offline (see `cmrp.rewards.pretrained.load_transformers`)."""
    return load_transformers(
        model, ("CLIPModel", "CLIPProcessor"), lambda net, processor: HfClipEncoder(net, processor, interpolation),
        cache_dir=cache_dir, local_files_only=local_files_only, what=f"clip_similarity: CLIP model {model!r}",
        alternative="or set the clip_similarity kwarg `model:` to a local directory holding a CLIPModel/CLIPProcessor "
                    "`save_pretrained` copy, or pass an `encoder=` object to the term.")


def open_clip_missing(model: str, pretrained: str, cache_dir: str | None = None) -> MissingModel | None:
    """What `load_open_clip(model, pretrained)` would need and cannot find locally (None if all there)."""
    what = f"open_clip {model} `{pretrained}` weights"
    if _looks_like_path(pretrained):
        if Path(pretrained).expanduser().is_file():
            return None
        return MissingModel("clip_similarity", what, f"no file at {pretrained!r}",
                            "set the kwarg `pretrained:` to an existing weights file")
    try:
        import open_clip
    except ImportError:
        return MissingModel("clip_similarity", what, "the open_clip package is not installed: `pip install open_clip_torch`")
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    hub = str(cfg.get("hf_hub") or "")
    if hub:
        repo, _, filename = hub.rpartition("/")  # open_clip's `org/name/[file]` form
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename, filename.replace("pytorch_model.bin", "model.safetensors")]  # its safetensors twin
        from huggingface_hub import try_to_load_from_cache

        cache = str(hf_hub_cache(cache_dir))
        if any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache), str) for name in names):
            return None
        return MissingModel("clip_similarity", what, hf_fetch_hint(repo, cache_dir),
                            "or set the kwarg `pretrained:` to a local weights file")
    url = str(cfg.get("url") or "")
    if url and (Path(cache_dir or "~/.cache/clip").expanduser() / url.rsplit("/", 1)[-1]).is_file():
        return None
    return MissingModel("clip_similarity", what, f"download {url or 'the weights'} once with network",
                        "or set the kwarg `pretrained:` to a local weights file")


@REWARDS.register("clip_similarity")
class ClipSimilarity:
    """CLIP image-text cosine, optionally mixed with image-image cosine to the character's references.

    `cos = (1 - reference_weight) * cos(image, prompt) + reference_weight * mean_r cos(image, ref_r)`
    (the text-only cosine, with `info["missing"]` saying so, when the context has no reference images),
    `score = scale * cos + offset`. Defaults: `scale=1`, `offset=0`, `reference_weight=0` (raw CLIP
    cosine, about 0.2-0.35 for a match). UniCharacter scores `logits_per_image / 30` with OpenAI CLIP,
    whose logit scale is 100: `scale: 3.3333333333333335`.

    `encoder`: any object with `encode_image(Tensor[B,3,H,W] in [0,1]) -> [B,D]` and
    `encode_text(list[str]) -> [B,D]`, or the name of one registered in `cmrp.registry.FEATURE_MODELS`
    (`sandbox-clip`: the sandbox's trained dual encoder; usable from a preset YAML). Otherwise `library`:
    `open_clip` (default) loads open_clip's `model` with `pretrained` (a tag such as `openai`, or a local
    weights file); `transformers` loads a `CLIPModel` + `CLIPProcessor` from `model` (a hub id such as
    `openai/clip-vit-large-patch14`, or a local directory), with `interpolation` (None: the processor's own
    preprocessing; `bilinear`/`bicubic`: tensor resize as UniCharacter's scorer). Weights load on the
    first call, from local caches (`check()` lists what is missing without loading anything).
    """

    def __init__(
        self,
        *,
        model: str = "ViT-B-32",
        pretrained: str = "openai",
        library: str = "open_clip",
        interpolation: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
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
        if library not in LIBRARIES:
            raise ConfigError(f"clip_similarity: library must be one of {', '.join(LIBRARIES)}, got {library!r}")
        if interpolation not in (None, "bilinear", "bicubic"):
            raise ConfigError(f"clip_similarity: interpolation must be bilinear, bicubic or null, got {interpolation!r}")
        self.model, self.pretrained, self.library, self.cache_dir = model, pretrained, library, cache_dir
        self.interpolation, self.local_files_only = interpolation, local_files_only
        self.scale, self.offset, self.reference_weight = float(scale), float(offset), float(reference_weight)
        self.device = device
        self.encoder = encoder
        self._named = named_feature_model(encoder, "clip_similarity", "encoder") if isinstance(encoder, str) else None
        if self._named is not None:
            self.encoder = None
        self._lock = threading.Lock()
        self._ref_cache = IdentityCache()

    def missing_weights(self) -> list[MissingModel]:
        """The pretrained files the first call would load and cannot find locally (nothing is loaded)."""
        if self.encoder is not None or self._named is not None:
            return []
        if self.library == "transformers":
            return missing_hf_model("clip_similarity", self.model, "CLIPModel + CLIPProcessor", cache_dir=self.cache_dir,
                                    processor=True, alternative="or set the kwarg `model:` to a local directory")
        missing = open_clip_missing(self.model, self.pretrained, self.cache_dir)
        return [missing] if missing is not None else []

    def _encoder(self, device: torch.device) -> Any:
        with self._lock:
            if self.encoder is None and self._named is not None:
                self.encoder = self._named()
            if self.encoder is None and self.library == "transformers":
                self.encoder = load_hf_clip(self.model, cache_dir=self.cache_dir, local_files_only=self.local_files_only,
                                            interpolation=self.interpolation).to(self.device or device)
            elif self.encoder is None:
                self.encoder = load_open_clip(self.model, self.pretrained, self.cache_dir).to(
                    self.device or device
                )
            return self.encoder

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput:
        images, prompts, group_ids = check_inputs("clip_similarity", images, prompts, group_ids)
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
            ref_emb = self._ref_cache.get(
                refs, lambda r: encoder.encode_image(check_images(r, "RewardContext.reference_images")))
            cos_ref = cosine_matrix(image_emb, ref_emb).mean(dim=1)
            cos = (1 - self.reference_weight) * cos_text + self.reference_weight * cos_ref
            info["cos_reference"] = cos_ref.mean().item()
        elif self.reference_weight > 0:
            info["missing"] = "no RewardContext.reference_images: scored on the prompt alone"
        scores = (self.scale * cos + self.offset).float().to(images.device)
        return RewardOutput(scores=scores, info=info)
