"""The `grpo` stage of `cmrp fit`: prompts, reward composite and trainer around CharacterGRPOModule."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, cast

import torch

from cmrp.backbones.protocol import Backbone
from cmrp.data.character import Character
from cmrp.data.images import load_images
from cmrp.data.tasks import ImagePrompt, image_prompts
from cmrp.errors import DataError
from cmrp.rewards import RewardContext, VQAQuestion, build_reward
from cmrp.sampling.spec import SamplerSpec, recipe_sampling_settings
from cmrp.training.advantages import nan_mean
from cmrp.training.progress import progress_callbacks
from cmrp.training.trainer import is_main_process, trainer_strategy

__all__ = ["character_questions", "heldout_reward", "heldout_size", "reference_tensor", "run_grpo_stage"]


def character_questions(character: Character, split: str = "train"):
    """`ImagePrompt -> [VQAQuestion]`: the VQA items of the prompt's target image (MCQ and open), which a
    faithful generated image should answer the same way."""
    data = character.train if split == "train" else character.test
    by_image: dict[str, list] = {}
    for item in data.vqa:
        questions = [VQAQuestion(m.question, m.options[m.answer], list(m.options), m.answer) for m in item.mcq]
        questions += [VQAQuestion(q.question, q.answer) for q in item.open]
        by_image.setdefault(item.image_id, []).extend(questions)

    def questions_for(prompt: ImagePrompt) -> list:
        return list(by_image.get(prompt.image_id, [])) if prompt.image_id else []

    return questions_for


def reference_tensor(character: Character, size: int = 64) -> torch.Tensor | None:
    """The character's reference images as one [R, 3, size, size] tensor in [0, 1] (None without any)."""
    refs = character.reference_images
    return load_images(refs, (size, size)) if refs else None


@torch.no_grad()
def heldout_reward(adapter: Backbone, reward, prompts: list[ImagePrompt], questions_for, references, *, n: int,
                   spec: SamplerSpec, seed: int) -> dict[str, float]:
    """Mean reward (and per-term means) of ODE samples for held-out prompts: the GRPO objective
    measured where it was not trained."""
    if not prompts:
        return {}
    adapter.model.eval()
    rollout = adapter.sample_images([p.context for p in prompts], spec, n=n, seed=seed)
    context = RewardContext(
        reference_images=references, questions=[questions_for(p) for p in prompts for _ in range(n)],
        backbone=adapter, metadata=[{"image_id": p.image_id} for p in prompts for _ in range(n)],
    )
    out = reward(rollout.images, [p.prompt for p in prompts for _ in range(n)], group_ids=rollout.group_ids,
                 context=context)
    result = {"total": nan_mean(out.scores)}
    for name, info in out.info.items():
        if isinstance(info, dict) and isinstance(info.get("scores"), torch.Tensor):
            result[name] = nan_mean(info["scores"])
    return result


def heldout_size(cfg: Any) -> tuple[int, int]:
    """(prompts, samples per prompt) the held-out objective is measured on: `grpo.heldout_prompts` /
    `grpo.heldout_images`, else the sample grid's (`eval.grid_prompts`, `eval.images_per_prompt`). At least
    two samples per prompt, since the diversity term compares a prompt's samples with each other."""
    g = cfg.grpo
    prompts = cfg.eval.grid_prompts if g.heldout_prompts is None else g.heldout_prompts
    images = cfg.eval.images_per_prompt if g.heldout_images is None else g.heldout_images
    return int(prompts), max(2, int(images))


def _prompt_loader(prompts: list[ImagePrompt], cfg: Any, seed: int, world: int = 1, start: int = 0, rank: int = 0):
    """`max_steps` batches of `prompts_per_step` prompts per rank, drawn (seeded) without repeats within an
    epoch; each rank reads its share in order (`RankBatches`). `start`: batches (per rank) already
    trained on by the run being resumed — the order is a function of the seed alone, so they are skipped."""
    from torch.utils.data import DataLoader, Dataset

    from cmrp.data.datamodule import RankBatches

    rng = random.Random(seed)
    needed = cfg.max_steps * cfg.prompts_per_step * world
    order: list[ImagePrompt] = []
    while len(order) < needed:
        epoch = list(prompts)
        rng.shuffle(epoch)
        order += epoch
    skip = start * cfg.prompts_per_step * world
    todo = cast("Dataset[ImagePrompt]", order[skip:needed])  # a list is a map-style dataset (len, getitem)
    return DataLoader(todo, batch_size=cfg.prompts_per_step, sampler=RankBatches(todo, cfg.prompts_per_step, rank, world),
                      collate_fn=list)


