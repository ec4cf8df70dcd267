"""What a run needs before any work starts, checked once for `cmrp validate` and `cmrp fit` alike.

`cmrp validate` and `cmrp fit` call the same functions here, so whatever validate accepts, fit runs:
- the output directory: not a file, not under a file, writable (fit also creates it and writes a probe);
- the character data: at least one training example for the weighted tasks (counted per task) and, for
  the `grpo` stage, image prompts; GRPO's SDE window against its sampler (`check_sampler`);
- this machine: QLoRA's CUDA GPU, what Lightning accepts for `trainer.*` (accelerator, devices, precision,
  strategy), `init_from` and `data.path` present, the pretrained weights of the GRPO reward.
  `cmrp validate` reports these as notes (a recipe may be
  meant for another machine) and still says OK; `cmrp fit` stops on them before any work;
- once fit has built the model: free disk space for the checkpoints it will write, and the model-dependent
  choices (LoRA targets x GRPO train groups).
A write that fails later (a full disk) becomes one clear error through `cmrp.training.storage`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cmrp.config.loader import resolve_recipe_parts
from cmrp.data.sources import SANDBOX_SCHEME
from cmrp.data.tasks import build_examples, image_prompts
from cmrp.errors import ConfigError, DataError
from cmrp.training.storage import existing_ancestor
from cmrp.training.trainer import trainer_strategy

if TYPE_CHECKING:
    from cmrp.backbones.protocol import Backbone

__all__ = [
    "RunCheck",
    "check_model",
    "check_output_dir",
    "check_run",
    "check_sampler",
    "checkpoint_bytes",
    "training_counts",
]


@dataclass
class RunCheck:
    """What the shared pass found: training examples per task, and problems of this machine (notes)."""

    counts: dict[str, int] = field(default_factory=dict)
    prompts: int | None = None  # GRPO image prompts (train split), when the recipe has a grpo stage
    notes: list[str] = field(default_factory=list)
    character: Any = None  # the character the counts are of (None when its data is not here)


# -- output directory ------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | Path, *, create: bool) -> Path:
    """The run's output directory, absolute. Fails with one message when it is a file, lies under a file, is
    not writable (permissions, read-only mount) or cannot be named on this file system. With `create` (fit)
    the directory is made and a probe file written and removed, which settles what permission bits cannot."""
    text = str(output_dir)
    if not text.strip() or "\0" in text:
        raise ConfigError(f"output_dir {text!r} is not a usable path (empty or with a NUL character)")
    path = Path(text).expanduser().absolute()
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"output_dir {path}: the name {part[:40]!r}... is longer than the 255 bytes a file "
                              "system allows; shorten `name` or output_dir")
    where = f"output_dir {path}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} is a file, not a directory; choose another output_dir (or move the file)")
    base = existing_ancestor(path)
    if not base.is_dir():
        raise ConfigError(f"{where} cannot be created: {base} is a file; choose another output_dir")
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise ConfigError(f"{where}: {base} is on a read-only file system; choose a writable output_dir")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {base} is not writable by this user; choose a writable output_dir")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".cmrp-write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(f"{where}: cannot write there ({err.strerror or err}); choose another output_dir") from None
    return path


# -- disk space and failed writes --------------------------------------------------------------------------


def checkpoint_bytes(model: Any, trained_names: list[str], cfg: Any) -> int:
    """About what a run writes under output_dir: `checkpoint.keep` resume checkpoints (+1 while the next is
    written), each the trained weights with optimiser state (AdamW: two moments) and, in GRPO, EMA and
    reference copies; then the final checkpoint (the whole backbone in full mode, else the adapter)."""
    trained = set(trained_names)
    trained_bytes = total_bytes = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total_bytes += size
        if name in trained:
            trained_bytes += size
    copies = 3  # weights + AdamW's two moments (SGD's momentum: fewer)
    if "grpo" in cfg.stages:
        copies += int(cfg.grpo.ema_decay > 0) + int(cfg.grpo.kl_beta > 0 and cfg.finetune.mode == "full")
    resume = (cfg.checkpoint.keep + 1) * copies * trained_bytes if cfg.checkpoint.every_n_steps else 0
    final = total_bytes if cfg.finetune.mode == "full" else trained_bytes
    return resume + final


# -- data ----------------------------------------------------------------------------------------------------
def training_counts(cfg: Any, character: Any) -> RunCheck:
    """Training examples per weighted task (and GRPO image prompts); a DataError when a stage has none."""
    check = RunCheck()
    where = f"{cfg.data.path}" + (f" (character {cfg.data.character})" if cfg.data.character else "")
    if "sft" in cfg.stages:
        weighted = [task for task, weight in cfg.data.tasks.items() if weight > 0]
        examples = build_examples(character, weighted, decoding=cfg.decoding)
        check.counts = {task: len(items) for task, items in examples.items()}
        if not any(check.counts.values()):
            counts = ", ".join(f"{task} {n}" for task, n in check.counts.items())
            raise DataError(f"data: {where} has no training examples for the tasks data.tasks weights ({counts}): its "
                            "train split holds no scenes, images or QA. Add training data, or fix data.path / "
                            "data.character")
    if "grpo" in cfg.stages:
        check.prompts = len(image_prompts(character, split="train", decoding=cfg.decoding))
        if not check.prompts:
            raise DataError(f"data: {where} has no image prompts (scenes that show an image, or T2I instructions) in "
                            "its train split, which stage 'grpo' trains on; add some, or drop grpo from stages")
    return check


def check_sampler(cfg: Any) -> None:
    """GRPO's SDE window: with `sde: cps` the noise of a step is t'·sin(eta·pi/2), none at all for the step that
    lands on the image (t' = 0), which then has no log-prob to train; the window may not reach that step."""
    g = cfg.grpo
    if "grpo" not in cfg.stages or g.sde != "cps":
        return
    from cmrp.sampling.flow import window_starts  # torch: only GRPO recipes need it

    steps, size = g.sample_steps, min(g.window_size, g.sample_steps)
    if window_starts(steps, size, *g.window_range)[1] + size >= steps:
        raise ConfigError(f"grpo.sde: cps has no noise in the last of the {steps} sample steps, and this SDE window "
                          f"(window_size {g.window_size}, window_range {list(g.window_range)}) can include it; "
                          "lower grpo.window_size or grpo.window_range[1], raise grpo.sample_steps, or use sde: sde")


# -- this machine ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _beyond_one_cpu(t: Any) -> list[str]:
    """The `trainer.*` hardware keys set to more than every machine has (one process, fp32); with none,
    Lightning need not be asked (or imported)."""
    plain = {"accelerator": t.accelerator in ("auto", "cpu"), "devices": t.devices in (1, "auto"),
             "num_nodes": t.num_nodes == 1, "precision": str(t.precision) in ("32-true", "32"),
             "strategy": t.strategy == "auto"}
    return [key for key, ok in plain.items() if not ok]


def _trainer_problem(cfg: Any) -> str | None:
    """What Lightning says about `trainer.*` on this machine (accelerator, devices, precision, strategy)."""
    if not _beyond_one_cpu(cfg.trainer):
        return None
    import lightning as L
    from omegaconf import OmegaConf

    from cmrp.training.checkpointing import capture_rng, restore_rng

    kwargs = cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True))  # a mapping section
    kwargs["strategy"] = trainer_strategy(kwargs["strategy"])
    rng = capture_rng()  # making a Trainer draws from Python's `random`; a run's numbers must not move
    try:
        with _quiet_lightning():
            L.Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    except Exception as err:  # noqa: BLE001 - Lightning raises several types for a setting it cannot honour
        text = " ".join(str(err).split()) or type(err).__name__
        keys = [k for k in ("accelerator", "devices", "num_nodes", "precision", "strategy") if k in text.lower()]
        keys = keys or _beyond_one_cpu(cfg.trainer)  # e.g. "No supported gpu backend found!" names none
        named = ", ".join(f"trainer.{k} {cfg.trainer[k]!r}" for k in keys)
        return f"{named}: {text[:300]}"
    finally:
        restore_rng(rng)
    return None


