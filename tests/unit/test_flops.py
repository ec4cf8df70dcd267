"""FLOP accounting (`cmrp.perf.flops`) against an independent count: `torch.utils.flop_counter` over the real
tiny BAGEL's forward and backward (SDPA's math kernel, so attention runs as counted matmuls).

Stated tolerance: 1 % (the model leaves out no matmul, so the counts agree to rounding today).
"""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cmrp.data.tasks import Example, Segment
from cmrp.perf import flops as F
from cmrp.perf.workload import build_adapter, context_of_tokens, sft_examples
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec

TOLERANCE = 0.01


def counted(fn) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def close(estimate: float, measured: float) -> bool:
    return abs(estimate - measured) <= TOLERANCE * measured


def tiny(mode: str = "full", checkpointing: bool = False, targets: str = "default"):
    from cmrp.training.peft import apply_finetune

    adapter = build_adapter("bagel-tiny")
    apply_finetune(adapter, OmegaConf.create({"mode": mode, "r": 8, "alpha": 16, "dropout": 0.0, "targets": targets,
                                              "gradient_checkpointing": checkpointing}))
    adapter.model.train()
    return adapter


@pytest.mark.parametrize("mode,checkpointing,targets", [("full", False, "default"), ("full", True, "default"),
                                                        ("lora", False, "default"), ("lora", True, "generation")])
def test_sft_step_matches_the_flop_counter(mode, checkpointing, targets):
    adapter = tiny(mode, checkpointing, targets)
    batch = adapter.collate(sft_examples(adapter, batch=6, text_tokens=40))
    assert batch.valid.sum(1).unique().numel() > 1  # sequences of different lengths: padding is exercised

    def step():
        losses = adapter.losses(batch)
        (losses["text"] + losses["image"]).backward()

    measured = counted(step)
    train = F.Trainable.from_model(adapter.model)
    # as executed: padding through no layer, attention over row groups cut to their longest row
    layout = F.SFTLayout.from_batch(batch, adapter.arch, executed=True)
    estimate = F.sft_step_flops(adapter.arch, layout, train, checkpointing=checkpointing)
    assert close(estimate.total, measured), (estimate.as_dict(), measured)
    # the real-token count (MFU's numerator) is smaller only by the attention a group's shorter rows pay for
    real = F.SFTLayout.from_batch(batch, adapter.arch)
    assert (real.und_tokens, real.gen_tokens) == (layout.und_tokens, layout.gen_tokens)
    assert real.attention_pairs <= layout.attention_pairs < batch.valid.numel() * batch.valid.shape[1]


def test_attention_row_groups_pay_for_their_longest_row():
    from cmrp.backbones.bagel.qwen2_mot import row_groups

    lengths = torch.tensor([5, 9, 2, 7, 9, 3])
    valid = torch.arange(9)[None] < lengths[:, None]
    groups = row_groups(valid)  # 6 rows, at most 4 groups: 3 of 2 rows, longest first
    assert [(rows.tolist(), n) for rows, n in groups] == [([1, 4], 9), ([3, 0], 7), ([5, 2], 3)]
    assert sum(len(rows) * n * n for rows, n in groups) == 2 * 81 + 2 * 49 + 2 * 9  # vs 6 x 81 padded
    assert row_groups(torch.ones(3, 4, dtype=torch.bool)) is None  # equal lengths: one attention
    assert row_groups(torch.tensor([[True, False, True], [True, True, False]])) is None  # padding not at the end


def test_trainable_reads_the_finetune_mode():
    assert F.Trainable.from_model(tiny("full").model) == F.Trainable.full()
    assert F.Trainable.from_model(tiny("lora").model) == F.Trainable.lora(8, "default")
    assert F.Trainable.from_model(tiny("lora", targets="generation").model) == F.Trainable.lora(8, "generation")


def _gen_expert(adapter) -> None:
    gen = re.compile(r"(.*_moe_gen.*|time_embedder\..*|vae2llm\..*|llm2vae\..*)")
    for name, p in adapter.model.named_parameters():
        p.requires_grad_(bool(gen.fullmatch(name)))


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_rollout_and_update_match_the_flop_counter(cfg_scale):
    adapter = build_adapter("bagel-tiny")
    context, prefix = context_of_tokens(adapter, 50)
    assert prefix == 50
    empty = int(adapter.collate([Example("t2i", [Segment("text", "user", "")])]).input_ids.shape[1])
    guided = cfg_scale != 1.0
    steps = 4
    shape = F.RolloutShape(1, 3, steps, prefix, (adapter.image_size,) * 2, branches=2 if guided else 1,
                           guided=F.guided_steps(steps, adapter.arch.timestep_shift, (0.0, 1.0)) if guided else 0,
                           uncond_tokens=(empty,) if guided else ())

    def sample(reuse=True):
        return adapter.sample_images([context], SamplerSpec(steps=steps, noise=0.7, window=(0, 2),
                                                            guidance=Guidance(text_scale=cfg_scale)),
                                     n=3, seed=0, reuse_prefix=reuse)

    assert close(F.rollout_flops(adapter.arch, shape).total, counted(sample))
    if not guided:  # the naive baseline re-encodes the prefix for every sample at every step
        assert close(F.rollout_flops(adapter.arch, shape, reuse_prefix=False).total, counted(lambda: sample(False)))
    rollout = sample()
    _gen_expert(adapter)
    train = F.Trainable.from_model(adapter.model)
    assert train == F.Trainable.generation_expert()

    def update():
        for k in range(rollout.num_steps):
            adapter.rollout_logprob(rollout, k).sum().backward()

    assert close(F.grpo_update_flops(adapter.arch, shape, train, window=2).total, counted(update))


