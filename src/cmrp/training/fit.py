"""`cmrp fit`: from a recipe to a tracked, evaluated, checkpointed run.

Order: character -> backbone (card) -> fine-tuning mode -> "before" metrics -> stages -> "after"
metrics, sample grid, checkpoint, metrics.json — each logged to MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrp.errors import ConfigError

__all__ = ["FitResult", "load_run_character", "run_fit"]

@dataclass
class FitResult:
    output_dir: Path
    tracking_uri: str
    run_id: str
    metrics: dict[str, Any]
    grid_path: Path | None
    checkpoint_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


def load_run_character(data_cfg: Any, output_dir: Path):
    """The recipe's character; in a distributed run only rank 0 writes a generated one."""
    from cmrp.data.sources import load_recipe_character

    return load_recipe_character(data_cfg, output_dir, may_write=is_main_process())


def is_main_process() -> bool:
    """Rank 0 of a distributed run (or the only process): the one that writes files and prints."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def trainer_strategy(name: str):
    """`ddp` with unused-parameter detection: a task mix leaves an expert (ViT, generation) idle in some
    batches, which plain DDP rejects. Other names go to Lightning as they are."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    return name


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


def _evaluate(adapter, character, eval_cfg) -> dict[str, float]:
    from cmrp.evaluation.mcq import knowledge_mcq_accuracy, vqa_mcq_accuracy

    adapter.model.eval()
    return {
        "knowledge_mcq_acc": knowledge_mcq_accuracy(adapter, character, "test", eval_cfg.max_items),
        "vqa_mcq_acc": vqa_mcq_accuracy(adapter, character, "test", eval_cfg.max_items),
    }


def _sample_grid(adapter, character, eval_cfg, seed: int, path: Path) -> Path | None:
    from cmrp.data.tasks import Example, Segment
    from cmrp.evaluation.grid import save_image_grid

    items = (character.test.t2i or character.train.t2i)[: eval_cfg.grid_prompts]
    if not items:
        return None
    images = {**character.train.images, **character.test.images}
    contexts = [Example("t2i", [Segment("text", "user", item.instruction)]) for item in items]
    adapter.model.eval()
    samples = adapter.sample_images(contexts, n=eval_cfg.images_per_prompt, steps=eval_cfg.sample_steps, seed=seed).images
    rows = []
    for i, item in enumerate(items):
        ref = images.get(item.image_id) if item.image_id else None
        ref_tensor = adapter._load_image(ref.path) if ref is not None else None  # noqa: SLF001 - same resize as training
        n = eval_cfg.images_per_prompt
        rows.append([ref_tensor, *samples[i * n : (i + 1) * n]])
    return save_image_grid(rows, path)


def _save_checkpoint(adapter, cfg, ckpt: Path) -> Path:
    """Full mode: the whole backbone. LoRA modes: the PEFT adapter (the base was saved before)."""
    from omegaconf import OmegaConf

    from cmrp.training.peft import save_adapter

    ckpt.mkdir(parents=True, exist_ok=True)
    if cfg.finetune.mode == "full":
        adapter.save_pretrained(ckpt / "backbone")
    else:
        save_adapter(adapter.model, ckpt / "adapter")
    (ckpt / "recipe.yaml").write_text(OmegaConf.to_yaml(cfg))
    return ckpt


def _build_backbone(cfg: Any, card: Any, character, ckpt_dir: Path):
    """The card's backbone, or the one saved by an earlier run (`init_from`), made trainable per `finetune`."""
    from cmrp.backbones.loading import merge_saved_adapter
    from cmrp.data.tasks import character_corpus
    from cmrp.registry import BACKBONES
    from cmrp.training.peft import apply_finetune

    adapter_cls = BACKBONES.get(card.adapter, where="backbone card `adapter`")
    if cfg.init_from:
        source = _checkpoint_dir(Path(cfg.init_from).expanduser())
        adapter = adapter_cls.from_pretrained(source / "backbone")
        if (source / "adapter").is_dir():
            merge_saved_adapter(adapter, source / "adapter")
    else:
        adapter = adapter_cls.build(card, corpus=character_corpus(character))
    adapter.max_text_tokens = cfg.data.max_text_tokens
    if cfg.finetune.mode != "full" and (cfg.init_from or not card.get("weights")):
        # this base exists only in this run (random init or merged): keep it beside the adapter
        if is_main_process():
            adapter.save_pretrained(ckpt_dir / "backbone")
    apply_finetune(adapter, cfg.finetune)
    return adapter


def _checkpoint_dir(path: Path) -> Path:
    from cmrp.backbones.loading import find_checkpoint

    try:
        return find_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"init_from: {err}") from None


