"""Character-GRPO: group-relative policy optimisation of the image branch.

One iteration (a Lightning `training_step`, manual optimisation):
1. rollout — for each prompt, G images sampled from one shared, once-encoded prefix; SDE steps
   (with log-probs) inside a random window of the schedule, ODE steps elsewhere;
2. rewards — the reward composite scores each group in a thread pool while the next group samples;
3. advantages — per-group mean, group or global std (statistics all-gathered across ranks);
4. updates — PPO-clipped loss over the window's transitions, `inner_epochs` passes, minibatches,
   gradient accumulation, max grad norm; optional KL to the reference policy and EMA.

The module only talks to the backbone through the protocol (`sample_images`, `rollout_logprob`,
`trainable_groups`), so it serves every adapter, flow or token head (only `Rollout.step_kl` differs).
The policy runs in eval mode throughout: dropout would make the recomputed log-probs differ from the
sampled ones.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.optim.lr_scheduler import LRScheduler

from cmrp.backbones.protocol import Backbone
from cmrp.data.tasks import ImagePrompt
from cmrp.rewards import RewardContext
from cmrp.sampling.flow import sde_window
from cmrp.sampling.spec import SamplerSpec, recipe_sampling_settings
from cmrp.training import sharding
from cmrp.training.advantages import group_advantages, nan_mean, nan_std, ppo_clipped_loss
from cmrp.training.peft import freeze_to_groups
from cmrp.training.sft import build_optimizer

__all__ = ["CharacterGRPOModule"]

QuestionsFor = Callable[[ImagePrompt], list]


class CharacterGRPOModule(L.LightningModule):
    def __init__(
        self,
        adapter: Backbone,
        reward: Callable[..., Any],
        cfg: Any,
        *,
        questions_for: QuestionsFor = lambda prompt: [],
        reference_images: torch.Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.adapter = adapter
        self.model = adapter.model  # registered so Lightning moves and checkpoints it
        self.reward = reward
        self.cfg = cfg
        self.questions_for = questions_for
        self.reference_images = reference_images
        self.seed = seed
        self.trained_names = freeze_to_groups(adapter, list(cfg.train_groups))
        self._reference: dict[str, torch.Tensor] | None = None  # taken in configure_model (slices if sharded)
        self._ema: dict[str, torch.Tensor] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.keep_history = False  # set True to keep each iteration's groups, rewards and advantages
        self.history: list[dict] = []
        self.batch_offset = 0  # iterations done before this fit (a resumed run): keeps rollout seeds in step
        self.nonfinite_guard = None  # a checkpointing.NonFiniteGuard: skip updates with NaN/inf gradients
        self._iteration = 0

    # -- parameters ------------------------------------------------------------------------------
    def _trained_params(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def configure_model(self) -> None:
        """Shard the model under trainer.strategy: fsdp, then copy the weights EMA and the KL reference
        start from (after sharding, so each rank keeps only its slices)."""
        sharding.shard(self)
        if self.cfg.kl_beta > 0 and self._reference is None:
            # the reference is the policy GRPO starts from: only the trained weights move, so their starting
            # values are all it takes (no second model). With LoRA this is not the adapter disabled: after
            # Unified-SFT the adapter already holds the character, and the base would pull GRPO back off it.
            self._reference = {n: p.detach().clone() for n, p in self._trained_params()}
        if self.cfg.ema_decay > 0 and self._ema is None:
            self._ema = {n: p.detach().clone() for n, p in self._trained_params()}

    @contextlib.contextmanager
    def _reference_policy(self):
        """The start values of the trained weights swapped in (full fine-tuning and LoRA alike)."""
        assert self._reference is not None
        params = dict(self.model.named_parameters())
        if sharding.is_sharded(self.model):
            # FSDP gathers from its own slice storage: the start values are copied into it (not swapped in)
            with torch.no_grad():
                kept = {n: params[n].detach().clone() for n in self._reference}
                for n, ref in self._reference.items():
                    params[n].copy_(ref)
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, value in kept.items():
                        params[n].copy_(value)
            return
        current = {n: params[n].data for n in self._reference}
        for n, ref in self._reference.items():
            params[n].data = ref.to(current[n].device)
        try:
            yield
        finally:
            for n, data in current.items():
                params[n].data = data

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model.parameters(), self.cfg.optimizer, self.cfg.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if not sharding.is_sharded(self.model):  # FSDP's state is not thread-safe: a reward asking the policy
            self._pool = ThreadPoolExecutor(max_workers=self.cfg.reward_workers, thread_name_prefix="cmrp-reward")

    def on_train_end(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._ema is not None:
            params = dict(self.model.named_parameters())
            for n, value in self._ema.items():
                params[n].data.copy_(value)

    # -- one iteration ----------------------------------------------------------------------------
    def _rollout_seed(self, batch_idx: int) -> int:
        return (self.seed * 1_000_003 + self.global_rank * 7_919 + batch_idx) % (2**31)

    def _reward_context(self, prompts: Sequence[ImagePrompt], n: int):
        questions = [self.questions_for(p) for p in prompts for _ in range(n)]
        metadata = [{"image_id": p.image_id, "prompt": p.prompt} for p in prompts for _ in range(n)]
        return RewardContext(reference_images=self.reference_images, questions=questions,
                             backbone=self.adapter, metadata=metadata)

    def _score(self, rollout, prompts: Sequence[ImagePrompt], group_offset: int):
        t = time.perf_counter()
        n = self.cfg.group_size
        group_ids = rollout.group_ids + group_offset
        out = self.reward(rollout.images, [p.prompt for p in prompts for _ in range(n)],
                          group_ids=group_ids, context=self._reward_context(prompts, n))
        return out, time.perf_counter() - t

    def sampler_spec(self) -> SamplerSpec:
        """How rollouts are drawn (the recipe's `grpo:` steps, SDE noise and kind, same-noise, timestep shift
        and guidance); each prompt's SDE window is drawn per batch."""
        cfg = self.cfg
        recipe = SamplerSpec.from_settings(recipe_sampling_settings(cfg), steps=int(cfg.sample_steps), where="grpo")
        return recipe.with_(noise=float(cfg.noise_level), sde=str(cfg.sde), same_noise=bool(cfg.same_noise))

    def sample_groups(self, prompts: Sequence[ImagePrompt], batch_idx: int):
        """Rollouts (one per prompt, G samples each) with their reward futures, rewards overlapping sampling."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self._rollout_seed(batch_idx))
        lo, hi = cfg.window_range
        window = sde_window(cfg.sample_steps, cfg.window_size, lo, hi, generator=gen)
        rollouts, futures = [], []
        spec = self.sampler_spec()
        self.model.eval()
        for i, prompt in enumerate(prompts):
            rollout = self.adapter.sample_images(
                [prompt.context], spec.with_(window=window), n=cfg.group_size,
                seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
            )
            rollouts.append(rollout)
            offset = self.global_rank * len(prompts) + i
            if self._pool is not None:
                futures.append(self._pool.submit(self._score, rollout, [prompt], offset))
            else:
                done: Future = Future()
                done.set_result(self._score(rollout, [prompt], offset))
                futures.append(done)
        return rollouts, futures

    def _gather_rewards(self, local: torch.Tensor, local_groups: torch.Tensor):
        """Every rank's rewards and group ids (groups never span ranks), for the advantage statistics."""
        if self._trainer is None or self.trainer.world_size == 1:
            return local, local_groups
        rewards = cast(torch.Tensor, self.all_gather(local.to(self.device))).reshape(-1).cpu()  # a tensor in, one out
        groups = cast(torch.Tensor, self.all_gather(local_groups.to(self.device))).reshape(-1).cpu()
        return rewards, groups

    def training_step(self, batch: list[ImagePrompt], batch_idx: int):
        cfg = self.cfg
        self._iteration = self.batch_offset + batch_idx + 1  # 1-based, counted over a resumed run too
        t0 = time.perf_counter()
        with sharding.gathered(self.model):  # whole weights for sampling and rewards that ask the policy
            rollouts, futures = self.sample_groups(batch, batch_idx + self.batch_offset)
            t_sampled = time.perf_counter()
            results = [f.result() for f in futures]
        t_rewarded = time.perf_counter()

        rewards = torch.cat([out.scores.float().cpu() for out, _ in results])
        groups = torch.cat([r.group_ids + self.global_rank * len(batch) + i for i, r in enumerate(rollouts)])
        all_rewards, all_groups = self._gather_rewards(rewards, groups)
        all_adv, adv_stats = group_advantages(all_rewards, all_groups, std=cfg.adv_std, eps=cfg.adv_eps,
                                              clip=cfg.adv_clip)
        start = self.global_rank * len(rewards) if all_rewards is not rewards else 0
        advantages = all_adv[start:start + len(rewards)]

        if self.keep_history:
            self.history.append({"group_ids": groups.tolist(), "rewards": rewards.tolist(),
                                 "advantages": advantages.tolist(), "rank": self.global_rank})
        train_stats = self._update(rollouts, advantages)
        t_trained = time.perf_counter()
        self._log_iteration(results, rewards, adv_stats, train_stats, {
            "sample": t_sampled - t0, "reward": t_rewarded - t_sampled, "train": t_trained - t_rewarded,
            "reward_compute": sum(dt for _, dt in results),
        })

    def _minibatches(self, rollouts, advantages: torch.Tensor, gen: torch.Generator):
        chunks, offset = [], 0
        for r in rollouts:
            perm = torch.randperm(len(r), generator=gen)
            for k in range(0, len(r), self.cfg.minibatch_size):
                idx = perm[k:k + self.cfg.minibatch_size]
                chunks.append((r, idx, advantages[offset + idx]))
            offset += len(r)
        order = torch.randperm(len(chunks), generator=gen).tolist()
        return [chunks[i] for i in order]

    def _update(self, rollouts, advantages: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        # configure_optimizers gives one optimizer and one scheduler (Lightning's return types allow lists)
        optimizer = cast(LightningOptimizer, self.optimizers())
        scheduler = cast(LRScheduler, self.lr_schedulers())
        gen = torch.Generator().manual_seed(self._rollout_seed(self.global_step + 17))
        ratios, clip_fracs, approx_kls, kls, losses, grad_norms = [], [], [], [], [], []
        steps_in_window = rollouts[0].num_steps
        if steps_in_window == 0:
            raise ValueError("GRPO rollouts stored no trainable steps: set grpo.window_size >= 1")
        self.model.eval()
        for _ in range(cfg.inner_epochs):
            chunks = self._minibatches(rollouts, advantages, gen)
            for c, (rollout, idx, adv) in enumerate(chunks):
                adv = adv.to(self.device)
                for k in range(steps_in_window):
                    if cfg.kl_beta > 0:  # before the policy's pass, which holds the (sharded) root gathered
                        with torch.no_grad(), self._reference_policy():
                            reference = self._logprob(rollout, k, idx)
                    current = self._logprob(rollout, k, idx)
                    logp = current[0]
                    old = rollout.logprobs[idx, k].to(logp.device)
                    loss, stats = ppo_clipped_loss(logp, old, adv, cfg.clip_range)
                    if cfg.kl_beta > 0:
                        kl = rollout.step_kl(current, reference)  # Gaussian (flow) or k3 (tokens)
                        loss = loss + cfg.kl_beta * kl.mean()
                        kls.append(float(kl.mean().detach()))
                    self.manual_backward(loss / (steps_in_window * cfg.accumulate))
                    ratios.append(stats["ratio"].cpu())
                    clip_fracs.append(float(stats["clip_frac"]))
                    approx_kls.append(float(stats["approx_kl"]))
                    losses.append(float(loss.detach()))
                if (c + 1) % cfg.accumulate == 0 or c == len(chunks) - 1:
                    grad_norms.append(self._step(optimizer))
        scheduler.step()
        ratio = torch.cat(ratios)
        out = {
            "loss": sum(losses) / len(losses),
            "ratio_mean": float(ratio.mean()),
            "ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
            "clip_frac": sum(clip_fracs) / len(clip_fracs),
            "approx_kl": sum(approx_kls) / len(approx_kls),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if kls:
            out["kl"] = sum(kls) / len(kls)
        return out

    def _logprob(self, rollout, step: int, idx: torch.Tensor):
        """(log-prob, mean) of stored transitions under the current weights, through the sharded model's entry."""
        return sharding.call(self.model, lambda: self.adapter.rollout_logprob(rollout, step, idx, return_mean=True))

    def _step(self, optimizer) -> float:
        norm = sharding.grad_norm(p for _, p in self._trained_params())  # whole, on every rank alike
        # numbered by iteration: a skipped update does not advance global_step, so that would repeat
        if self.nonfinite_guard is not None and not self.nonfinite_guard.step(bool(torch.isfinite(norm)),
                                                                             self._iteration):
            optimizer.zero_grad(set_to_none=True)  # NaN/inf loss or gradients: this update is skipped
            return float(norm)
        if self.cfg.max_grad_norm > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self._ema is not None:
            decay = self.cfg.ema_decay
            with torch.no_grad():
                for n, p in self._trained_params():
                    self._ema[n].mul_(decay).add_(p.detach(), alpha=1 - decay)
        return float(norm)

    # -- resumption ------------------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """What a resume checkpoint needs beyond weights, optimiser and RNG: EMA and reference weights, the
        skipped-step counter (the data position is the checkpoint's)."""
        return {"ema": dict(self._ema or {}), "reference": dict(self._reference or {}),
                "nonfinite": self.nonfinite_guard.state_dict() if self.nonfinite_guard is not None else {}}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        for name, own in (("ema", self._ema), ("reference", self._reference)):
            if own is not None:
                for key, value in state[name].items():
                    sharding.load_into(own[key], value)
        if self.nonfinite_guard is not None and state.get("nonfinite"):
            self.nonfinite_guard.load_state_dict(state["nonfinite"])

    def _log_iteration(self, results, rewards, adv_stats, train_stats, timings) -> None:
        n = len(rewards)
        log = {"reward/total": nan_mean(rewards), "reward/total_std": nan_std(rewards)}
        terms: dict[str, list[torch.Tensor]] = {}
        for out, _ in results:
            for name, info in out.info.items():
                if isinstance(info, dict) and isinstance(info.get("scores"), torch.Tensor):
                    terms.setdefault(name, []).append(info["scores"].float().cpu())
        for name, parts in terms.items():
            scores = torch.cat(parts)
            log[f"reward/{name}"] = nan_mean(scores)
            log[f"reward/{name}_std"] = nan_std(scores)
        log["grpo/zero_std_ratio"] = adv_stats["zero_std_ratio"]
        if self.nonfinite_guard is not None:
            log["grpo/nonfinite_steps"] = float(self.nonfinite_guard.total)  # skipped updates so far
        log.update({f"grpo/{k}": v for k, v in train_stats.items()})
        log.update({f"grpo/time_{k}_s": v for k, v in timings.items()})
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        self.last_log = log

