"""`lpips_diversity`: images of one GRPO group should differ from each other (no mode collapse)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from cmrp.errors import ConfigError, WeightsError
from cmrp.registry import REWARDS
from cmrp.rewards._ops import module_device, reason
from cmrp.rewards.base import RewardContext, RewardOutput
from cmrp.rewards.inputs import check_inputs
from cmrp.rewards.pretrained import (
    TORCHVISION_WEIGHTS,
    MissingModel,
    offline,
    torch_fetch_hint,
    torch_file_missing,
)

__all__ = ["LpipsDiversity", "group_pairs", "load_lpips", "pixel_distance"]

NETS = ("alex", "vgg", "squeeze", "pixel")
ASSIGN = ("sample", "group")

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference `[N]`: a weight-free stand-in for LPIPS (sandbox, tests)."""
    return (a.float() - b.float()).abs().flatten(1).mean(dim=1)


def lpips_backbone_missing(net: str) -> MissingModel | None:
    """LPIPS `net`'s torchvision ImageNet backbone weights, if they are not in the torch hub cache."""
    url = TORCHVISION_WEIGHTS[net]
    if torch_file_missing(url) is None:
        return None
    return MissingModel("lpips_diversity", f"LPIPS {net!r} backbone ({url.rsplit('/', 1)[-1]}, torchvision ImageNet)",
                        torch_fetch_hint(url))


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
    the backbone's ImageNet weights come from torchvision's cache ($TORCH_HOME/hub/checkpoints), and are
    downloaded there only when `HF_HUB_OFFLINE`/`TRANSFORMERS_OFFLINE` do not say offline."""
    try:
        import lpips
    except ImportError as err:
        raise WeightsError(
            f"lpips_diversity net {net!r} needs the lpips package ({err}): `pip install lpips`, or use "
            f"`net: pixel` (no weights) or pass a `distance=` callable to the term."
        ) from None
    missing = lpips_backbone_missing(net)
    if missing is not None and offline():
        raise WeightsError(f"lpips_diversity: the LPIPS {net!r} backbone is not in the torch hub cache and the "
                           f"machine is offline: {missing.fix}. Otherwise use `net: pixel` or pass a `distance=` callable.")
    try:
        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation, inside lpips
            warnings.simplefilter("ignore", UserWarning)
            module = lpips.LPIPS(net=net, version=version, model_path=model_path, verbose=False)
    except Exception as err:  # downloads fail with URLError, OSError, RuntimeError, ...
        raise WeightsError(
            f"lpips_diversity could not load the LPIPS {net!r} network: {reason(err)}. It needs torchvision's "
            f"ImageNet backbone weights: {torch_fetch_hint(TORCHVISION_WEIGHTS[net])}. Otherwise use `net: pixel` "
            f"or pass a `distance=` callable."
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
    abstains (NaN, `info["abstained"]` says so). Only the pairs i<j are computed, `pair_batch_size` pairs
    per forward pass. `assign: group` gives every member the group's mean pairwise distance instead
    (the paper's R_div = 1/(G(G-1)) sum_{i!=j} LPIPS(x_i, x_j), as UniCharacter assigns it,
    flow_grpo/flow_grpo/rewards.py:121-127); note that a per-group constant cancels in group-normalised
    GRPO advantages, so with `group` the term changes the logged reward but not the policy update.

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
        assign: str = "sample",
        pair_batch_size: int = 32,
        device: str | None = None,
        distance: Distance | None = None,
    ):
        if distance is None and net not in NETS:
            raise ConfigError(f"lpips_diversity: net must be one of {', '.join(NETS)}, got {net!r}")
        if assign not in ASSIGN:
            raise ConfigError(f"lpips_diversity: assign must be one of {', '.join(ASSIGN)}, got {assign!r}")
        if pair_batch_size < 1:
            raise ConfigError(f"lpips_diversity: pair_batch_size must be >= 1, got {pair_batch_size!r}")
        self.net, self.version, self.model_path = net, version, model_path
        self.resize, self.assign, self.pair_batch_size, self.device = resize, assign, int(pair_batch_size), device
        self.distance: Distance | None = pixel_distance if distance is None and net == "pixel" else distance
        self._lock = threading.Lock()

    def missing_weights(self) -> list[MissingModel]:
        """The lpips package and backbone weights the first call would load, if they are not here."""
        if self.distance is not None:
            return []
        import importlib.util

        if importlib.util.find_spec("lpips") is None:
            return [MissingModel("lpips_diversity", "the lpips package", "`pip install lpips`",
                                 "or use `net: pixel`")]
        missing = lpips_backbone_missing(self.net)
        return [missing] if missing is not None else []

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
        images, prompts, group_ids = check_inputs("lpips_diversity", images, prompts, group_ids)
        batch = images.shape[0]
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
        if self.assign == "group":  # each member gets its group's mean (= mean over members of `scores`)
            same = group_ids[:, None] == group_ids[None, :]
            scores = torch.where(others > 0, (same.float() @ torch.nan_to_num(scores)) / sizes.float(), scores)
        singletons = int((sizes == 1).sum().item())
        info: dict[str, Any] = {"n_pairs": int(first.numel()), "singleton_groups": singletons}
        if singletons:
            info["abstained"] = f"{singletons} of {batch} samples are alone in their group (no pair to compare)"
            info["n_abstained"] = singletons
        if first.numel():
            info["mean_pair_distance"] = pair_distances.mean().item()
        return RewardOutput(scores.to(images.device), info)
