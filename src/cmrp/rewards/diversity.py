"""`lpips_diversity`: images of one GRPO group should differ from each other (no mode collapse)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from cmrp.errors import ConfigError, WeightsError
from cmrp.registry import REWARDS
from cmrp.rewards._ops import check_images, module_device, reason
from cmrp.rewards.base import RewardContext, RewardOutput

__all__ = ["LpipsDiversity", "group_pairs", "load_lpips", "pixel_distance"]

NETS = ("alex", "vgg", "squeeze", "pixel")
_TORCHVISION_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference `[N]`: a weight-free stand-in for LPIPS (sandbox, tests)."""
    return (a.float() - b.float()).abs().flatten(1).mean(dim=1)


def _torchvision_file(net: str) -> str:
    try:
        import torchvision.models as models

        return getattr(models, _TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    except Exception:  # only used to word an error message
        return f"the torchvision ImageNet weights of {net}"


class LpipsDistance:
    """The `lpips` package's metric as `(a, b) -> [N]` on images in [0,1] (scaled to [-1,1] for it)."""

    def __init__(self, module: Any):
        self.module = module.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> LpipsDistance:
        self.module.to(device)
        return self

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        device = module_device(self.module) or a.device
        a, b = a.to(device).float() * 2 - 1, b.to(device).float() * 2 - 1
        return self.module(a, b, normalize=False).flatten()


def load_lpips(net: str, *, version: str = "0.1", model_path: str | None = None) -> LpipsDistance:
    """LPIPS with an `alex`/`vgg`/`squeeze` backbone. Its linear heads ship with the `lpips` package;
    the backbone's ImageNet weights come from torchvision's cache ($TORCH_HOME/hub/checkpoints)."""
    try:
        import lpips
    except ImportError as err:
        raise WeightsError(
            f"lpips_diversity net {net!r} needs the lpips package ({err}): `pip install lpips`, or use "
            f"`net: pixel` (no weights) or pass a `distance=` callable to the term."
        ) from None
    try:
        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation, inside lpips
            warnings.simplefilter("ignore", UserWarning)
            module = lpips.LPIPS(net=net, version=version, model_path=model_path, verbose=False)
    except Exception as err:  # offline downloads fail with URLError, OSError, RuntimeError, ...
        filename = _torchvision_file(net)
        raise WeightsError(
            f"lpips_diversity could not load the LPIPS {net!r} network: {reason(err)}. "
            f"It needs torchvision's ImageNet backbone weights ({filename}) in the torch hub cache: copy the "
            f"file into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/), or download "
            f"it once with network access. Otherwise use `net: pixel` or pass a `distance=` callable."
        ) from None
    return LpipsDistance(module)


def group_pairs(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All within-group pairs i<j as index tensors `(i, j)`, and each sample's group size."""
    ids = group_ids.flatten().cpu()
    same = ids[:, None] == ids[None, :]
    upper = torch.triu(same, diagonal=1)
    first, second = upper.nonzero(as_tuple=True)
    return first, second, same.sum(dim=1)


@REWARDS.register("lpips_diversity")
class LpipsDiversity:
    """Per sample, the mean perceptual distance to the other members of its group.

    The batch mean over a group therefore equals the group's mean pairwise distance. A group of one
    abstains (NaN). Only the pairs i<j are computed, `pair_batch_size` pairs per forward pass.

    `net`: `alex` (default) / `vgg` / `squeeze` — LPIPS from the `lpips` package; `pixel` — mean
    absolute pixel difference, a cheap weight-free proxy for the sandbox and tests. `distance`: any
    callable `(a [N,3,H,W], b [N,3,H,W]) -> [N]` on images in [0,1], replacing `net`. `resize`: side
    images are resized to before measuring (None keeps their size).
    """

    def __init__(
        self,
        *,
        net: str = "alex",
        version: str = "0.1",
        model_path: str | None = None,
        resize: int | None = None,
        pair_batch_size: int = 32,
        device: str | None = None,
        distance: Distance | None = None,
    ):
        if distance is None and net not in NETS:
            raise ConfigError(f"lpips_diversity: net must be one of {', '.join(NETS)}, got {net!r}")
        if pair_batch_size < 1:
            raise ConfigError(f"lpips_diversity: pair_batch_size must be >= 1, got {pair_batch_size!r}")
        self.net, self.version, self.model_path = net, version, model_path
        self.resize, self.pair_batch_size, self.device = resize, int(pair_batch_size), device
        self.distance: Distance | None = pixel_distance if distance is None and net == "pixel" else distance
        self._lock = threading.Lock()

    def _distance(self, device: torch.device) -> Distance:
        with self._lock:
            if self.distance is None:
                self.distance = load_lpips(self.net, version=self.version, model_path=self.model_path).to(
                    self.device or device
                )
            return self.distance

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], *, group_ids: torch.Tensor, context: RewardContext
    ) -> RewardOutput:
        images = check_images(images, "lpips_diversity")
        batch = images.shape[0]
        if group_ids.numel() != batch:
            raise ValueError(f"lpips_diversity: {group_ids.numel()} group ids for {batch} images")
        if self.resize:
            size = (int(self.resize), int(self.resize))
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
        first, second, sizes = group_pairs(group_ids)
        totals = torch.zeros(batch, dtype=torch.float32)
        if first.numel():
            distance = self._distance(images.device)
            chunks = []
            for start in range(0, first.numel(), self.pair_batch_size):
                i = first[start : start + self.pair_batch_size].to(images.device)
                j = second[start : start + self.pair_batch_size].to(images.device)
                chunks.append(distance(images.index_select(0, i), images.index_select(0, j)).float().cpu())
            pair_distances = torch.cat(chunks)
            totals.index_add_(0, first, pair_distances)
            totals.index_add_(0, second, pair_distances)
        others = (sizes - 1).float()
        scores = torch.where(others > 0, totals / others.clamp(min=1), torch.tensor(float("nan")))
        info = {"n_pairs": int(first.numel()), "singleton_groups": int((sizes == 1).sum().item())}
        if first.numel():
            info["mean_pair_distance"] = pair_distances.mean().item()
        return RewardOutput(scores.to(images.device), info)
