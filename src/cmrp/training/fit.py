"""`cmrp fit`: from a recipe to a tracked, evaluated, checkpointed run.

Order: character -> backbone (card) -> fine-tuning mode -> "before" metrics -> stages -> "after"
metrics, sample grid, checkpoint, metrics.json — each logged to MLflow.

Resume checkpoints (`checkpointing.py`) are written every `checkpoint.every_n_steps` and at the end of
each stage; with `resume: auto` a run continues the latest valid one exactly: same weights, optimiser,
scheduler, RNG, data position and MLflow run, and stages already finished are not run again.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cmrp.backbones.images import ImageLoader
from cmrp.backbones.kit import SANDBOX_WEIGHTS
from cmrp.backbones.loading import find_checkpoint, load_checkpoint, load_recipe_of
from cmrp.backbones.protocol import Backbone
from cmrp.checkpoint import atomic_write, write_folder_manifest
from cmrp.config import Redactor, flatten, resolve_recipe_parts
from cmrp.data.sources import load_recipe_character
from cmrp.data.tasks import Example, Segment, build_examples, character_corpus
from cmrp.errors import ConfigError
from cmrp.evaluation.grid import save_image_grid
from cmrp.evaluation.stage import stage_numbers
from cmrp.jsonio import write_json
from cmrp.registry import BACKBONES
from cmrp.sampling.spec import SamplerSpec
from cmrp.tracking import make_logger, open_tracked_run
from cmrp.training.checkpointing import (
    Checkpointer,
    check_fingerprint,
    find_resume_point,
    load_weights,
    rank_rng,
    recipe_fingerprint,
    restore_rng,
)
from cmrp.training.grpo_stage import run_grpo_stage
from cmrp.training.peft import apply_finetune, count_trainable, save_adapter
from cmrp.training.preflight import check_model, check_output_dir, check_run, checkpoint_bytes
from cmrp.training.progress import progress_callbacks, quiet_noise
from cmrp.training.storage import check_free_space
from cmrp.training.trainer import is_main_process, trainer_strategy

__all__ = ["FitResult", "load_run_character", "run_fit", "run_sft", "stage_offset", "stage_steps"]


@dataclass
class FitResult:
    output_dir: Path
    tracking_uri: str
    run_id: str
    metrics: dict[str, Any]
    grid_path: Path | None
    checkpoint_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    main: bool = True  # False on the non-zero ranks of a distributed run
    tracking_pending: Path | None = None  # set when the tracking server failed: records waiting for upload
    resumed_from: Path | None = None
    experiment_id: str | None = None


def load_run_character(data_cfg: Any, output_dir: Path):
    """The recipe's character; in a distributed run only rank 0 writes a generated one."""
    return load_recipe_character(data_cfg, output_dir, may_write=is_main_process())


