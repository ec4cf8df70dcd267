"""Character-GRPO: advantages, PPO clipping, on-policy log-probs, group freezing, and that it optimises."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf
from torch.optim.optimizer import register_optimizer_step_post_hook

from cmrp.config.schema import GRPOConfig
from cmrp.data.tasks import Example, ImagePrompt, Segment
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec
from cmrp.training.advantages import group_advantages, ppo_clipped_loss
from tests.unit.test_bagel import CORPUS, small_card


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, stats = group_advantages(rewards, groups, std="group", eps=0.0, clip=100.0)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    assert stats["zero_std_ratio"] == pytest.approx(1 / 3)  # group 1 is all equal: advantage 0, no NaN


def test_group_advantages_global_std_clip_and_nan():
    rewards = torch.tensor([0.0, 2.0, float("nan"), 100.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    adv, stats = group_advantages(rewards, groups, std="global", eps=0.0, clip=0.5)
    assert adv[2] == 0.0 and not torch.isnan(adv).any()
    valid = torch.tensor([0.0, 2.0, 100.0, 0.0])
    g = float(valid.std(unbiased=False))
    assert stats["global_std"] == pytest.approx(g)
    assert float(adv[0]) == pytest.approx(-1.0 / g)
    assert float(adv[3]) == 0.5 and float(adv[4]) == -0.5  # clipped


def test_ppo_loss_ratio_one_on_policy_and_clipping():
    logp = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, stats = ppo_clipped_loss(logp, logp.detach(), adv, 0.2)
    assert torch.allclose(stats["ratio"], torch.ones(3)) and float(stats["clip_frac"]) == 0.0
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()))
    # ratio far above 1+eps with a positive advantage: clipped, so no gradient through it
    new = torch.tensor([5.0], requires_grad=True)
    loss, stats = ppo_clipped_loss(new, torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    loss.backward()
    assert float(loss) == pytest.approx(-1.2) and float(new.grad) == 0.0 and float(stats["clip_frac"]) == 1.0


@pytest.fixture()
def adapter():
    from cmrp.backbones.bagel import BagelAdapter

    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(), corpus=CORPUS)
    torch.nn.init.normal_(a.model.llm2vae.weight, std=0.02)
    a.model.eval()
    return a


def prompts(texts):
    return [ImagePrompt(Example("t2i", [Segment("text", "user", t)]), t) for t in texts]


def test_recomputed_logprobs_equal_recorded_ones(adapter):
    ctx = [p.context for p in prompts(["draw me on the beach", "hello there"])]
    rollout = adapter.sample_images(ctx, SamplerSpec(steps=6, noise=0.7, window=(1, 4)), n=3, seed=0)
    assert rollout.num_steps == 3 and rollout.trajectory.logprobs.shape == (6, 3)
    for k in range(3):
        with torch.no_grad():
            again = adapter.rollout_logprob(rollout, k)
        assert torch.allclose(again, rollout.trajectory.logprobs[:, k], atol=1e-4)
    sub = torch.tensor([4, 1])
    with torch.no_grad():
        part = adapter.rollout_logprob(rollout, 2, sub)
    assert torch.allclose(part, rollout.trajectory.logprobs[sub, 2], atol=1e-4)
    # noise 0 rollout == plain ODE sampling
    ode = adapter.sample_images(ctx, SamplerSpec(steps=6), n=3, seed=0).images
    no_noise = adapter.sample_images(ctx, SamplerSpec(steps=6, noise=0.0, window=(1, 4)), n=3, seed=0).images
    assert torch.equal(ode, no_noise)


def test_same_noise_option_shares_the_start(adapter):
    ctx = [p.context for p in prompts(["draw me"])]
    same = adapter.sample_images(ctx, SamplerSpec(steps=3, same_noise=True), n=3, seed=1).images
    assert torch.allclose(same[0], same[1], atol=1e-5) and torch.allclose(same[1], same[2], atol=1e-5)
    diff = adapter.sample_images(ctx, SamplerSpec(steps=3), n=3, seed=1).images
    assert not torch.allclose(diff[0], diff[1])


def grpo_cfg(**kw):
    base = OmegaConf.structured(GRPOConfig)
    base.merge_with(kw)
    return base


def run_grpo(adapter, reward, cfg, train_prompts, steps_seed=0):
    import lightning as L
    from torch.utils.data import DataLoader

    from cmrp.training.grpo import CharacterGRPOModule

    module = CharacterGRPOModule(adapter, reward, cfg, seed=steps_seed)
    order = [train_prompts[i % len(train_prompts)] for i in range(cfg.max_steps * cfg.prompts_per_step)]
    loader = DataLoader(order, batch_size=cfg.prompts_per_step, collate_fn=list)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return module


def test_only_the_generation_expert_changes(adapter):
    from cmrp.rewards import build_reward
    from cmrp.training.peft import apply_finetune

    apply_finetune(adapter, OmegaConf.create({"mode": "full"}))
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
    cfg = grpo_cfg(max_steps=2, prompts_per_step=2, group_size=4, sample_steps=4, window_size=2,
                   minibatch_size=4, reward_workers=1)
    module = run_grpo(adapter, reward, cfg, prompts(["draw me", "on the beach"]))
    gen = re.compile(adapter.trainable_groups()["generation"][0])
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(gen.fullmatch(n) for n in changed)
    assert any("_moe_gen" in n for n in changed)
    log = module.last_log
    for key in ("reward/total", "reward/brightness", "grpo/clip_frac", "grpo/approx_kl", "grpo/ratio_mean",
                "grpo/ratio_std", "grpo/grad_norm", "grpo/zero_std_ratio", "grpo/time_sample_s",
                "grpo/time_reward_s", "grpo/time_train_s"):
        assert key in log, key


def test_kl_to_reference_and_ema_in_lora_mode(adapter):
    from cmrp.rewards import build_reward
    from cmrp.training.peft import apply_finetune

    apply_finetune(adapter, OmegaConf.create({"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                              "targets": "default"}))
    reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
    cfg = grpo_cfg(max_steps=2, prompts_per_step=1, group_size=4, sample_steps=4, window_size=2, minibatch_size=2,
                   accumulate=2, kl_beta=0.1, ema_decay=0.5, reward_workers=1,
                   optimizer={"lr": 0.01})
    start = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
    stepped = []  # the trained weights after every optimiser step
    hook = register_optimizer_step_post_hook(lambda *_: stepped.append(
        {n: p.detach().clone() for n, p in adapter.model.named_parameters() if n in start}))
    try:
        module = run_grpo(adapter, reward, cfg, prompts(["draw me"]))
    finally:
        hook.remove()
    assert all("lora_" in n and "_moe_gen" in n for n in module.trained_names)
    start = {n: start[n] for n in module.trained_names}  # the module froze everything else
    # LoRA starts as the reference (B = 0); after the first update the policy has moved away from it
    assert module.last_log["grpo/kl"] > 0.0
    # the weights left at the end are the EMA of the weights after each step (decay 0.5), recomputed here
    assert len(stepped) >= 2
    ema = {n: v.clone() for n, v in start.items()}
    for weights in stepped:
        for n in ema:
            ema[n] = 0.5 * ema[n] + 0.5 * weights[n]
    final = dict(adapter.model.named_parameters())
    for n in ema:
        torch.testing.assert_close(final[n].detach(), ema[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(final[n], stepped[-1][n]) for n in ema)  # not simply the last weights


def test_kl_reference_of_a_trained_lora_adapter_is_its_start_not_the_base(adapter):
    """GRPO after LoRA SFT: the adapter already holds the character, so the KL must anchor to the adapter as
    GRPO found it (zero before the first update), not to the base with the adapter disabled."""
    from cmrp.rewards import build_reward
    from cmrp.training.peft import apply_finetune

    apply_finetune(adapter, OmegaConf.create({"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                              "targets": "default"}))
    with torch.no_grad():  # what SFT leaves behind: LoRA B no longer zero
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
    # one prompt, one minibatch, one update per iteration: the KL is measured before the weights move
    cfg = grpo_cfg(max_steps=1, prompts_per_step=1, group_size=4, sample_steps=4, window_size=2, minibatch_size=4,
                   kl_beta=1.0, reward_workers=1, optimizer={"lr": 0.01})
    module = run_grpo(adapter, reward, cfg, prompts(["draw me"]))
    assert module.last_log["grpo/kl"] == 0.0
    with module._reference_policy():  # the reference holds the trained adapter's start values
        for name, p in module._trained_params():
            assert torch.equal(p, module._reference[name])
    assert any(not torch.equal(p, module._reference[n]) for n, p in module._trained_params())  # it trained


def test_grpo_raises_a_brightness_reward_on_heldout_prompts(adapter):
    """The optimiser demonstrably works: GRPO on a reward for bright images makes held-out samples brighter."""
    from cmrp.rewards import build_reward
    from cmrp.training.grpo_stage import heldout_reward
    from cmrp.training.peft import apply_finetune

    apply_finetune(adapter, OmegaConf.create({"mode": "full"}))
    reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
    train = prompts([f"draw me doing thing {i}" for i in range(6)])
    heldout = prompts(["draw me on the beach", "hello there", "what colour is it"])

    def measure():
        return heldout_reward(adapter, reward, heldout, lambda p: [], None, n=4, spec=SamplerSpec(steps=8),
                              seed=123)["total"]

    start = measure()
    cfg = grpo_cfg(max_steps=12, prompts_per_step=2, group_size=8, sample_steps=8, window_size=3, noise_level=1.0,
                   minibatch_size=8, clip_range=0.2, adv_clip=5.0, reward_workers=1, optimizer={"lr": 3e-3})
    run_grpo(adapter, reward, cfg, train)
    end = measure()
    print(f"held-out brightness {start:.3f} -> {end:.3f}")
    assert end > start + 0.05, (start, end)


def test_text_cfg_combines_conditional_and_unconditional_velocities(adapter):
    ctx = [p.context for p in prompts(["draw me on the beach", "hi"])]
    plain = adapter.sample_images(ctx, SamplerSpec(steps=3), n=2, seed=4).images
    assert torch.equal(adapter.sample_images(ctx, SamplerSpec(steps=3, guidance=Guidance(text_scale=1.0)),
                                             n=2, seed=4).images, plain)
    guided = adapter.sample_images(ctx, SamplerSpec(steps=3, guidance=Guidance(text_scale=3.0)), n=2, seed=4).images
    assert not torch.allclose(guided, plain, atol=1e-4)
    # the guided velocity equals v_u + s (v_c - v_u) with each branch run on its own
    cache = adapter._encode_prefix(ctx)  # noqa: SLF001 - checking the maths of the guided velocity
    uncond = adapter._unconditional_prefix()  # noqa: SLF001
    x = torch.randn(2, adapter.gen_tokens, adapter.bagel.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.6)
    with torch.no_grad():
        v_c = adapter._velocity_fn(cache)(x, t)  # noqa: SLF001
        v_u = adapter._velocity_fn(uncond.expand(2))(x, t)  # noqa: SLF001
        v = adapter._guided_velocity_fn(cache, uncond, 3.0)(x, t)  # noqa: SLF001
    assert torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-5)


def test_cfg_rollout_logprobs_are_recomputed_under_guidance(adapter):
    ctx = [p.context for p in prompts(["draw me on the beach"])]
    rollout = adapter.sample_images(ctx, SamplerSpec(steps=4, noise=0.7, window=(0, 2),
                                                     guidance=Guidance(text_scale=2.5)),
                                    n=3, seed=0)
    with torch.no_grad():
        again = adapter.rollout_logprob(rollout, 1)
    assert torch.allclose(again, rollout.trajectory.logprobs[:, 1], atol=1e-4)


def test_the_heldout_objective_is_measured_on_its_own_sample_size_or_the_grids():
    """grpo.heldout_prompts / heldout_images, else the sample grid's; never fewer than two samples a prompt."""
    from cmrp.training.grpo_stage import heldout_size

    cfg = OmegaConf.create({"grpo": {"heldout_prompts": None, "heldout_images": None},
                            "eval": {"grid_prompts": 8, "images_per_prompt": 1}})
    assert heldout_size(cfg) == (8, 2)
    cfg.grpo.heldout_prompts, cfg.grpo.heldout_images = 40, 8
    assert heldout_size(cfg) == (40, 8)