def test_update_re_encodes_prefixes_when_understanding_trains():
    adapter = build_adapter("bagel-tiny")
    context, prefix = context_of_tokens(adapter, 30)
    rollout = adapter.sample_images([context], SamplerSpec(steps=3, noise=0.7, window=(0, 1)), n=2, seed=0)
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    train = F.Trainable.from_model(adapter.model)
    measured = counted(lambda: adapter.rollout_logprob(rollout, 0).sum().backward())
    shape = F.RolloutShape(1, 2, 3, prefix, (adapter.image_size,) * 2)
    assert close(F.grpo_update_flops(adapter.arch, shape, train, window=1).total, measured)


def test_flux_autoencoder_matches_the_flop_counter():
    from cmrp.backbones.bagel.autoencoder import FluxAEConfig, FluxAutoencoder
    from cmrp.config import load_backbone_card

    spec = OmegaConf.to_container(load_backbone_card("bagel-mid").architecture.vae)
    vae = FluxAutoencoder(FluxAEConfig.from_spec(spec)).eval()
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        encoded = counted(lambda: vae.encode(images))
        latents = vae.encode(images)
        decoded = counted(lambda: vae.decode(latents))
    assert close(2 * F.vae_flops(spec, (32, 48), encoder=True), encoded)
    assert close(2 * F.vae_flops(spec, (32, 48), encoder=False, decoder=True), decoded)
    assert F.vae_flops({"kind": "pixel", "downsample": 2}, (32, 32), decoder=True) == 0.0


def test_linear_flops_are_twice_the_parameters_per_token():
    """A closed form independent of the layer bookkeeping: without attention, a forward over N understanding
    tokens costs 2 N x (the understanding expert's decoder linear parameters)."""
    adapter = build_adapter("bagel-tiny")
    linears = sum(m.weight.numel() for n, m in adapter.bagel.language_model.model.layers.named_modules()
                  if isinstance(m, torch.nn.Linear) and "_moe_gen" not in n)
    out = F._decoder(adapter.arch, 100, 0, 0, None, input_grad=False, checkpointing=False)  # noqa: SLF001
    assert out.forward["llm_und"] == 2 * 100 * linears
    assert "llm_gen" in out.forward and out.forward["llm_gen"] == 0 or "llm_gen" not in out.forward


def test_prefix_reuse_approaches_the_free_prefix_bound():
    """In FLOPs, at BAGEL-7B's size (1024 px: 4096 latent tokens): without reuse the rollout's cost over the
    bound grows with the prompt; with reuse it stays within 3 % of it up to 1k tokens, and reuse removes all
    of a prompt's cost but the latent tokens' attention to its keys (~12 %)."""
    from cmrp.backbones.bagel.model import BagelArch
    from cmrp.config import load_backbone_card

    arch = BagelArch.from_dict(OmegaConf.to_container(load_backbone_card("bagel-7b-mot").architecture))
    rows = []
    for prefix in (64, 256, 1024):
        shape = F.RolloutShape(1, 8, 15, prefix, (1024, 1024))
        bound = F.rollout_flops(arch, shape, free_prefix=True).total
        reuse, naive = F.rollout_flops(arch, shape).total, F.rollout_flops(arch, shape, reuse_prefix=False).total
        rows.append((reuse / bound, naive / bound, (naive - reuse) / (naive - bound)))
    assert all(1.0 < r < 1.03 for r, _, _ in rows)
    assert rows[0][1] < rows[1][1] < rows[2][1] and rows[2][1] > 1.2
    assert all(0.85 < saved < 0.9 for _, _, saved in rows)


def test_flop_count_arithmetic():
    a = F.FlopCount({"x": 1.0}, {"x": 2.0})
    b = F.FlopCount({"y": 3.0})
    total = 2 * (a + b)
    assert total.total == 12.0 and total.forward == {"x": 2.0, "y": 6.0} and total.backward == {"x": 4.0}
    assert total.as_dict()["by_part"] == {"x": 6.0, "y": 6.0}
