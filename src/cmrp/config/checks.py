"""Checks that types alone cannot express: allowed names, positive numbers, known tasks.

They run on the typed config and name the file and key of the offending value, so `cmrp validate`
catches a bad recipe before anything is built.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig

from cmrp.config.layers import Provenance
from cmrp.config.yamlio import KeyPath
from cmrp.registry import DECODING, FEATURE_MODELS, FORMATS, REWARDS, kwarg_hints, source_names

__all__ = [
    "FINETUNE_MODES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "STAGES",
    "check_card",
    "check_preset",
    "check_recipe",
]

FINETUNE_MODES = ("lora", "qlora", "full")
STAGES = ("sft", "grpo")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "linear")
SDE_KINDS = ("sde", "cps")
ADV_STD = ("group", "global")
TRAIN_GROUPS = ("generation", "understanding")
RESUME_MODES = ("never", "auto")


# Names whose home is the code that uses them: registries (built-ins and plugins), or constants read from source
def _data_formats() -> tuple[str, ...]:
    return ("auto", *FORMATS.names())


def _tasks() -> tuple[str, ...]:
    return source_names("cmrp.data.tasks", "TASKS")


def _image_heads() -> tuple[str, ...]:
    return source_names("cmrp.backbones.protocol", "ImageHead")


def _renorm_types() -> tuple[str, ...]:
    return source_names("cmrp.sampling.guidance", "RENORM_TYPES")


# Upper bounds: what numpy, torch and Lightning accept, and sizes far beyond any real run, so a typo such as
# 10**26 steps fails here with its file and line instead of overflowing deep inside a data loader.
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
MAX_COUNT = 2**31 - 1  # steps and counters (torch/Lightning int32 progress counters)
MAX_BATCH = 2**16  # examples, prompts, samples per step
MAX_SAMPLE_STEPS = 10_000  # sampler steps of one image
MAX_WORKERS = 1024  # data-loader processes, reward threads
MAX_DRAWN = 50_000_000  # examples (SFT) or prompts (GRPO) a run draws up front, as one list in memory
MAX_FLOAT = 1e30  # float32 holds up to 3.4e38: a learning rate this large still multiplies a gradient finitely
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", "16", "bf16",
              "transformer-engine", "transformer-engine-float16")  # Lightning's names


def _count(prov: Provenance, path: KeyPath, value: Any, low: int, high: int) -> None:
    """An integer in [low, high] (bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise prov.error(path, f"must be an integer from {low} to {high}, got {value!r}")


def _finite(prov: Provenance, path: KeyPath, value: float, high: float, *, positive: bool = False) -> None:
    """A number in [0, high] (or (0, high]); `high` keeps float32 arithmetic (lr x weight decay, a weight x a
    loss) finite — 1e300 is a finite Python float but overflows every tensor it touches."""
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0) and value <= high
    if not ok:
        low = "above 0" if positive else "from 0"
        raise prov.error(path, f"must be a number {low} up to {high:g}, got {value!r}")


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


def check_recipe(cfg: DictConfig, prov: Provenance) -> None:
    """Everything about a recipe except whether its backbone card and reward preset exist."""
    _count(prov, ("seed",), cfg.seed, 0, MAX_SEED)
    _check_finetune(prov, cfg.finetune)
    _one_of(prov, ("decoding",), cfg.decoding, tuple(DECODING.names()))  # built-ins and plugins

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

    _check_data(prov, cfg.data)
    _check_trainer(prov, cfg)
    _check_sft(prov, cfg)  # after the trainer's ranges: it bounds their product
    _check_grpo(prov, cfg.grpo, stages)

    _one_of(prov, ("resume",), cfg.resume, RESUME_MODES)
    _count(prov, ("checkpoint", "every_n_steps"), cfg.checkpoint.every_n_steps, 0, MAX_COUNT)
    _count(prov, ("checkpoint", "keep"), cfg.checkpoint.keep, 1, 10_000)
    _count(prov, ("nonfinite_stop_after",), cfg.nonfinite_stop_after, 0, MAX_COUNT)
    e = cfg.eval
    _count(prov, ("eval", "grid_prompts"), e.grid_prompts, 0, MAX_BATCH)
    _count(prov, ("eval", "images_per_prompt"), e.images_per_prompt, 1, MAX_BATCH)
    _count(prov, ("eval", "sample_steps"), e.sample_steps, 1, MAX_SAMPLE_STEPS)
    _count(prov, ("eval", "max_items"), e.max_items, 0, MAX_COUNT)
    w = cfg.world
    _count(prov, ("world", "first_seed"), w.first_seed, 0, MAX_SEED)
    _count(prov, ("world", "characters"), w.characters, 1, 1_000_000)
    _count(prov, ("world", "reference_images"), w.reference_images, 1, 60)
    _count(prov, ("world", "scenes"), w.scenes, 1, 100_000)
    _count(prov, ("world", "heldout_characters"), w.heldout_characters, 0, 10_000)


