"""Checks that types alone cannot express: allowed names, positive numbers, known tasks.

They run on the typed config and name the file and key of the offending value, so `cmrp validate`
catches a bad recipe before anything is built.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig

from cmrp.config.layers import Provenance
from cmrp.config.yamlio import KeyPath

__all__ = [
    "DATA_FORMATS",
    "DECODING_NAMES",
    "FINETUNE_MODES",
    "IMAGE_HEADS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "STAGES",
    "TASKS",
    "check_card",
    "check_preset",
    "check_recipe",
]

FINETUNE_MODES = ("lora", "qlora", "full")
DECODING_NAMES = ("chain", "joint", "think")
STAGES = ("sft", "grpo")
DATA_FORMATS = ("auto", "native", "rolescape20", "mmrole")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "linear")
TASKS = ("chat", "thinking", "t2i", "vqa", "knowledge_qa")
IMAGE_HEADS = ("flow", "tokens")
SDE_KINDS = ("sde", "cps")
ADV_STD = ("group", "global")
TRAIN_GROUPS = ("generation", "understanding")
RENORM_TYPES = ("global", "channel", "text_channel", "none")  # cmrp.sampling.guidance.RENORM_TYPES
RESUME_MODES = ("never", "auto")


def _one_of(prov: Provenance, path: KeyPath, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    raise prov.error(path, f"is {value!r}, which is not one of {', '.join(allowed)}{hint}")


def _known_name(prov: Provenance, path: KeyPath, name: str, known: Iterable[str], what: str) -> None:
    known = tuple(known)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else "."
    raise prov.error(path, f"names an unknown {what}{hint} Known {what}s: {', '.join(known)}.")


def _positive(prov: Provenance, path: KeyPath, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise prov.error(path, f"must be a positive number, got {value!r}")


def _non_negative(prov: Provenance, path: KeyPath, value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise prov.error(path, f"must be zero or more, got {value!r}")


def check_recipe(cfg: DictConfig, prov: Provenance) -> None:
    """Everything about a recipe except whether its backbone card and reward preset exist."""
    _one_of(prov, ("finetune", "mode"), cfg.finetune.mode, FINETUNE_MODES)
    if cfg.finetune.mode != "full":
        _positive(prov, ("finetune", "r"), cfg.finetune.r)
        _positive(prov, ("finetune", "alpha"), cfg.finetune.alpha)
    if not 0 <= cfg.finetune.dropout < 1:
        raise prov.error(("finetune", "dropout"), f"must be in [0, 1), got {cfg.finetune.dropout!r}")
    _one_of(prov, ("decoding",), cfg.decoding, DECODING_NAMES)

    stages = list(cfg.stages)
    if not stages:
        raise prov.error(("stages",), f"must name at least one stage of {', '.join(STAGES)}")
    for index, stage in enumerate(stages):
        _one_of(prov, ("stages", index), stage, STAGES)
    if len(set(stages)) != len(stages):
        raise prov.error(("stages",), f"lists a stage twice: {stages}")
    if "grpo" in stages and cfg.rewards is None:
        raise prov.error(
            ("rewards",), "is null but stage 'grpo' needs a reward preset, e.g. rewards: unicharacter"
        )

    _one_of(prov, ("data", "format"), cfg.data.format, DATA_FORMATS)
    for task, weight in cfg.data.tasks.items():
        _known_name(prov, ("data", "tasks", task), task, TASKS, "task")
        _non_negative(prov, ("data", "tasks", task), weight)
    if not any(weight > 0 for weight in cfg.data.tasks.values()):
        raise prov.error(("data", "tasks"), f"must give at least one of {', '.join(TASKS)} a weight above 0")
    _positive(prov, ("data", "batch_size"), cfg.data.batch_size)
    _non_negative(prov, ("data", "num_workers"), cfg.data.num_workers)
    _positive(prov, ("data", "max_text_tokens"), cfg.data.max_text_tokens)

    opt = cfg.sft.optimizer
    _one_of(prov, ("sft", "optimizer", "name"), opt.name, OPTIMIZERS)
    _one_of(prov, ("sft", "optimizer", "scheduler"), opt.scheduler, SCHEDULERS)
    _positive(prov, ("sft", "optimizer", "lr"), opt.lr)
    _non_negative(prov, ("sft", "optimizer", "weight_decay"), opt.weight_decay)
    _non_negative(prov, ("sft", "optimizer", "warmup_steps"), opt.warmup_steps)
    _non_negative(prov, ("sft", "ce_weight"), cfg.sft.ce_weight)
    _non_negative(prov, ("sft", "mse_weight"), cfg.sft.mse_weight)

    g = cfg.grpo
    for key in ("max_steps", "prompts_per_step", "group_size", "sample_steps", "window_size", "inner_epochs",
                "minibatch_size", "accumulate", "clip_range", "adv_eps", "reward_workers"):
        _positive(prov, ("grpo", key), g[key])
    _check_guidance(prov, g)
    for key in ("noise_level", "adv_clip", "kl_beta", "max_grad_norm"):
        _non_negative(prov, ("grpo", key), g[key])
    _one_of(prov, ("grpo", "sde"), g.sde, SDE_KINDS)
    _one_of(prov, ("grpo", "adv_std"), g.adv_std, ADV_STD)
    if not 0 <= g.ema_decay < 1:
        raise prov.error(("grpo", "ema_decay"), f"must be in [0, 1), got {g.ema_decay!r}")
    lo_hi = list(g.window_range)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
        raise prov.error(("grpo", "window_range"), f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")
    if "grpo" in stages and g.noise_level == 0:
        raise prov.error(("grpo", "noise_level"), "is 0: GRPO needs SDE steps with noise (e.g. 0.7)")
    for index, group in enumerate(g.train_groups):
        _one_of(prov, ("grpo", "train_groups", index), group, TRAIN_GROUPS)
    gopt = g.optimizer
    _one_of(prov, ("grpo", "optimizer", "name"), gopt.name, OPTIMIZERS)
    _one_of(prov, ("grpo", "optimizer", "scheduler"), gopt.scheduler, SCHEDULERS)
    _positive(prov, ("grpo", "optimizer", "lr"), gopt.lr)

    _positive(prov, ("trainer", "max_steps"), cfg.trainer.max_steps)
    if cfg.finetune.mode == "qlora" and str(cfg.trainer.strategy).startswith(("fsdp", "deepspeed")):
        raise prov.error(("trainer", "strategy"), f"is {cfg.trainer.strategy!r}, which cannot shard QLoRA's 4-bit "
                         "base layers; use trainer.strategy: auto (one GPU) or ddp")
    _positive(prov, ("trainer", "accumulate_grad_batches"), cfg.trainer.accumulate_grad_batches)
    _positive(prov, ("trainer", "log_every_n_steps"), cfg.trainer.log_every_n_steps)

    _one_of(prov, ("resume",), cfg.resume, RESUME_MODES)
    _non_negative(prov, ("checkpoint", "every_n_steps"), cfg.checkpoint.every_n_steps)
    _positive(prov, ("checkpoint", "keep"), cfg.checkpoint.keep)
    _non_negative(prov, ("nonfinite_stop_after",), cfg.nonfinite_stop_after)


def _check_guidance(prov: Provenance, g: DictConfig) -> None:
    """Classifier-free guidance keys of the `grpo:` section (also used by evaluation and the fit grid)."""
    for key in ("cfg_scale", "cfg_img_scale"):
        if not 1 <= g[key] < math.inf:
            raise prov.error(("grpo", key), f"must be 1 or more (1 turns this guidance off), got {g[key]!r}")
    if g.cfg_img_scale > 1 and g.cfg_scale <= 1:
        raise prov.error(("grpo", "cfg_img_scale"), "has no effect while cfg_scale is 1: guidance (image guidance "
                         "included) is on only when cfg_scale > 1, as in BAGEL; raise cfg_scale or set cfg_img_scale: 1")
    lo_hi = list(g.cfg_interval)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
        raise prov.error(("grpo", "cfg_interval"),
                         f"must be [lo, hi] with 0 <= lo <= hi <= 1 (guidance for lo < t <= hi), got {lo_hi}")
    _one_of(prov, ("grpo", "cfg_renorm_type"), g.cfg_renorm_type, RENORM_TYPES)
    if not 0 <= g.cfg_renorm_min <= 1:
        raise prov.error(("grpo", "cfg_renorm_min"), f"must be in [0, 1], got {g.cfg_renorm_min!r}")


def check_card(cfg: DictConfig, prov: Provenance) -> None:
    for key in ("name", "adapter"):
        if not str(cfg[key]).strip():
            raise prov.error((key,), "must not be empty")
    _one_of(prov, ("image_head",), cfg.image_head, IMAGE_HEADS)


def check_preset(cfg: DictConfig, prov: Provenance, known_terms: list[str]) -> None:
    """`known_terms`: registered reward names; empty means none are registered yet (no check)."""
    if not cfg.terms:
        raise prov.error(("terms",), "must list at least one reward term with a weight")
    for term, spec in cfg.terms.items():
        if known_terms:
            _known_name(prov, ("terms", term), term, known_terms, "reward term")
        if not math.isfinite(spec.weight):
            raise prov.error(("terms", term, "weight"), f"must be a finite number, got {spec.weight!r}")
        if known_terms:
            _check_term_kwargs(prov, term, dict(spec.kwargs))


def _check_term_kwargs(prov: Provenance, term: str, kwargs: dict[str, Any]) -> None:
    """A kwarg the term's constructor does not take fails here, not when GRPO starts."""
    from cmrp.registry import REWARDS, kwarg_hints

    accepted = REWARDS.parameters(term)  # read from the term's source: validating imports no torch
    hints = kwarg_hints(kwargs, accepted)
    if hints:
        raise prov.error(("terms", term, "kwargs"),
                         f"has unknown kwarg {', '.join(hints)}; {term} accepts: {', '.join(accepted or [])}")
    for key in ("encoder", "features"):  # a feature net named in YAML must be registered (FEATURE_MODELS)
        if isinstance(kwargs.get(key), str):
            from cmrp.registry import FEATURE_MODELS

            if kwargs[key] not in FEATURE_MODELS:
                raise prov.error(("terms", term, "kwargs", key),
                                 f"unknown feature model {kwargs[key]!r}; registered: {', '.join(FEATURE_MODELS.names())}")