def machine_problems(cfg: Any) -> list[str]:
    """Why `cmrp fit` of this recipe cannot run on this machine (nothing about the recipe being wrong)."""
    problems = []
    if cfg.finetune.mode == "qlora":  # the only mode with runtime needs; the check imports torch
        from cmrp.training.peft import check_finetune_runtime

        try:
            check_finetune_runtime(cfg.finetune)
        except ConfigError as err:
            problems.append(str(err))
    trainer = _trainer_problem(cfg)
    if trainer:
        problems.append(trainer)
    if cfg.init_from:
        from cmrp.backbones.loading import find_checkpoint

        try:
            find_checkpoint(Path(cfg.init_from).expanduser())
        except ConfigError as err:
            problems.append(f"init_from: {err}")
    missing = missing_reward_weights(cfg)
    if missing:
        problems.append(missing)
    return problems


def missing_reward_weights(cfg: Any) -> str | None:
    """Every pretrained model the GRPO reward would load and cannot find here, in one message (file look-ups
    only: nothing is loaded), so a missing weight stops `cmrp fit` at once rather than after the SFT stage."""
    if "grpo" not in cfg.stages:
        return None

    _, preset = resolve_recipe_parts(cfg)
    if preset is None:
        return None
    from cmrp.rewards import build_reward
    from cmrp.rewards.pretrained import missing_models_error

    missing = build_reward(preset, check=False).missing_weights()
    return str(missing_models_error(missing, f"reward preset {preset['name']!r}")) if missing else None


# -- the shared pass ---------------------------------------------------------------------------------------------
def check_run(cfg: Any, load_character: Callable[[], Any], *, fit: bool) -> RunCheck:
    """The checks `cmrp validate` (`fit=False`) and `cmrp fit` (`fit=True`) share, in order: output directory,
    this machine, the character's training data. Machine problems are errors for fit and notes for validate.
    `load_character()` returns the recipe's character (fit writes a sandbox one into output_dir)."""
    check_output_dir(cfg.output_dir, create=False)
    check_sampler(cfg)
    notes = machine_problems(cfg)
    path = str(cfg.data.path)
    data_here = path.startswith(SANDBOX_SCHEME) or Path(path).expanduser().exists()
    if not data_here:
        notes.append(f"data.path {path} does not exist here (a relative path is read from the working directory)")
    if notes and fit:
        raise ConfigError(notes[0])
    if fit:  # only now: a run that cannot start leaves nothing behind
        check_output_dir(cfg.output_dir, create=True)
    if not data_here:
        return RunCheck(notes=notes)
    character = load_character()
    result = training_counts(cfg, character)
    result.notes, result.character = notes, character
    return result


def check_model(cfg: Any, adapter: Backbone, trained_names: list[str]) -> None:
    """Checks that need the built model, before fit spends any time: GRPO's train groups must leave some of the
    fine-tuned weights trainable (LoRA targets and groups can miss each other)."""
    if "grpo" not in cfg.stages:
        return
    from cmrp.training.peft import freeze_to_groups

    params = dict(adapter.model.named_parameters())
    try:
        freeze_to_groups(adapter, list(cfg.grpo.train_groups))  # raises ConfigError when nothing is left
    finally:
        for name in trained_names:
            params[name].requires_grad_(True)
