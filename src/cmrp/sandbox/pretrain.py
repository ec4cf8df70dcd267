"""`cmrp sandbox pretrain`: the sandbox's pretrained base model.

UniCharacter customizes a *pretrained* unified model from about ten images. The sandbox mirrors
that: a BAGEL-architecture model is first trained on the sandbox world in general — many random
characters, their dialogues, knowledge QA, VQA on their pictures and text-to-image from both plain
descriptions ("a red round creature with dot eyes and a blue hat, happy, on the beach, in the
center") and name prompts ("Moki, happy, on the beach, in the center"). It learns to talk, to answer
questions about pictures and to draw what it is told; it cannot know an unseen character's facts or
what that character's name looks like. The quickstart then customizes it to such a character.

The base is written in cmrp's own backbone layout (config.json, model.safetensors, tokenizer.json)
with a `manifest.json`: the recipe, seed, git commit, timings and what the base scores on characters
it never saw. The package ships one (`weights: sandbox://base`, card `bagel-sandbox`).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from cmrp.config import flatten, redact_secrets, resolve_recipe_parts
from cmrp.data.native import read_character
from cmrp.data.tasks import TASKS, Example, Segment, build_examples, character_corpus, image_prompts
from cmrp.errors import ConfigError
from cmrp.evaluation.mcq import knowledge_mcq_accuracy, vqa_mcq_accuracy
from cmrp.jsonio import write_json
from cmrp.progress import track
from cmrp.registry import BACKBONES
from cmrp.resources import git_commit
from cmrp.sampling.spec import SamplerSpec
from cmrp.sandbox.writer import write_sandbox_character
from cmrp.tracking import make_logger, open_tracked_run

__all__ = ["BASE_MANIFEST", "heldout_numbers", "pretrain", "world_examples"]

BASE_MANIFEST = "manifest.json"


def _world_character(seed: int, world: Any, root: Path):
    """World character `seed`, generated into `root/<seed>` on first use (a rerun reuses it)."""
    folder = root / str(seed)
    if not (folder / "character.json").is_file():
        write_sandbox_character(seed, folder, n_reference_images=world.reference_images, n_scenes=world.scenes)
    return read_character(folder)


def world_examples(world: Any, root: Path, decoding: str) -> tuple[dict[str, list], list[str]]:
    """The train examples of every world character (generated into `root/<seed>`), task -> examples,
    and their texts (the tokenizer's corpus). Text-to-image gets each reference image twice: under
    its name prompt and under its plain description, so the base learns to draw what words say."""
    examples: dict[str, list] = {task: [] for task in TASKS}
    corpus: list[str] = []
    for seed in track(range(world.first_seed, world.first_seed + world.characters), "world characters"):
        character = _world_character(seed, world, root)
        for task, items in build_examples(character, decoding=decoding).items():
            examples[task] += items
        examples["t2i"] += [
            Example("t2i", [Segment("text", "user", image.caption),
                            Segment("image", "character", image=image.path, generate=True, train=True)])
            for image in character.train.images.values()
        ]
        corpus += character_corpus(character)
    return examples, corpus


def heldout_numbers(adapter: Any, characters: list, eval_cfg: Any, seed: int) -> dict[str, float]:
    """What a base does on characters it never saw, averaged over `characters`: knowledge and VQA
    multiple choice; identity fidelity of images drawn from the character's own (name) prompts; and
    identity fidelity and prompt faithfulness when the prompt describes the character in words."""
    from cmrp.evaluation.oracle import image_oracle_numbers, prompt_attributes

    adapter.model.eval()
    rows: list[dict[str, float]] = []
    for i, character in enumerate(characters):
        prompts = image_prompts(character, split="test")
        images = {**character.train.images, **character.test.images}
        attrs = [prompt_attributes(p.prompt, images.get(p.image_id)) for p in prompts]
        n, spec = eval_cfg.images_per_prompt, SamplerSpec(steps=eval_cfg.sample_steps)
        named = adapter.sample_images([p.context for p in prompts], spec, n=n, seed=seed + 1000 * i).images
        described = adapter.sample_images([Example("t2i", [Segment("text", "user", p.prompt)]) for p in prompts],
                                          spec, n=n, seed=seed + 1000 * i + 1).images
        repeated = [a for a in attrs for _ in range(n)]
        by_name = image_oracle_numbers(character, named, repeated)
        by_words = image_oracle_numbers(character, described, repeated)
        rows.append({
            "knowledge_mcq_acc": knowledge_mcq_accuracy(adapter, character, "test", eval_cfg.max_items),
            "vqa_mcq_acc": vqa_mcq_accuracy(adapter, character, "test", eval_cfg.max_items),
            "identity_fidelity_name_prompt": by_name["identity_fidelity"],
            "identity_fidelity_described": by_words["identity_fidelity"],
            "prompt_faithfulness_described": by_words["prompt_faithfulness"],
        })
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def pretrain(cfg: Any, out: Path) -> dict[str, Any]:
    """Train the base of recipe `cfg` (its `world`, `data.tasks`, `sft` and `trainer` sections) and write
    it into `out` with its manifest; returns the manifest."""
    import lightning as L
    from omegaconf import OmegaConf

    from cmrp.training.peft import apply_finetune

    world = cfg.world
    if world.characters < 1 or world.heldout_characters < 1:
        raise ConfigError("world.characters and world.heldout_characters must be at least 1")
    if cfg.finetune.mode != "full":
        raise ConfigError(f"finetune.mode={cfg.finetune.mode!r}: a base is pretrained in full (finetune.mode=full)")
    if cfg.stages != ["sft"]:
        raise ConfigError(f"stages={list(cfg.stages)}: pretraining is one SFT stage over the world (stages: [sft])")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    card, _ = resolve_recipe_parts(cfg)
    if card.get("weights"):
        raise ConfigError(f"backbone {card.get('name')!r} loads weights; pretraining starts from a random-init card "
                          "(e.g. backbone: bagel-tiny)")

    examples, corpus = world_examples(world, run_dir / "world", cfg.decoding)
    first_heldout = world.first_seed + world.characters
    heldout = [_world_character(seed, world, run_dir / "world")
               for seed in range(first_heldout, first_heldout + world.heldout_characters)]
    timings["world_s"] = time.perf_counter() - t0

    adapter = BACKBONES.get(card.adapter, where="backbone card `adapter`").build(card, corpus=corpus)
    adapter.max_text_tokens = cfg.data.max_text_tokens
    apply_finetune(adapter, cfg.finetune)
    redacted = redact_secrets(OmegaConf.to_container(cfg, resolve=True))
    # FINISHED, or FAILED / KILLED: never left RUNNING
    with open_tracked_run(lambda: make_logger(cfg.tracking, run_dir, run_name=cfg.name, kind="pretrain")) as logger:
        return _pretrain_tracked(cfg, out, adapter, logger, redacted, examples, heldout, world, first_heldout,
                                 timings, t0)


def _pretrain_tracked(cfg, out, adapter, logger, redacted, examples, heldout, world, first_heldout, timings, t0):
    import torch

    from cmrp.training.fit import run_sft

    run_dir = Path(cfg.output_dir).expanduser().resolve()
    logger.log_hyperparams(flatten(redacted))

    t = time.perf_counter()
    before = heldout_numbers(adapter, heldout, cfg.eval, cfg.seed)
    timings["eval_before_s"] = time.perf_counter() - t
    sft = run_sft(cfg, adapter, examples, logger, run_dir)
    timings["sft_s"] = sft.pop("sft_s")
    t = time.perf_counter()
    after = heldout_numbers(adapter, heldout, cfg.eval, cfg.seed)
    timings["eval_after_s"] = time.perf_counter() - t

    adapter.save_pretrained(out)
    timings["total_s"] = time.perf_counter() - t0
    manifest = {
        "what": "cmrp sandbox base: a BAGEL-architecture model pretrained on the sandbox world (cmrp sandbox pretrain)",
        "recipe": redacted,
        "seed": cfg.seed,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "world": {"train_seeds": [world.first_seed, first_heldout - 1],
                  "heldout_seeds": [first_heldout, first_heldout + world.heldout_characters - 1],
                  "examples_per_task": sft.pop("examples_per_task")},
        "training": sft,
        "heldout": {"untrained": before, "pretrained": after},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(out / BASE_MANIFEST, manifest, ensure_ascii=True)
    logger.log_metrics({f"eval/before/{k}": v for k, v in before.items()}, step=0)  # held-out world characters
    logger.log_metrics({f"eval/after/{k}": v for k, v in after.items()}, step=int(cfg.trainer.max_steps))
    logger.log_artifact(out / BASE_MANIFEST)
    return manifest
