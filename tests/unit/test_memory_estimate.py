"""`cmrp plan`'s memory estimate against the measured peak of real training steps on the tiny card (live
tensor bytes counted by `LiveTensorBytes`), and its meta-device parameter counts against the real model's."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.perf.memory import Precision, SequenceShape, Strategy, estimate_memory
from cmrp.perf.memtrack import LiveTensorBytes
from cmrp.perf.model import LoraSpec, meta_adapter, model_counts, planned_counts
from cmrp.perf.workload import build_adapter, sft_examples

TOLERANCE = 0.25  # the bar; the cases below land within 15 % today


def test_live_tensor_bytes_counts_allocations_and_frees():
    with LiveTensorBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.float64)
        view = a[:10]  # a view shares its storage: not counted again
        assert live.current == 4000 + 4000
        del b
        assert live.current == 4000 and live.peak == 8000
        c = torch.cat([a, a])
        assert live.current == 4000 + 8000 and live.peak == 12000
        del a, c, view
    assert live.current == 0 and live.peak == 12000


def _tiny(mode: str, checkpointing: bool):
    from cmrp.training.peft import apply_finetune

    adapter = build_adapter("bagel-tiny")
    apply_finetune(adapter, OmegaConf.create({"mode": mode, "r": 8, "alpha": 16, "dropout": 0.0, "targets": "default",
                                              "gradient_checkpointing": checkpointing}))
    adapter.model.train()
    return adapter


def _measured_peak(adapter, batch, autocast: bool) -> float:
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = adapter.losses(batch)
            loss = losses["text"] + losses["image"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimiser's states exist from the first step on: measure the steady state
    states = [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s)]
    batch_tensors = [v for v in batch.__dict__.values() if torch.is_tensor(v)]
    with LiveTensorBytes([*adapter.model.parameters(), *adapter.model.buffers(), *adapter.bagel.vae.parameters(),
                          *states, *batch_tensors]) as live:
        step()
    return float(live.peak)


@pytest.mark.parametrize("mode,checkpointing,precision", [
    ("full", False, "32-true"), ("full", True, "32-true"), ("lora", False, "32-true"), ("lora", True, "32-true"),
    ("full", False, "bf16-mixed"), ("lora", True, "bf16-mixed"),
])
def test_estimate_matches_the_measured_peak_of_a_training_step(mode, checkpointing, precision):
    torch.manual_seed(0)
    adapter = _tiny(mode, checkpointing)
    batch = adapter.collate(sft_examples(adapter, batch=4, text_tokens=120, tasks=("t2i", "vqa", "chat")))
    measured = _measured_peak(adapter, batch, autocast=precision == "bf16-mixed")
    counts, train = model_counts(adapter)
    estimate = estimate_memory(adapter.arch, counts, SequenceShape.from_batch(batch, adapter.arch),
                               precision=Precision.parse(precision), strategy=Strategy.parse("auto", 1), train=train)
    peak = estimate.peak(checkpointing)
    assert abs(peak - measured) <= TOLERANCE * measured, (peak / measured, estimate.as_dict(), measured)
    # checkpointing is what the estimate says it is: far less activation memory
    assert estimate.activations_checkpointed < 0.2 * estimate.activations


@pytest.mark.parametrize("mode,targets", [("full", "default"), ("lora", "default"), ("lora", "generation")])
def test_meta_device_counts_equal_the_real_models(mode, targets):
    """The plan never wraps a model with PEFT: its LoRA counts come from the adapter's target patterns. They
    must equal what `apply_finetune` makes of the real model."""
    from cmrp.config import load_backbone_card
    from cmrp.training.peft import apply_finetune

    adapter = build_adapter("bagel-tiny")
    apply_finetune(adapter, OmegaConf.create({"mode": mode, "r": 4, "alpha": 8, "dropout": 0.0, "targets": targets}))
    real, real_train = model_counts(adapter)
    meta = meta_adapter(load_backbone_card("bagel-tiny"))
    assert next(meta.model.parameters()).device.type == "meta"
    planned, planned_train = planned_counts(meta, mode=mode, lora=LoraSpec(4, targets) if mode == "lora" else None)
    assert planned == real
    assert planned_train == real_train


def test_grpo_train_groups_leave_the_generation_expert():
    from cmrp.config import load_backbone_card
    from cmrp.training.peft import freeze_to_groups

    adapter = build_adapter("bagel-tiny")
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    freeze_to_groups(adapter, ["generation"])
    real, _ = model_counts(adapter)
    meta = meta_adapter(load_backbone_card("bagel-tiny"))
    planned, train = planned_counts(meta, mode="full", train_groups=["generation"])
    # the plan leaves the frozen sin-cos tables out of training, as `apply_finetune` does
    pos = sum(p.numel() for n, p in adapter.model.named_parameters() if n == "latent_pos_embed.pos_embed")
    assert planned.trainable == real.trainable - pos
    assert train.und == "frozen" and train.gen == "full" and train.gen_io and not train.embed


def test_sharding_and_precision_terms():
    from cmrp.config import load_backbone_card

    meta = meta_adapter(load_backbone_card("bagel-mid"))
    counts, train = planned_counts(meta, mode="full")
    shape = SequenceShape(batch=2, length=512, gen_tokens=400, labelled=100)
    single = estimate_memory(meta.arch, counts, shape, precision=Precision.parse("32-true"),
                             strategy=Strategy.parse("auto", 1), train=train)
    fsdp = estimate_memory(meta.arch, counts, shape, precision=Precision.parse("32-true"),
                           strategy=Strategy.parse("fsdp", 8), train=train)
    ddp = estimate_memory(meta.arch, counts, shape, precision=Precision.parse("32-true"),
                          strategy=Strategy.parse("ddp", 8), train=train)
    vae = counts.autoencoder * 4
    assert single.weights == pytest.approx(counts.total * 4 + vae)
    assert fsdp.weights == pytest.approx(counts.total * 4 / 8 + vae)  # the autoencoder is never sharded
    assert fsdp.optimizer == pytest.approx(single.optimizer / 8) and single.optimizer == counts.trainable * 8
    assert ddp.gradients == pytest.approx(2 * single.gradients)  # DDP's buckets
    bf16 = estimate_memory(meta.arch, counts, shape, precision=Precision.parse("bf16-true"),
                           strategy=Strategy.parse("auto", 1), train=train)
    assert bf16.activations < single.activations and bf16.weights < single.weights
    qlora, _ = planned_counts(meta, mode="qlora", lora=LoraSpec(16, "default", quantized=True))
    assert 0.8 * qlora.total > qlora.quantized > 0.5 * qlora.total  # both experts' projections are 4-bit


def test_unsupported_settings_fail_clearly():
    from cmrp.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.strategy: 'deepspeed_stage_3'"):
        Strategy.parse("deepspeed_stage_3", 8)
    with pytest.raises(ConfigError, match="trainer.precision"):
        Precision.parse("transformer-engine")
    with pytest.raises(ConfigError, match="adapter 'bagel'"):
        meta_adapter({"name": "janus-pro-1b", "adapter": "janus", "architecture": {}})
