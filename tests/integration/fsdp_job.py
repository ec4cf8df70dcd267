"""SFT or GRPO on a tiny BAGEL under one strategy (CPU, gloo): run by test_fsdp.py.

    python tests/integration/fsdp_job.py OUT_DIR --strategy fsdp|ddp|single --mode full|lora --stage sft|grpo
        [--devices N]

`single` is one process that sees, per optimiser step, the same examples as N ranks together (gradient
accumulation over N micro-batches, in the ranks' order), so its weights are what N data-parallel ranks
should end with. Every rank writes OUT_DIR/rank<r>.safetensors (its trained weights, whole) and
OUT_DIR/rank<r>.json (the world size, what kind its weights were, and its GRPO history: group ids,
rewards, advantages per iteration).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BATCH = 2  # SFT examples per rank and micro-batch
STEPS = 3


def _sft_examples():
    """Chat examples of different lengths (so how examples are grouped into batches changes the loss)."""
    from cmrp.data.tasks import Example, Segment

    words = ["amber", "birch", "cobalt", "dune", "ember", "fjord", "grove", "heath", "inlet", "juniper"]
    return [Example("chat", [Segment("text", "user", f"hi {words[i]}"),
                             Segment("text", "character", "I am a tiny creature of the " + " and ".join(words[:i + 1]),
                                     train=True)])
            for i in range(10)]


def main(out: Path, strategy: str, mode: str, stage: str, devices: int) -> None:
    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.config.schema import FinetuneConfig, GRPOConfig, OptimizerConfig, SFTConfig
    from cmrp.data.datamodule import RankBatches, TaskMixDataModule
    from cmrp.data.tasks import Example, ImagePrompt, Segment
    from cmrp.rewards import build_reward
    from cmrp.training.grpo import CharacterGRPOModule
    from cmrp.training.peft import apply_finetune
    from cmrp.training.sft import UnifiedSFTModule
    from cmrp.training.sharding import whole
    from cmrp.training.trainer import trainer_strategy
    from tests.unit.test_bagel import CORPUS, small_card

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)  # identical initial weights on every rank
    adapter = BagelAdapter.build(small_card(), corpus=CORPUS)
    torch.nn.init.normal_(adapter.model.llm2vae.weight, std=0.02)  # a velocity head that depends on the weights
    apply_finetune(adapter, OmegaConf.structured(FinetuneConfig(mode=mode, r=4, alpha=8)))
    single = strategy == "single"
    start = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
    world = 1 if single else devices

    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=world, strategy="auto" if single else trainer_strategy(strategy, adapter),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **kwargs)

    if stage == "sft":  # cmrp's data path: each rank reads its RankBatches share of the drawn mix
        cfg = OmegaConf.structured(SFTConfig(optimizer=OptimizerConfig(lr=3e-3, warmup_steps=1)))
        module = UnifiedSFTModule(adapter, cfg, STEPS)
        data = TaskMixDataModule({"chat": _sft_examples()}, {"chat": 1.0}, adapter.collate, steps=STEPS * devices,
                                 batch_size=BATCH)
        tr = trainer(max_steps=STEPS, gradient_clip_val=1.0, accumulate_grad_batches=devices if single else 1)
        tr.fit(module, datamodule=data)
        history: list = []
    else:
        # 2 iterations, 2 prompts per rank, groups of 4, global-std advantages (needs the gather), KL to the
        # reference policy (LoRA: adapter off; full: start weights) and EMA of the trained weights
        cfg = OmegaConf.structured(GRPOConfig(max_steps=2, prompts_per_step=2, group_size=4, sample_steps=4,
                                              window_size=2, minibatch_size=2, adv_std="global", reward_workers=2,
                                              kl_beta=0.5, ema_decay=0.5, train_groups=[],
                                              optimizer=OptimizerConfig(lr=3e-3)))
        reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
        module = CharacterGRPOModule(adapter, reward, cfg, seed=0)
        module.keep_history = True
        texts = [f"draw the tiny creature {i}" for i in range(4 * devices)]
        prompts = [ImagePrompt(Example("t2i", [Segment("text", "user", t)]), t) for t in texts]
        tr = trainer(max_epochs=1)
        sampler = RankBatches(prompts, 2, tr.global_rank, tr.world_size)
        tr.fit(module, train_dataloaders=DataLoader(prompts, batch_size=2, sampler=sampler, collate_fn=list))
        history = module.history

    rank = tr.global_rank
    params = dict(adapter.model.named_parameters())
    kinds = sorted({type(p).__name__ for n, p in params.items() if p.requires_grad})
    trained = whole({n: p.detach() for n, p in params.items() if p.requires_grad})
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in trained.items()}, str(out / f"rank{rank}.safetensors"))
    moved = max(float((trained[n] - start[n]).abs().max()) for n in trained if n in start)
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": tr.world_size, "history": history,
                                                      "parameter_kinds": kinds, "moved": moved}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", choices=["fsdp", "ddp", "single"], required=True)
    parser.add_argument("--mode", choices=["full", "lora"], required=True)
    parser.add_argument("--stage", choices=["sft", "grpo"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    a = parser.parse_args()
    main(a.out, a.strategy, a.mode, a.stage, a.devices)