def _check_finetune(prov: Provenance, f: DictConfig) -> None:
    _one_of(prov, ("finetune", "mode"), f.mode, FINETUNE_MODES)
    if f.mode != "full":
        _count(prov, ("finetune", "r"), f.r, 1, MAX_BATCH)
        _count(prov, ("finetune", "alpha"), f.alpha, 1, MAX_BATCH)
    if not 0 <= f.dropout < 1:
        raise prov.error(("finetune", "dropout"), f"must be in [0, 1), got {f.dropout!r}")
    targets = f.targets
    if isinstance(targets, str):
        if not targets.strip():
            raise prov.error(("finetune", "targets"), "must name a LoRA target set (e.g. default) or list patterns")
        return
    if not isinstance(targets, ListConfig) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise prov.error(("finetune", "targets"), "must be a target set name (default, generation, understanding) "
                         f"or a non-empty list of module-name patterns, got {targets!r}")
    for index, pattern in enumerate(targets):
        try:
            re.compile(pattern)
        except re.error as err:
            raise prov.error(("finetune", "targets", index), f"is not a valid regular expression ({err})") from None


def _check_data(prov: Provenance, d: DictConfig) -> None:
    if not str(d.path).strip():
        raise prov.error(("data", "path"), "must name a character directory or sandbox://SEED")
    _one_of(prov, ("data", "format"), d.format, _data_formats())
    for task, weight in d.tasks.items():
        _known_name(prov, ("data", "tasks", task), task, _tasks(), "task")
        _finite(prov, ("data", "tasks", task), weight, 1e6)
    if not any(weight > 0 for weight in d.tasks.values()):
        raise prov.error(("data", "tasks"), f"must give at least one of {', '.join(_tasks())} a weight above 0")
    _count(prov, ("data", "batch_size"), d.batch_size, 1, MAX_BATCH)
    _count(prov, ("data", "num_workers"), d.num_workers, 0, MAX_WORKERS)
    _count(prov, ("data", "max_text_tokens"), d.max_text_tokens, 1, 2**20)


def _check_optimizer(prov: Provenance, section: str, opt: DictConfig) -> None:
    at = (section, "optimizer")
    _one_of(prov, (*at, "name"), opt.name, OPTIMIZERS)
    _one_of(prov, (*at, "scheduler"), opt.scheduler, SCHEDULERS)
    _finite(prov, (*at, "lr"), opt.lr, MAX_FLOAT, positive=True)
    betas = list(opt.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise prov.error((*at, "betas"), f"must be [beta1, beta2], each in [0, 1), got {betas}")
    _finite(prov, (*at, "weight_decay"), opt.weight_decay, 10)
    _count(prov, (*at, "warmup_steps"), opt.warmup_steps, 0, MAX_COUNT)


def _check_sft(prov: Provenance, cfg: DictConfig) -> None:
    _finite(prov, ("sft", "ce_weight"), cfg.sft.ce_weight, 1000)
    _finite(prov, ("sft", "mse_weight"), cfg.sft.mse_weight, 1000)
    _finite(prov, ("sft", "timestep_shift"), cfg.sft.timestep_shift, 100, positive=True)
    _check_optimizer(prov, "sft", cfg.sft.optimizer)
    if "sft" in cfg.stages:
        drawn = cfg.trainer.max_steps * cfg.trainer.accumulate_grad_batches * cfg.data.batch_size
        if drawn > MAX_DRAWN:
            raise prov.error(("trainer", "max_steps"), f"x trainer.accumulate_grad_batches x data.batch_size is {drawn} "
                             f"examples, drawn up front; at most {MAX_DRAWN} (lower one of them)")


def _check_grpo(prov: Provenance, g: DictConfig, stages: list[str]) -> None:
    _count(prov, ("grpo", "max_steps"), g.max_steps, 1, MAX_COUNT)
    for key in ("prompts_per_step", "group_size", "minibatch_size", "accumulate"):
        _count(prov, ("grpo", key), g[key], 1, MAX_BATCH)
    for key in ("sample_steps", "window_size", "inner_epochs"):
        _count(prov, ("grpo", key), g[key], 1, MAX_SAMPLE_STEPS)
    _count(prov, ("grpo", "reward_workers"), g.reward_workers, 1, MAX_WORKERS)
    if g.heldout_prompts is not None:
        _count(prov, ("grpo", "heldout_prompts"), g.heldout_prompts, 0, MAX_BATCH)
    if g.heldout_images is not None:
        _count(prov, ("grpo", "heldout_images"), g.heldout_images, 2, MAX_BATCH)
    if g.max_steps * g.prompts_per_step > MAX_DRAWN:
        raise prov.error(("grpo", "max_steps"), f"x grpo.prompts_per_step is {g.max_steps * g.prompts_per_step} "
                         f"prompts, drawn up front; at most {MAX_DRAWN}")
    for key, high in (("clip_range", 10), ("adv_eps", 10)):
        _finite(prov, ("grpo", key), g[key], high, positive=True)
    _check_guidance(prov, g)
    for key, high in (("adv_clip", MAX_FLOAT), ("kl_beta", 1000), ("max_grad_norm", MAX_FLOAT)):
        _finite(prov, ("grpo", key), g[key], high)
    # cps: the step's noise fraction is sin(eta·pi/2), which falls again above 1
    _finite(prov, ("grpo", "noise_level"), g.noise_level, 1 if g.sde == "cps" else 10)
    if g.timestep_shift is not None:
        _finite(prov, ("grpo", "timestep_shift"), g.timestep_shift, 100, positive=True)
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
    _check_optimizer(prov, "grpo", g.optimizer)


def _check_trainer(prov: Provenance, cfg: DictConfig) -> None:
    """Ranges and names; whether this machine has the accelerator and devices is `cmrp.training.preflight`'s."""
    t = cfg.trainer
    _count(prov, ("trainer", "max_steps"), t.max_steps, 1, MAX_COUNT)
    _count(prov, ("trainer", "num_nodes"), t.num_nodes, 1, MAX_BATCH)
    _count(prov, ("trainer", "accumulate_grad_batches"), t.accumulate_grad_batches, 1, MAX_BATCH)
    _count(prov, ("trainer", "log_every_n_steps"), t.log_every_n_steps, 1, MAX_COUNT)
    if t.gradient_clip_val is not None:
        _finite(prov, ("trainer", "gradient_clip_val"), t.gradient_clip_val, MAX_FLOAT)
    _one_of(prov, ("trainer", "precision"), str(t.precision), PRECISIONS)
    devices = t.devices
    if isinstance(devices, ListConfig):
        if not devices or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_BATCH
                                  for d in devices):
            raise prov.error(("trainer", "devices"), f"must list device indices (e.g. [0, 1]), got {list(devices)}")
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not (devices == -1 or 1 <= devices <= MAX_BATCH):
            raise prov.error(("trainer", "devices"), f"must be a number of devices (1 or more, -1: all), got {devices}")
    elif not (isinstance(devices, str) and (devices == "auto" or re.fullmatch(r"-1|\d+(,\d+)*,?", devices))):
        raise prov.error(("trainer", "devices"), f"must be auto, a number of devices or a list of indices, got {devices!r}")
    if str(t.strategy).startswith("deepspeed"):
        raise prov.error(("trainer", "strategy"), f"is {t.strategy!r}: cmrp does not run DeepSpeed (Lightning runs it "
                         "on CUDA GPUs only, so no test of ours can); use trainer.strategy: fsdp (sharded weights, "
                         "gradients and optimiser state, as ZeRO-3) or ddp (replicated)")
    if cfg.finetune.mode == "qlora" and str(t.strategy).startswith("fsdp"):
        raise prov.error(("trainer", "strategy"), f"is {t.strategy!r}, which cannot shard QLoRA's 4-bit "
                         "base layers; use trainer.strategy: auto (one GPU) or ddp")