def _run_sft(cfg: Any, adapter, character, logger, out: Path) -> dict[str, Any]:
    import lightning as L
    from omegaconf import OmegaConf

    from cmrp.data.datamodule import TaskMixDataModule
    from cmrp.data.tasks import build_examples
    from cmrp.training.sft import UnifiedSFTModule

    history = _LossHistory()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # a run shorter than the logging interval would log no train metric at all
    trainer_kwargs["log_every_n_steps"] = min(trainer_kwargs["log_every_n_steps"], trainer_kwargs["max_steps"])
    trainer_kwargs["strategy"] = trainer_strategy(trainer_kwargs["strategy"])
    trainer = L.Trainer(
        **trainer_kwargs,
        logger=logger,
        callbacks=[history.callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    examples = build_examples(character, [k for k, w in cfg.data.tasks.items() if w > 0], decoding=cfg.decoding)
    world = trainer.num_devices * trainer.num_nodes  # each rank reads its shard of the drawn mix
    datamodule = TaskMixDataModule(
        examples, dict(cfg.data.tasks), adapter.collate,
        steps=cfg.trainer.max_steps * cfg.trainer.accumulate_grad_batches * world,
        batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
    )
    module = UnifiedSFTModule(adapter, cfg.sft, cfg.trainer.max_steps)
    adapter.model.train()  # the "before" evaluation left it in eval mode
    t = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return {"examples_per_task": {k: len(v) for k, v in examples.items()}, **history.summary(),
            "sft_s": time.perf_counter() - t}


def run_fit(cfg: Any) -> FitResult:
    """Run every stage of a loaded recipe. Prints where the run, grid and checkpoint are."""
    import lightning as L
    from omegaconf import OmegaConf

    from cmrp.config import flatten, redact_secrets, resolve_recipe_parts
    from cmrp.tracking import make_logger
    from cmrp.training.peft import count_trainable

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    card, preset = resolve_recipe_parts(cfg)
    character = load_run_character(cfg.data, out)
    ckpt_dir = out / "checkpoint"
    adapter = _build_backbone(cfg, card, character, ckpt_dir)
    trainable, total = count_trainable(adapter.model)
    timings["setup_s"] = time.perf_counter() - t0

    logger = make_logger(cfg.tracking, out, run_name=cfg.name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger.log_hyperparams(flatten(redact_secrets(resolved)))
    main = is_main_process()
    if main:
        recipe_file = out / "recipe.yaml"
        recipe_file.write_text(OmegaConf.to_yaml(OmegaConf.create(redact_secrets(resolved))))
        logger.experiment.log_artifact(logger.run_id, str(recipe_file))

    t = time.perf_counter()
    before = _evaluate(adapter, character, cfg.eval)
    timings["eval_before_s"] = time.perf_counter() - t

    stages: dict[str, dict[str, Any]] = {}
    for stage in cfg.stages:
        if stage == "sft":
            stages["sft"] = _run_sft(cfg, adapter, character, logger, out)
            timings["sft_s"] = stages["sft"].pop("sft_s")
        elif stage == "grpo":
            from cmrp.training.grpo_stage import run_grpo_stage

            stages["grpo"] = run_grpo_stage(cfg, adapter, character, preset, logger, out)
            timings["grpo_s"] = stages["grpo"].pop("grpo_s")

    t = time.perf_counter()
    after = _evaluate(adapter, character, cfg.eval)
    grid = _sample_grid(adapter, character, cfg.eval, cfg.seed, out / "samples.png") if main else None
    timings["eval_after_s"] = time.perf_counter() - t
    ckpt = _save_checkpoint(adapter, cfg, ckpt_dir) if main else ckpt_dir
    timings["total_s"] = time.perf_counter() - t0

    metrics = {
        "character": character.name,
        "trainable_params": trainable,
        "total_params": total,
        "before": before,
        "after": after,
        **stages.get("sft", {}),
        **({"grpo": stages["grpo"]} if "grpo" in stages else {}),
        "timings": timings,
    }
    if not main:  # other ranks trained in step with rank 0; it alone writes and reports
        return FitResult(out, "", "", metrics, None, ckpt, timings)
    metrics_file = out / "metrics.json"
    metrics_file.write_text(json.dumps(metrics, indent=2))
    client, run_id = logger.experiment, logger.run_id
    final = {**{f"eval/before/{k}": v for k, v in before.items()}, **{f"eval/after/{k}": v for k, v in after.items()}}
    if "grpo" in stages:
        for when in ("before", "after"):
            for term, value in stages["grpo"][f"heldout_reward_{when}"].items():
                final[f"eval/grpo_{when}/reward_{term}"] = value
    for key, value in final.items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(metrics_file))
    if grid is not None:
        client.log_artifact(run_id, str(grid))
    logger.finalize("success")
    return FitResult(out, logger._tracking_uri, run_id, metrics, grid, ckpt, timings)  # noqa: SLF001
