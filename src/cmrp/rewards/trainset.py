"""`trainset_penalty`: look like the character, but do not copy its reference images."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.errors import ConfigError
from cmrp.registry import REWARDS
from cmrp.rewards._ops import (
    IdentityCache,
    cosine_matrix,
    fit_square,
    module_device,
    named_feature_model,
    normalise,
)
from cmrp.rewards.base import RewardContext, RewardOutput
from cmrp.rewards.inputs import check_images, check_inputs
from cmrp.rewards.pretrained import MissingModel, load_transformers, missing_hf_model

__all__ = ["Dinov2Features", "TrainsetPenalty", "band_penalty", "dinov2_repo", "load_dinov2", "pixel_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SHORT_NAMES = {"dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant"}

Features = Callable[[torch.Tensor], torch.Tensor]


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The image area-downsampled to 16x16, flattened and mean-centred per image: a weight-free
    stand-in for DINO features (sandbox, tests), so cosine compares layout and colour variation."""
    small = F.interpolate(images.float(), size=(16, 16), mode="area").flatten(1)
    return small - small.mean(dim=1, keepdim=True)


class Dinov2Features:
    """A transformers `Dinov2Model` as `images [B,3,H,W] in [0,1] -> CLS features [B,D]`, preprocessed as
    its image processor does: shortest side to `resize_size` (default `image_size` * 256 / 224, i.e. 256
    for 224), bicubic, centre crop `image_size`, ImageNet normalisation."""

    def __init__(self, model: Any, image_size: int = 224, resize_size: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.resize_size = resize_size or round(image_size * 256 / 224)

    def to(self, device: torch.device | str) -> Dinov2Features:
        self.model.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = module_device(self.model) or images.device
        pixels = fit_square(images.to(device).float(), self.resize_size, crop=self.image_size)
        out = self.model(pixel_values=normalise(pixels, IMAGENET_MEAN, IMAGENET_STD))
        return out.last_hidden_state[:, 0].float()


def dinov2_repo(model: str) -> str:
    return f"facebook/{model}" if model in _SHORT_NAMES else model


def load_dinov2(
    model: str, *, cache_dir: str | None = None, local_files_only: bool | None = None, image_size: int = 224
) -> Dinov2Features:
    """Load DINOv2 from a hub id (`facebook/dinov2-small`, or the short `dinov2-small`) or a local
    directory. The local cache is tried first; the hub only when not offline and `local_files_only`
    is not True. Raises WeightsError saying how to provide the weights."""
    repo = dinov2_repo(model)
    return load_transformers(
        repo, ("Dinov2Model",), lambda net: Dinov2Features(net, image_size), cache_dir=cache_dir,
        local_files_only=local_files_only, what=f"trainset_penalty: DINOv2 model {repo!r}",
        alternative="or set the trainset_penalty kwarg `model:` to a local directory holding the model's config.json "
                    "and weights (a `save_pretrained` copy); without weights use `model: pixel` or pass a `features=` "
                    "callable.")


def band_penalty(similarity: torch.Tensor, tau_low: float, tau_high: float, scale: float) -> torch.Tensor:
    """0 inside [tau_low, tau_high], falling linearly (slope `scale`) outside it."""
    below = (tau_low - similarity).clamp(min=0)
    above = (similarity - tau_high).clamp(min=0)
    return -(below + above) * scale


@REWARDS.register("trainset_penalty")
class TrainsetPenalty:
    """Penalise images too unlike or too like the character's reference (training) images.

    `s` = max cosine similarity between the image's features and the reference images' features
    (`context.reference_images`; without them the term abstains, `info["abstained"]` says so). Reward: 0 for `tau_low <= s <= tau_high`;
    `-(tau_low - s) * penalty_scale` below (off-character); `-(s - tau_high) * penalty_scale` above
    (a near copy of a training image). Defaults tau_low 0.5, tau_high 0.9, penalty_scale 1.0.
    `info["max_similarity"]` holds the raw `s` per sample.

    `features`: any callable `images [B,3,H,W] in [0,1] -> [B,D]`, or the name of one registered in
    `cmrp.registry.FEATURE_MODELS` (`sandbox-image`: the sandbox attribute probe's features; usable from a
    preset YAML). Otherwise `model`: `dinov2-small`
    (default; also `dinov2-base`..., a hub id or a local directory) — transformers' `Dinov2Model`, CLS
    token of the last hidden state at `image_size` px with ImageNet normalisation; or `pixel` — 16x16
    mean-centred pixels, a weight-free proxy. Reference features are cached per reference tensor.
    UniCharacter uses DINOv2-base with slope 2 (`penalty_scale: 2.0`, flow_grpo/flow_grpo/dino_scorer.py:145,149).
    """

    def __init__(
        self,
        *,
        tau_low: float = 0.5,
        tau_high: float = 0.9,
        penalty_scale: float = 1.0,
        model: str = "dinov2-small",
        image_size: int = 224,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        device: str | None = None,
        features: Features | str | None = None,
    ):
        if not tau_low <= tau_high:
            raise ConfigError(f"trainset_penalty: tau_low ({tau_low}) must not exceed tau_high ({tau_high})")
        if penalty_scale < 0:
            raise ConfigError(f"trainset_penalty: penalty_scale must be >= 0, got {penalty_scale!r}")
        self.tau_low, self.tau_high, self.penalty_scale = (
            float(tau_low),
            float(tau_high),
            float(penalty_scale),
        )
        self.model, self.image_size, self.cache_dir = model, int(image_size), cache_dir
        self.local_files_only, self.device = local_files_only, device
        self.features: Any = pixel_features if features is None and model == "pixel" else features
        self._named = named_feature_model(features, "trainset_penalty", "features") if isinstance(features, str) else None
        if self._named is not None:
            self.features = None
        self._lock = threading.Lock()
        self._ref_cache = IdentityCache()

    def _features(self, device: torch.device) -> Features:
        with self._lock:
            if self.features is None and self._named is not None:
                self.features = self._named()
            if self.features is None:
                self.features = load_dinov2(
                    self.model,
                    cache_dir=self.cache_dir,
                    local_files_only=self.local_files_only,
                    image_size=self.image_size,
                ).to(self.device or device)
            return self.features

    def missing_weights(self) -> list[MissingModel]:
        """The DINOv2 files the first call would load and cannot find locally (nothing is loaded)."""
        if self.features is not None or self._named is not None:
            return []
        return missing_hf_model("trainset_penalty", dinov2_repo(self.model), "Dinov2Model", cache_dir=self.cache_dir,
                                alternative="or set the kwarg `model:` to a local directory")

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput:
        images, prompts, group_ids = check_inputs("trainset_penalty", images, prompts, group_ids)
        refs = context.reference_images if context is not None else None
        if refs is None or refs.shape[0] == 0:
            return RewardOutput.abstain(images.shape[0], "no reference images in RewardContext.reference_images "
                                        "to compare with", images.device)
        features = self._features(images.device)
        ref_features = self._ref_cache.get(
            refs, lambda r: features(check_images(r, "RewardContext.reference_images")))
        similarity = cosine_matrix(features(images), ref_features).max(dim=1).values.cpu()
        scores = band_penalty(similarity, self.tau_low, self.tau_high, self.penalty_scale)
        info = {
            "max_similarity": similarity,
            "similarity_mean": similarity.mean().item(),
            "frac_below": (similarity < self.tau_low).float().mean().item(),
            "frac_above": (similarity > self.tau_high).float().mean().item(),
        }
        return RewardOutput(scores.float().to(images.device), info)
