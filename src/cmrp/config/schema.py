"""The structured schema of a recipe, a backbone card and a reward preset.

Every key a recipe may hold is declared here with its type and default; the loader
(`cmrp.config.loader`) merges YAML files onto these dataclasses through omegaconf, so an unknown
key or a wrong type is caught before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BackboneCard",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "GRPOConfig",
    "OptimizerConfig",
    "Recipe",
    "RewardPreset",
    "RewardTerm",
    "SFTConfig",
    "TrackingConfig",
    "TrainerConfig",
    "WorldConfig",
]


@dataclass
class FinetuneConfig:
    """How the backbone is adapted: LoRA / QLoRA adapters, or every weight (`full`)."""

    mode: str = "lora"  # lora | qlora | full
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: Any = "default"  # a name from the card's lora_targets, or a list of module-name patterns
    gradient_checkpointing: bool | None = None  # recompute each decoder layer in backward; null: the card's


@dataclass
class DataConfig:
    """Where the character comes from and how its tasks are mixed."""

    path: str = "sandbox://0"  # a character directory, or sandbox://SEED to generate one
    format: str = "auto"  # auto | a registered data format (cmrp.registry.FORMATS): native, rolescape20, mmrole, plugins
    character: str | None = None  # which character, for multi-character layouts
    tasks: dict[str, float] = field(
        default_factory=lambda: {"chat": 1.0, "thinking": 1.0, "t2i": 1.0, "vqa": 1.0, "knowledge_qa": 1.0}
    )
    batch_size: int = 8
    num_workers: int = 0
    max_text_tokens: int = 128


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    scheduler: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0


@dataclass
class SFTConfig:
    """Unified-SFT: loss = ce_weight * CE(text) + mse_weight * flow-MSE(image)."""

    ce_weight: float = 1.0
    mse_weight: float = 1.0
    timestep_shift: float = 1.0  # shift of the logit-normal training timesteps (BAGEL's timestep_shift)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class GRPOConfig:
    """Character-GRPO of the image branch (stage `grpo`). Defaults suit the CPU sandbox; the paper's
    settings are in recipes/bagel/grpo.yaml."""

    max_steps: int = 20  # rollout -> reward -> update iterations
    prompts_per_step: int = 2  # prompts sampled per iteration (per rank); each gets a group of G
    group_size: int = 8  # G: samples per prompt
    sample_steps: int = 10  # Euler steps of a rollout
    noise_level: float = 0.7  # eta of the SDE steps (0: ODE, no log-prob)
    sde: str = "sde"  # sde (Flow-GRPO) | cps (coefficients-preserving)
    window_size: int = 2  # SDE (trained) steps per rollout; >= sample_steps: every step
    window_range: list[float] = field(default_factory=lambda: [0.0, 0.5])  # where the window may start
    same_noise: bool = False  # a group's samples start from the same initial noise
    cfg_scale: float = 1.0  # text guidance scale (context before its last text segment; 1: no guidance; paper: 4)
    cfg_img_scale: float = 1.0  # image guidance on top (context without its input images; 1: none; needs cfg_scale > 1)
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guidance for t in (lo, hi]
    cfg_renorm_type: str = "global"  # global | channel | text_channel | none (BAGEL's CFG renorm)
    cfg_renorm_min: float = 0.0  # lower clamp of the renorm factor (1: no renorm)
    timestep_shift: float | None = None  # null: the backbone card's
    inner_epochs: int = 1  # mu: passes over the rollout's transitions per iteration
    minibatch_size: int = 8  # samples per forward/backward
    accumulate: int = 1  # minibatches per optimiser step
    clip_range: float = 1e-4  # PPO ratio clip
    adv_std: str = "group"  # group | global: which std normalises advantages
    adv_eps: float = 1e-4
    adv_clip: float = 5.0
    kl_beta: float = 0.0  # KL to the reference policy: the trained weights as GRPO started (LoRA too)
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA; else the trained weights end as their EMA
    train_groups: list[str] = field(default_factory=lambda: ["generation"])  # [] = every trainable weight
    reward_workers: int = 2  # reward threads, overlapping with sampling
    # the objective measured before and after GRPO on the test split: ODE samples, fixed seeds
    heldout_prompts: int | None = None  # held-out image prompts (null: eval.grid_prompts; more than exist: all)
    heldout_images: int | None = None  # samples per held-out prompt (null: eval.images_per_prompt, at least 2)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4))


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer` (names match its arguments)."""

    max_steps: int = 100
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 5
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1