class _LossHistory:
    """Collects train/loss per step (for the fall-of-loss summary in metrics.json)."""

    def __init__(self):
        import lightning as L

        history = self.losses = []

        class _Callback(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                history.append(float(loss.detach()))

        self.callback = _Callback()

    def summary(self, window: int = 10) -> dict[str, float]:
        if not self.losses:
            return {}
        w = max(1, min(window, len(self.losses) // 4 or 1))
        first = sum(self.losses[:w]) / w
        last = sum(self.losses[-w:]) / w
        return {"loss_first": first, "loss_last": last, "loss_drop": 1.0 - last / first if first else 0.0}


def _sample_grid(adapter: Backbone, character, eval_cfg, seed: int, path: Path) -> Path | None:
    items = (character.test.t2i or character.train.t2i)[: eval_cfg.grid_prompts]
    if not items:
        return None
    images = {**character.train.images, **character.test.images}
    contexts = [Example("t2i", [Segment("text", "user", item.instruction)]) for item in items]
    adapter.model.eval()
    samples = adapter.sample_images(contexts, SamplerSpec(steps=eval_cfg.sample_steps), n=eval_cfg.images_per_prompt,
                                    seed=seed).images
    load = ImageLoader(adapter.image_size)  # the references as the model sees its training images
    rows = []
    n = eval_cfg.images_per_prompt
    for i, item in enumerate(items):
        ref = images.get(item.image_id) if item.image_id else None
        ref_tensor = load(ref.path) if ref is not None else None
        rows.append([ref_tensor, *samples[i * n : (i + 1) * n]])
    return save_image_grid(rows, path, row_labels=[item.instruction for item in items],
                           col_labels=["reference", *(f"sample {k + 1}" for k in range(n))])


def _save_checkpoint(adapter: Backbone, cfg, ckpt: Path, redacted: dict) -> Path:
    """Full mode: the whole backbone. LoRA modes: the PEFT adapter (the base was saved before)."""
    from omegaconf import OmegaConf

    ckpt.mkdir(parents=True, exist_ok=True)
    if cfg.finetune.mode == "full":
        adapter.save_pretrained(ckpt / "backbone")
    else:
        save_adapter(adapter.model, ckpt / "adapter")
    text = OmegaConf.to_yaml(OmegaConf.create(redacted))  # never a secret in a saved recipe
    def write_recipe(path: Path) -> None:
        path.write_text(text)

    atomic_write(ckpt / "recipe.yaml", write_recipe)
    write_folder_manifest(ckpt, ("backbone", "adapter", "recipe.yaml"))  # checked by every reader (load_checkpoint)
    return ckpt


def _build_backbone(cfg: Any, card: Any, character, ckpt_dir: Path) -> Backbone:
    """The card's backbone, or the one saved by an earlier run (`init_from`), made trainable per `finetune`."""
    adapter_cls = BACKBONES.get(card.adapter, where="backbone card `adapter`")
    if cfg.init_from:  # the earlier run's backbone, its LoRA adapter merged in (as `cmrp eval` loads it)

        source = _checkpoint_dir(Path(cfg.init_from).expanduser())
        adapter = load_checkpoint(source, load_recipe_of(source) if (source / "recipe.yaml").is_file() else None)
    else:
        adapter = adapter_cls.build(card, corpus=character_corpus(character))
    adapter.max_text_tokens = cfg.data.max_text_tokens
    shipped = str(card.get("weights") or "").startswith(SANDBOX_WEIGHTS)
    if cfg.finetune.mode != "full" and (cfg.init_from or not card.get("weights") or shipped):
        # this base exists only in this run (random init or merged), or is a few-MB shipped sandbox base:
        # keep it beside the adapter, so the run (and characters saved from it) stands on its own
        if is_main_process():
            adapter.save_pretrained(ckpt_dir / "backbone")
    apply_finetune(adapter, cfg.finetune)
    return adapter


def _checkpoint_dir(path: Path) -> Path:
    try:
        return find_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"init_from: {err}") from None


def run_sft(cfg: Any, adapter: Backbone, examples: dict[str, list], logger, out: Path,
            checkpoints: Any = None) -> dict[str, Any]:
    """Unified-SFT of `adapter` on `examples` (task -> examples, mixed by `cfg.data.tasks`) for
    `cfg.trainer.max_steps` steps: one character's examples (`cmrp fit`) or a whole world's
    (`cmrp sandbox pretrain`)."""
    import lightning as L
    from omegaconf import OmegaConf

    from cmrp.data.datamodule import TaskMixDataModule
    from cmrp.training.sft import UnifiedSFTModule

    history = _LossHistory()
    shown, progress_bar = progress_callbacks("sft", main=is_main_process())
    callbacks: list = [history.callback, *shown]
    module = UnifiedSFTModule(adapter, cfg.sft, cfg.trainer.max_steps)
    acc, start = cfg.trainer.accumulate_grad_batches, 0
    if checkpoints is not None:
        guard = module.nonfinite_guard = checkpoints.guard()
        history.losses.extend(checkpoints.extra.get("losses", []))
        checkpoints.extra["losses"] = history.losses  # saved with every checkpoint, for the loss summary
        start = checkpoints.start_batches
        callbacks.append(checkpoints.callback(
            batches_per_step=acc,
            module_state=lambda: {"nonfinite": guard.state_dict()},
            load_module_state=lambda state: guard.load_state_dict(state["nonfinite"]),
        ))
    trainer_kwargs = cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True))  # a mapping section
    # a run shorter than the logging interval would log no train metric at all
    trainer_kwargs["log_every_n_steps"] = min(trainer_kwargs["log_every_n_steps"], trainer_kwargs["max_steps"])
    trainer_kwargs["strategy"] = trainer_strategy(trainer_kwargs["strategy"], adapter)
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    world = trainer.num_devices * trainer.num_nodes  # each rank reads its shard of the drawn mix
    datamodule = TaskMixDataModule(
        examples, dict(cfg.data.tasks), adapter.collate,
        steps=cfg.trainer.max_steps * cfg.trainer.accumulate_grad_batches * world,
        batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers, skip_batches=start * world,
    )
    adapter.model.train()  # the "before" evaluation left it in eval mode
    t = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if checkpoints is not None:
        guard.finish()  # every step skipped (NaN/inf): nothing was trained, the run must not look done
    return {"examples_per_task": {k: len(v) for k, v in examples.items()}, **history.summary(),
            "sft_s": time.perf_counter() - t}


