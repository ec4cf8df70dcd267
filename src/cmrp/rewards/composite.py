"""Weighted sums of reward terms, and building one from a reward preset."""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from cmrp.errors import CmrpError, ConfigError
from cmrp.registry import REWARDS, kwarg_hints
from cmrp.rewards._ops import nan_stats
from cmrp.rewards.base import Reward, RewardContext, RewardOutput
from cmrp.rewards.inputs import check_images, check_inputs
from cmrp.rewards.pretrained import MissingModel, missing_models_error

__all__ = ["Composite", "build_reward", "scalar_metrics"]


class Composite:
    """`total[b] = sum_t weight_t * score_t[b]` over the terms that do not abstain (NaN) for sample b;
    NaN only when every term abstains for b.

    `info[term]` = `{weight, scores (raw [B]), mean, std (NaN-aware), time_s, info (the term's own)}`.
    With `parallel`, terms run in threads (feature nets release the GIL, so CLIP, DINO, LPIPS and VQA
    overlap); every term sees the same inputs and must not modify them. Inputs are validated once here
    (`cmrp.rewards.inputs`): uint8 images become floats in [0,1] before any term sees them.
    """

    def __init__(self, terms: Mapping[str, tuple[float, Reward]], parallel: bool = True, name: str | None = None):
        if not terms:
            raise ConfigError("a composite reward needs at least one term")
        self.terms = {name: (float(weight), term) for name, (weight, term) in terms.items()}
        self.parallel = parallel
        self.name = name

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, (weight, _) in self.terms.items()}

    def missing_weights(self) -> list[MissingModel]:
        """Every pretrained model a term would load on its first call and cannot find on this machine.
        Resolved from file names only: nothing is loaded or downloaded (terms without a
        `missing_weights()` method need none)."""
        missing: list[MissingModel] = []
        for _, term in self.terms.values():
            check = getattr(term, "missing_weights", None)
            missing += list(check()) if callable(check) else []
        return missing

    def check(self) -> None:
        """Raise one WeightsError listing every missing pretrained model with its fix (see `missing_weights`)."""
        missing = self.missing_weights()
        if missing:
            where = f"reward preset {self.name!r}" if self.name else "reward"
            raise missing_models_error(missing, where, "Or use a preset that needs no downloads (e.g. `rewards: "
                                       "sandbox`), or pass your own nets (build_reward(..., term_kwargs=...)).")

    def _run(
        self, name: str, term: Reward, images, prompts, group_ids, context
    ) -> tuple[RewardOutput, float]:
        start = time.perf_counter()
        out = term(images, prompts, group_ids=group_ids, context=context)
        elapsed = time.perf_counter() - start
        if out.scores.shape != (images.shape[0],):
            raise ValueError(
                f"reward term {name!r} returned scores of shape {tuple(out.scores.shape)}, "
                f"expected ({images.shape[0]},)"
            )
        return out, elapsed

    def __call__(
        self,
        images: torch.Tensor,
        prompts: list[str],
        *,
        group_ids: torch.Tensor,
        context: RewardContext | None = None,
    ) -> RewardOutput:
        images, prompts, group_ids = check_inputs("reward", images, prompts, group_ids)
        context = context if context is not None else RewardContext()
        if context.reference_images is not None:
            context = dataclasses.replace(
                context, reference_images=check_images(context.reference_images, "RewardContext.reference_images"))
        args = (images, prompts, group_ids, context)
        if self.parallel and len(self.terms) > 1:
            with ThreadPoolExecutor(max_workers=len(self.terms), thread_name_prefix="reward") as pool:
                futures = {
                    name: pool.submit(self._run, name, term, *args) for name, (_, term) in self.terms.items()
                }
                results = {name: future.result() for name, future in futures.items()}
        else:
            results = {name: self._run(name, term, *args) for name, (_, term) in self.terms.items()}

        batch = images.shape[0]
        total = torch.zeros(batch, dtype=torch.float32, device=images.device)
        counted = torch.zeros(batch, dtype=torch.bool, device=images.device)
        info: dict[str, Any] = {}
        for name, (weight, _) in self.terms.items():
            out, elapsed = results[name]
            scores = out.scores.detach().float().to(images.device)
            present = ~torch.isnan(scores)
            total += torch.where(present, weight * scores, torch.zeros_like(scores))
            counted |= present
            mean, std = nan_stats(scores)
            info[name] = {
                "weight": weight,
                "scores": scores,
                "mean": mean,
                "std": std,
                "time_s": elapsed,
                "info": out.info,
            }
        total = torch.where(counted, total, torch.full_like(total, math.nan))
        return RewardOutput(total, info)