@dataclass
class TrackingConfig:
    """MLflow. `tracking_uri: null` means an embedded sqlite database in the output directory."""

    tracking_uri: str | None = None
    experiment: str = "cmrp"
    run_name: str | None = None


@dataclass
class CheckpointConfig:
    """Resume checkpoints in <output_dir>/resume (weights, optimiser, scheduler, RNG, data position, GRPO
    state), written atomically; `cmrp fit --resume` (or `resume: auto`) continues the latest valid one."""

    every_n_steps: int = 50  # SFT optimiser steps / GRPO iterations between checkpoints; 0: none at all
    keep: int = 2  # newest valid checkpoints kept (older ones are deleted)


@dataclass
class EvalConfig:
    """The small evaluation done at the end of `cmrp fit` (before vs after)."""

    grid_prompts: int = 8  # T2I prompts in the sample grid
    images_per_prompt: int = 2
    sample_steps: int = 20
    max_items: int = 200  # cap on held-out MCQ items scored per task


@dataclass
class WorldConfig:
    """The sandbox world `cmrp sandbox pretrain` trains a base model on (`cmrp fit` ignores it):
    characters `first_seed .. first_seed + characters - 1`, each with its train split; the next
    `heldout_characters` seeds are never trained on and measure what the base can and cannot do."""

    first_seed: int = 1000
    characters: int = 200
    reference_images: int = 16  # rendered images per character (1..60)
    scenes: int = 40  # dialogue scenes per character
    heldout_characters: int = 3


@dataclass
class Recipe:
    """One experiment: backbone card x reward preset x training method."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs/${name}"
    backbone: Any = "bagel-tiny"  # card name, card path, or an inline mapping
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rewards: Any = None  # preset name, preset path, or an inline mapping (used by GRPO)
    decoding: str = "chain"  # chain | joint | think (chain, plus the character's thinking before the image)
    stages: list[str] = field(default_factory=lambda: ["sft"])
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    init_from: str | None = None  # a `cmrp fit` output or checkpoint dir to start from (e.g. GRPO after SFT)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: str = "never"  # never | auto: continue the latest valid checkpoint in <output_dir>/resume
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite_stop_after: int = 10  # stop after this many steps in a row with NaN/inf loss or gradients (0: never)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class BackboneCard:
    """A backbone card (backbones/*.yaml): which adapter, which weights, which architecture."""

    name: str = "???"
    adapter: str = "???"  # registry name of the adapter, e.g. "bagel"
    weights: str | None = None  # hub id, local path or sandbox://base (shipped); null = random init from `architecture`
    tokenizer: str | None = None  # tokenizer name/path; adapter-specific default when null
    image_head: str = "flow"  # flow | tokens
    capabilities: list[str] = field(default_factory=lambda: ["text", "image_understanding", "image_generation"])
    architecture: dict[str, Any] = field(default_factory=dict)
    lora_targets: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""


@dataclass
class RewardTerm:
    """One weighted term of a reward preset; `kwargs` go to the registered reward's constructor."""

    # "???" is omegaconf's marker for a required value: every term must state its weight
    weight: float = "???"  # type: ignore[assignment]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardPreset:
    """A reward preset (rewards/*.yaml): registered reward names mapped to weights and kwargs."""

    name: str = "???"
    description: str = ""
    terms: dict[str, RewardTerm] = field(default_factory=dict)