def _resume_point(cfg: Any, out: Path, fingerprint: str, flat: dict):
    if cfg.resume != "auto":
        return None
    point = find_resume_point(out / "resume")
    if point is None:
        if is_main_process():
            print(f"cmrp fit: resume: no valid checkpoint in {out / 'resume'}; starting from the beginning", flush=True)
        return None
    check_fingerprint(point, fingerprint, flat)
    if is_main_process():
        where = "after" if point.done else f"at step {point.manifest['step']} of"
        print(f"cmrp fit: resuming {where} stage {point.stage!r} from {point.path}", flush=True)
    return point


def stage_steps(cfg: Any, stage: str) -> int:
    """Steps a stage logs: SFT optimiser steps, GRPO iterations."""
    return int(cfg.trainer.max_steps if stage == "sft" else cfg.grpo.max_steps)


def stage_offset(cfg: Any, index: int) -> int:
    """The run-wide step at which stage `index` starts: the steps of the stages before it. The final
    evaluation is logged at `stage_offset(cfg, len(cfg.stages))`, after every stage."""
    return sum(stage_steps(cfg, stage) for stage in list(cfg.stages)[:index])


def _finished_run(out: Path, point: Any, fingerprint: str, n_stages: int) -> FitResult | None:
    """`--resume` of a run that already ended (its last stage done and metrics.json written by the same
    recipe): nothing is trained, evaluated or logged again."""
    if point is None or not point.done or point.stage_index != n_stages - 1:
        return None
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    run = metrics.get("mlflow") or {}
    if run.get("fingerprint") != fingerprint:
        return None
    if is_main_process():
        print(f"cmrp fit: this run already finished ({out / 'metrics.json'}); nothing to resume", flush=True)
    grid = out / "samples.png"
    return FitResult(out, run.get("tracking_uri", ""), run.get("run_id") or "", metrics,
                     grid if grid.is_file() else None, out / "checkpoint", metrics.get("timings", {}),
                     main=is_main_process(), resumed_from=point.path, experiment_id=run.get("experiment_id"))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's kill, `kill PID`) ends the run like Ctrl-C: marked KILLED, not left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_fit(cfg: Any) -> FitResult:
    """Run every stage of a loaded recipe, tracked in MLflow: the run ends FINISHED, or FAILED on an error,
    or KILLED on Ctrl-C / SIGTERM (re-raised as KeyboardInterrupt) — never left RUNNING."""
    import lightning as L
    from omegaconf import OmegaConf

    quiet_noise()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    redactor = Redactor.from_environ()  # the environment's secrets, read once for the whole run
    out = check_output_dir(cfg.output_dir, create=False).resolve()  # a file, read-only, ...: one clear error
    redacted = redactor.mapping(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)))
    fingerprint, flat = recipe_fingerprint(redacted)
    point = _resume_point(cfg, out, fingerprint, flat)
    finished = _finished_run(out, point, fingerprint, len(cfg.stages))
    if finished is not None:
        return finished
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    card, preset = resolve_recipe_parts(cfg)
    # the pass `cmrp validate` runs: this machine, then training examples per task
    character = check_run(cfg, lambda: load_run_character(cfg.data, out), fit=True).character
    ckpt_dir = out / "checkpoint"
    adapter = _build_backbone(cfg, card, character, ckpt_dir)
    trained_names = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    check_model(cfg, adapter, trained_names)
    if is_main_process():
        check_free_space(out, checkpoint_bytes(adapter.model, trained_names, cfg), "checkpoints")
    if point is not None:
        load_weights(adapter.model, point.path, trained_names)
    trainable, total = count_trainable(adapter.model)
    timings["setup_s"] = time.perf_counter() - t0

    def new_logger():
        return make_logger(cfg.tracking, out, run_name=cfg.name, redactor=redactor, resume=point is not None,
                           run_id=point.manifest.get("run_id") if point else None)

    try:
        # SIGTERM is an interrupt from before the MLflow run exists, so the run ends KILLED whenever it lands
        with _sigterm_as_interrupt(), open_tracked_run(new_logger) as logger:
            run = _Run(cfg, out, adapter, character, preset, logger, redacted, fingerprint, flat, point, timings, t0)
            metrics, grid, ckpt = run.stages(trained_names, ckpt_dir, trainable, total)
    except SystemExit:  # Lightning's own exit after a Ctrl-C inside a stage (its graceful shutdown)
        raise KeyboardInterrupt from None
    if not is_main_process():  # other ranks trained in step with rank 0; it alone writes and reports
        return FitResult(out, "", "", metrics, None, ckpt, timings, main=False)
    return FitResult(out, logger.display_uri, logger.run_id or "", metrics, grid, ckpt, timings,
                     tracking_pending=logger.pending if logger.offline else None,
                     resumed_from=point.path if point is not None else None, experiment_id=logger.experiment_id)