def scalar_metrics(info: Mapping[str, Any], prefix: str = "reward/") -> dict[str, float]:
    """Flatten a `Composite` info dict to loggable floats: `reward/<term>/{mean,std,time_s}` plus the
    term's own scalar info values."""
    metrics: dict[str, float] = {}
    for name, entry in info.items():
        if not isinstance(entry, Mapping):
            continue
        for key in ("mean", "std", "time_s"):
            if key in entry:
                metrics[f"{prefix}{name}/{key}"] = float(entry[key])
        for key, value in (entry.get("info") or {}).items():
            if isinstance(value, bool | int | float):
                metrics[f"{prefix}{name}/{key}"] = float(value)
    return metrics


def unknown_kwargs(cls: Any, kwargs: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(kwargs the reward's constructor does not take, each with a close-name hint; what it accepts).
    Lets `cmrp validate` reject a preset's typo before anything is built."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return [], []
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return [], []
    accepted = [p for p in signature.parameters if p != "self"]
    return kwarg_hints(kwargs, accepted), accepted


def _construct(name: str, cls: Any, kwargs: dict[str, Any], where: str) -> Reward:
    hints, accepted = unknown_kwargs(cls, kwargs)
    if hints:
        raise ConfigError(
            f"{where}, term {name!r}: unknown kwarg {', '.join(hints)}. "
            f"{name} accepts: {', '.join(accepted) or 'nothing'}."
        )
    try:
        return cls(**kwargs)
    except CmrpError as err:
        raise type(err)(f"{where}, term {name!r}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{where}, term {name!r}: bad kwargs {sorted(kwargs)}: {err}") from None


def build_reward(
    preset: Mapping[str, Any],
    *,
    term_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    parallel: bool = True,
    check: bool = True,
) -> Composite:
    """A `Composite` from a preset `{name, description, terms: {term: {weight, kwargs}}}` (what
    `cmrp.config.load_reward_preset` returns). `term_kwargs[term]` adds or overrides constructor kwargs
    (to inject feature nets or an `answerer`); entries for terms the preset lacks are ignored, so one
    set of injections serves every ablation. Terms with weight 0 are skipped. With `check` (default),
    `Composite.check()` fails here, listing every pretrained model that is not on this machine, rather
    than at the first call; `check=False` lets terms load (and, online, download) them lazily."""
    where = f"reward preset {preset.get('name', '<inline>')!r}"
    terms_spec = preset.get("terms") or {}
    if not terms_spec:
        raise ConfigError(f"{where}: `terms` must list at least one reward term with a weight")
    extra = term_kwargs or {}
    terms: dict[str, tuple[float, Reward]] = {}
    for name, spec in terms_spec.items():
        weight = float(spec["weight"])
        if not math.isfinite(weight):
            raise ConfigError(f"{where}, term {name!r}: weight must be a finite number, got {weight!r}")
        cls = REWARDS.get(name, where=f"{where}, key 'terms'")
        if weight == 0:
            continue
        kwargs = {**dict(spec.get("kwargs") or {}), **dict(extra.get(name) or {})}
        terms[name] = (weight, _construct(name, cls, kwargs, where))
    if not terms:
        raise ConfigError(f"{where}: every term has weight 0; give at least one a non-zero weight")
    reward = Composite(terms, parallel=parallel, name=preset.get("name"))
    if check:
        reward.check()
    return reward
