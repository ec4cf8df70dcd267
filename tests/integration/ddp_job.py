"""SFT then GRPO on a tiny BAGEL under Lightning's DDP strategy (CPU, gloo): run by test_ddp.py.

    python tests/integration/ddp_job.py OUT_DIR DEVICES

Every rank writes OUT_DIR/rank<r>.safetensors (its final weights) and OUT_DIR/rank<r>.json (its GRPO
history: group ids, rewards, advantages per iteration), so the test can compare ranks with each other
and with a single-process computation.
"""

from __future__ import annotations

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


def main(out: Path, devices: int) -> None:
    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.config.schema import GRPOConfig, OptimizerConfig, SFTConfig
    from cmrp.data.datamodule import TaskMixDataModule
    from cmrp.data.tasks import Example, ImagePrompt, Segment
    from cmrp.rewards import build_reward
    from cmrp.training.grpo import CharacterGRPOModule
    from cmrp.training.sft import UnifiedSFTModule
    from tests.unit.test_bagel import CORPUS, small_card

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)  # identical initial weights on every rank
    adapter = BagelAdapter.build(small_card(), corpus=CORPUS)
    texts = [f"hello there {i}, I am a tiny test creature" for i in range(16)]

    def trainer() -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_find_unused_parameters_true" if devices > 1 else "auto",
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=True)

    # SFT: text examples, 4 steps of batch 2 per rank
    chat = [Example("chat", [Segment("text", "user", "hi"), Segment("text", "character", t, train=True)])
            for t in texts]
    sft_cfg = OmegaConf.structured(SFTConfig(optimizer=OptimizerConfig(lr=1e-3)))
    dm = TaskMixDataModule({"chat": chat}, {"chat": 1.0}, adapter.collate, steps=4 * devices, batch_size=2)
    trainer().fit(UnifiedSFTModule(adapter, sft_cfg, 4), datamodule=dm)

    # GRPO: 2 iterations, 2 prompts per rank, groups of 4, global-std advantages (needs the gather)
    cfg = OmegaConf.structured(GRPOConfig(max_steps=2, prompts_per_step=2, group_size=4, sample_steps=4,
                                          window_size=2, minibatch_size=4, adv_std="global", reward_workers=1))
    reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
    before_grpo = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    module = CharacterGRPOModule(adapter, reward, cfg, seed=0)
    module.keep_history = True
    prompts = [ImagePrompt(Example("t2i", [Segment("text", "user", t)]), t) for t in texts[: 4 * devices]]
    loader = DataLoader(prompts, batch_size=2, shuffle=False, collate_fn=list)
    tr = trainer()
    tr.fit(module, train_dataloaders=loader)

    rank = tr.global_rank
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in adapter.model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    changed = sorted(k for k, v in state.items() if not torch.equal(v, before_grpo[k]))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"world_size": tr.world_size, "history": module.history, "changed_by_grpo": changed}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