def run_grpo_stage(cfg: Any, adapter: Backbone, character: Character, preset: dict, logger, out: Path,
                   reward: Any = None, checkpoints: Any = None) -> dict[str, Any]:
    """Train the image branch with Character-GRPO; returns held-out reward before/after and timings.
    `checkpoints`: a `checkpointing.StageCheckpoints` (resume state, periodic checkpoints, NaN guard)."""
    import lightning as L
    from omegaconf import OmegaConf

    from cmrp.training.grpo import CharacterGRPOModule
    from cmrp.training.sharding import gathered

    g = cfg.grpo
    prompts = image_prompts(character, split="train", decoding=cfg.decoding)
    if not prompts:
        raise DataError(f"character {character.name!r}: no image prompts (scenes with images or T2I instructions) "
                        "to train GRPO on")
    heldout_prompts, heldout_images = heldout_size(cfg)
    heldout = image_prompts(character, split="test", decoding=cfg.decoding)[:heldout_prompts]
    reward = reward if reward is not None else build_reward(preset, parallel=True)
    questions_for = character_questions(character, "train")
    heldout_questions = character_questions(character, "test")
    references = reference_tensor(character)

    # ODE samples with the rollouts' steps, guidance and timestep shift
    heldout_spec = SamplerSpec.from_settings(recipe_sampling_settings(g), steps=int(g.sample_steps), where="grpo")

    def measure() -> dict[str, float]:
        with gathered(adapter.model):  # whole weights on every rank when an earlier stage sharded them
            return heldout_reward(adapter, reward, heldout, heldout_questions, references,
                                  n=heldout_images, spec=heldout_spec, seed=cfg.seed + 1)

    resuming = checkpoints is not None and checkpoints.resuming
    before = measure()  # also loads the reward nets (lazily, drawing from the global RNG) before training
    if resuming:  # resumed mid-stage: the weights have moved, so "before" is the value measured at the start
        before = checkpoints.extra["heldout_reward_before"]
    module = CharacterGRPOModule(adapter, reward, g, questions_for=questions_for, reference_images=references,
                                 seed=cfg.seed)
    callbacks, start = [], 0
    if checkpoints is not None:
        checkpoints.extra["heldout_reward_before"] = before
        module.nonfinite_guard = checkpoints.guard()
        start = module.batch_offset = checkpoints.start_batches
        callbacks.append(checkpoints.callback(module_state=module.resume_state,
                                              load_module_state=module.load_resume_state))
    trainer_kwargs = cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True))  # a mapping section
    for key in ("max_steps", "gradient_clip_val", "accumulate_grad_batches", "log_every_n_steps"):
        trainer_kwargs.pop(key, None)
    trainer_kwargs["strategy"] = trainer_strategy(trainer_kwargs["strategy"], adapter)
    shown, progress_bar = progress_callbacks("grpo", main=is_main_process())
    trainer = L.Trainer(
        **trainer_kwargs, max_epochs=1, log_every_n_steps=1, logger=logger, enable_checkpointing=False,
        callbacks=[*callbacks, *shown],
        enable_progress_bar=progress_bar, enable_model_summary=False, default_root_dir=str(out),
    )
    world = trainer.num_devices * trainer.num_nodes  # each rank takes its own prompts: groups stay on one rank
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=_prompt_loader(prompts, g, cfg.seed, world, start, trainer.global_rank))
    if module.nonfinite_guard is not None:
        module.nonfinite_guard.finish()  # every update skipped (NaN/inf): nothing was trained
    seconds = time.perf_counter() - t
    after = measure()
    return {
        "prompts": len(prompts),
        "trained_parameters": len(module.trained_names),
        "heldout_prompts": len(heldout),  # what the held-out reward is the mean over
        "heldout_images": heldout_images,
        "heldout_reward_before": before,
        "heldout_reward_after": after,
        "last": dict(getattr(module, "last_log", {})),
        "grpo_s": seconds,
    }
