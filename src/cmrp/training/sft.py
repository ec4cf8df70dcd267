"""Unified-SFT: one LightningModule for every task of a character.

loss = ce_weight * CE(text tokens) + mse_weight * image loss (flow MSE for flow heads).
The module only calls the backbone protocol (`losses`), so any adapter trains the same way.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from cmrp.backbones.protocol import Backbone
from cmrp.training.sharding import call, grads_finite, shard

__all__ = ["UnifiedSFTModule", "build_optimizer"]


def build_optimizer(params, opt_cfg: Any, max_steps: int):
    """Optimizer + per-step LR schedule from a recipe's `sft.optimizer` section."""
    params = [p for p in params if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if opt_cfg.name == "adamw":
        # on CPU the fused kernel updates every tensor at once instead of looping over them in Python (11 ms ->
        # 2.4 ms a step for the 167 tensors of the sandbox base); elsewhere torch's default (foreach on CUDA)
        fused = bool(params) and all(p.device.type == "cpu" for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay,
            fused=True if fused else None,
        )
    else:
        optimizer = torch.optim.SGD(params, lr=opt_cfg.lr, momentum=0.9, weight_decay=opt_cfg.weight_decay)
    warmup, kind = int(opt_cfg.warmup_steps), opt_cfg.scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


class UnifiedSFTModule(L.LightningModule):
    def __init__(self, adapter: Backbone, sft_cfg: Any, max_steps: int):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model  # registered so Lightning moves and checkpoints it
        self.sft_cfg = sft_cfg
        self.max_steps = max_steps
        self.nonfinite_guard = None  # a checkpointing.NonFiniteGuard: skip steps with NaN/inf gradients

    def configure_model(self) -> None:
        shard(self)  # under trainer.strategy: fsdp

    def on_train_start(self) -> None:
        # the "before" evaluation left the model in eval mode; Lightning keeps a module's mode
        self.model.train()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        cfg = self.sft_cfg
        losses = call(self.model, lambda: self.adapter.losses(batch, timestep_shift=cfg.timestep_shift))
        loss = cfg.ce_weight * losses["text"] + cfg.mse_weight * losses["image"]
        n = len(batch.task_ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        # the metric names users chart (the recipe's ce_weight / mse_weight); "mse" is a token head's image CE
        self.log("train/ce", losses["text"], batch_size=n)
        self.log("train/mse", losses["image"], batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """After backward, before clipping: a step whose loss or gradients are not finite changes no weight
        (every gradient dropped, so the optimiser skips the parameters); the step count and schedule go on,
        which keeps the data position equal to the step for exact resumption."""
        if self.nonfinite_guard is None:
            return

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.nonfinite_guard.step(grads_finite(params), self.global_step + 1):
            for p in params:
                p.grad = None
        self.log("train/nonfinite_steps", float(self.nonfinite_guard.total))

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model.parameters(), self.sft_cfg.optimizer, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