def _distributed_summary(cfg: Any, digests: list[str], main: bool) -> dict[str, Any]:
    """World size, strategy and each rank's weights digest (metrics.json); a warning when ranks disagree."""
    same = len(set(digests)) == 1
    if not same and main:
        print(f"cmrp fit: warning: the ranks ended with different weights (sha256 per rank: {digests}); "
              "the checkpoint holds rank 0's", flush=True)
    return {"world_size": len(digests), "num_nodes": int(cfg.trainer.num_nodes), "strategy": str(cfg.trainer.strategy),
            "weights_sha256": digests, "ranks_agree": same}


class _Run:
    """The stages of one `cmrp fit` after setup: what run_fit does inside its tracked run."""

    def __init__(self, cfg, out, adapter: Backbone, character, preset, logger, redacted, fingerprint, flat, point,
                 timings, t0):
        self.cfg, self.out, self.adapter, self.character, self.preset = cfg, out, adapter, character, preset
        self.logger, self.redacted, self.fingerprint, self.flat = logger, redacted, fingerprint, flat
        self.point, self.timings, self.t0 = point, timings, t0

    def stages(self, trained_names: list[str], ckpt_dir: Path, trainable: int, total: int):
        from omegaconf import OmegaConf

        from cmrp.training.sharding import gathered, rank_digests, whole_parameters

        cfg, out, adapter, character, logger, point = (self.cfg, self.out, self.adapter, self.character,
                                                        self.logger, self.point)
        timings = self.timings
        main = is_main_process()
        if point is None:  # a resumed run logged these already (MLflow params cannot change)
            logger.log_hyperparams(flatten(self.redacted))
            if main:
                recipe_file = out / "recipe.yaml"
                recipe_file.write_text(OmegaConf.to_yaml(OmegaConf.create(self.redacted)))
                logger.log_artifact(recipe_file)

        t = time.perf_counter()
        before = point.manifest["before"] if point is not None else stage_numbers(adapter, character, cfg)
        timings["eval_before_s"] = time.perf_counter() - t
        logger.step_offset = 0
        logger.log_metrics({f"eval/before/{k}": v for k, v in before.items()}, step=0)

        checkpointer = Checkpointer(
            out / "resume", adapter.model, trained_names, every=cfg.checkpoint.every_n_steps, keep=cfg.checkpoint.keep,
            max_nonfinite=cfg.nonfinite_stop_after, main=main,
            base_manifest={"run_id": logger.run_id, "fingerprint": self.fingerprint, "recipe": self.flat,
                           "before": before},
        )
        if point is not None:
            checkpointer.results = dict(point.manifest["results"])
            if point.done:  # the next stage starts where the finished one left every random generator
                restore_rng(rank_rng(point.state()))

        stages: dict[str, dict[str, Any]] = {}
        for index, stage in enumerate(cfg.stages):
            if point is not None and (index < point.stage_index or (index == point.stage_index and point.done)):
                stages[stage] = dict(point.manifest["results"][stage])  # finished before the interruption
                continue
            checkpoints = checkpointer.stage(stage, index, point)
            logger.step_offset = stage_offset(cfg, index)  # this stage's steps continue the run's
            if stage == "sft":
                examples = build_examples(character, [k for k, w in cfg.data.tasks.items() if w > 0],
                                          decoding=cfg.decoding)
                stages["sft"] = run_sft(cfg, adapter, examples, logger, out, checkpoints)
                timings["sft_s"] = stages["sft"].pop("sft_s")
            elif stage == "grpo":
                stages["grpo"] = run_grpo_stage(cfg, adapter, character, self.preset, logger, out,
                                                checkpoints=checkpoints)
                timings["grpo_s"] = stages["grpo"].pop("grpo_s")
                self._log_heldout_reward(stages["grpo"], index)
            checkpointer.write_done(stage, index, stages[stage])

        t = time.perf_counter()
        with gathered(adapter.model):  # a sharded model's weights whole on every rank (fsdp)
            after = stage_numbers(adapter, character, cfg)
            grid = _sample_grid(adapter, character, cfg.eval, cfg.seed, out / "samples.png") if main else None
        timings["eval_after_s"] = time.perf_counter() - t
        digests = rank_digests(adapter.model, trained_names)  # what every rank ended with
        with whole_parameters(adapter.model):  # rank 0 saves the layout a single process saves
            ckpt = _save_checkpoint(adapter, cfg, ckpt_dir, self.redacted) if main else ckpt_dir
        timings["total_s"] = time.perf_counter() - self.t0

        metrics = {
            "character": character.name,
            "trainable_params": trainable,
            "total_params": total,
            "before": before,
            "after": after,
            **stages.get("sft", {}),
            **({"grpo": stages["grpo"]} if "grpo" in stages else {}),
            "timings": timings,
            "mlflow": {"run_id": logger.run_id, "experiment_id": logger.experiment_id,
                       "tracking_uri": logger.display_uri, "fingerprint": self.fingerprint},
        }
        if len(digests) > 1:
            metrics["distributed"] = _distributed_summary(cfg, digests, main)
        if not main:
            return metrics, None, ckpt
        logger.step_offset = 0
        logger.log_metrics({f"eval/after/{k}": v for k, v in after.items()}, step=stage_offset(cfg, len(cfg.stages)))
        metrics_file = out / "metrics.json"
        write_json(metrics_file, metrics)
        logger.log_artifact(metrics_file)
        if grid is not None:
            logger.log_artifact(grid)
        return metrics, grid, ckpt

    def _log_heldout_reward(self, grpo: dict[str, Any], index: int) -> None:
        """The reward of held-out prompts measured before and after GRPO, as `val/reward/<term>` at the
        stage's first and last step (a two-point curve beside the per-iteration `reward/<term>`)."""
        start = stage_offset(self.cfg, index)
        self.logger.step_offset = 0
        for step, key in ((start, "heldout_reward_before"), (start + stage_steps(self.cfg, "grpo"), "heldout_reward_after")):
            self.logger.log_metrics({f"val/reward/{term}": v for term, v in grpo[key].items()}, step=step)