def _check_guidance(prov: Provenance, g: DictConfig) -> None:
    """Classifier-free guidance keys of the `grpo:` section (also used by evaluation and the fit grid)."""
    for key in ("cfg_scale", "cfg_img_scale"):
        if not 1 <= g[key] <= 100:
            raise prov.error(("grpo", key), f"must be from 1 (1 turns this guidance off) up to 100, got {g[key]!r}")
    if g.cfg_img_scale > 1 and g.cfg_scale <= 1:
        raise prov.error(("grpo", "cfg_img_scale"), "has no effect while cfg_scale is 1: guidance (image guidance "
                         "included) is on only when cfg_scale > 1, as in BAGEL; raise cfg_scale or set cfg_img_scale: 1")
    lo_hi = list(g.cfg_interval)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
        raise prov.error(("grpo", "cfg_interval"),
                         f"must be [lo, hi] with 0 <= lo <= hi <= 1 (guidance for lo < t <= hi), got {lo_hi}")
    _one_of(prov, ("grpo", "cfg_renorm_type"), g.cfg_renorm_type, _renorm_types())
    if not 0 <= g.cfg_renorm_min <= 1:
        raise prov.error(("grpo", "cfg_renorm_min"), f"must be in [0, 1], got {g.cfg_renorm_min!r}")


def check_card(cfg: DictConfig, prov: Provenance) -> None:
    for key in ("name", "adapter"):
        if not str(cfg[key]).strip():
            raise prov.error((key,), "must not be empty")
    _one_of(prov, ("image_head",), cfg.image_head, _image_heads())


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
    accepted = REWARDS.parameters(term)  # read from the term's source: validating imports no torch
    hints = kwarg_hints(kwargs, accepted)
    if hints:
        raise prov.error(("terms", term, "kwargs"),
                         f"has unknown kwarg {', '.join(hints)}; {term} accepts: {', '.join(accepted or [])}")
    for key in ("encoder", "features"):  # a feature net named in YAML must be registered (FEATURE_MODELS)
        if isinstance(kwargs.get(key), str):
            if kwargs[key] not in FEATURE_MODELS:
                raise prov.error(("terms", term, "kwargs", key),
                                 f"unknown feature model {kwargs[key]!r}; registered: {', '.join(FEATURE_MODELS.names())}")
