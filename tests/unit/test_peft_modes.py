"""Fine-tuning modes on the tiny BAGEL: LoRA target kinds, QLoRA's base-layer replacement and its real
bitsandbytes NF4 layers (CUDA, or bitsandbytes' CPU backend), gradient checkpointing (identical gradients), bf16 training steps through
Lightning, and the FSDP / DeepSpeed strategy choice."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.backbones.bagel import BagelAdapter
from cmrp.errors import ConfigError
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec
from cmrp.training.peft import apply_finetune, check_finetune_runtime, quantize_base_4bit, replace_linears
from tests.unit.test_bagel import CORPUS, small_card

LAYER_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def build(**arch) -> BagelAdapter:
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(**arch), corpus=CORPUS)
    torch.nn.init.normal_(a.model.llm2vae.weight, std=0.05)
    return a


def finetune(mode: str, targets="default", **extra):
    return OmegaConf.create({"mode": mode, "r": 4, "alpha": 8, "dropout": 0.0, "targets": targets, **extra})


def t2i_batch(adapter):
    from cmrp.data.tasks import Example, Segment

    pixels = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    return adapter.collate([
        Example("t2i", [Segment("text", "user", "draw me"), Segment("image", "character", pixels=pixels,
                                                                    generate=True, train=True)]),
        Example("chat", [Segment("text", "user", "hello"), Segment("text", "character", "hi there", train=True)]),
    ])


# -- LoRA target kinds -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["generation", "understanding", "default"])
def test_lora_target_kinds(kind):
    adapter = build()
    apply_finetune(adapter, finetune("lora", kind))
    wrapped = {n.split(".base_layer")[0] for n, _ in adapter.model.named_modules() if n.endswith(".base_layer")}
    layers = adapter.bagel.arch.llm.num_hidden_layers
    prefix = "base_model.model.language_model.model.layers"
    gen_names = [f"self_attn.{x}_proj_moe_gen" for x in "qkvo"] + [f"mlp_moe_gen.{x}_proj" for x in ("gate", "up", "down")]
    gen = {f"{prefix}.{i}.{m}" for i in range(layers) for m in gen_names}
    und = {f"{prefix}.{i}.{m}" for i in range(layers) for m in LAYER_LINEARS}
    expected = {"generation": gen, "understanding": und, "default": gen | und}[kind]
    assert wrapped == expected


# -- QLoRA -------------------------------------------------------------------------------------------
class FakeNF4Linear(torch.nn.Linear):
    """Stands in for bitsandbytes' Linear4bit on CPU: weights rounded to 16 levels per row (absmax)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            scale = linear.weight.abs().amax(dim=1, keepdim=True) / 7
            self.weight.copy_((linear.weight / scale).round().clamp(-8, 7) * scale)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)


def test_qlora_replaces_exactly_the_decoder_linears_and_lora_trains_on_top():
    from peft import LoraConfig, get_peft_model

    adapter = build()
    names_before = set(adapter.model.state_dict())
    batch = t2i_batch(adapter)
    adapter.model.eval()
    torch.manual_seed(1)
    ref = adapter.losses(batch)
    replaced = quantize_base_4bit(adapter, r"language_model\.model\.layers\.\d+\.mlp_moe_gen\..*", make=FakeNF4Linear)
    layers = adapter.bagel.arch.llm.num_hidden_layers
    assert len(replaced) == layers * len(LAYER_LINEARS) * 2  # both experts' projections, nothing else
    assert all(re.search(r"layers\.\d+\.(self_attn|mlp)", n) for n in replaced)
    assert not any(n.startswith(("lm_head", "llm2vae", "vae2llm", "connector", "vit_model")) for n in replaced)
    assert set(adapter.model.state_dict()) == names_before  # same names: LoRA patterns and checkpoints still fit
    assert not any(p.requires_grad for p in adapter.model.parameters())  # the quantised base is frozen
    torch.manual_seed(1)
    quantised = adapter.losses(batch)
    assert abs(float(quantised["text"].detach()) - float(ref["text"].detach())) < 0.5  # rounded weights, close outputs
    # LoRA wraps the quantised layers (peft accepts any Linear subclass), and only LoRA weights train
    gen_regex = "|".join(adapter.lora_targets("generation"))
    adapter.model = get_peft_model(adapter.model, LoraConfig(r=4, lora_alpha=8, target_modules=gen_regex))
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "_moe_gen" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    adapter.model.train()
    for _ in range(2):
        loss = adapter.losses(batch)["image"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)


def test_replace_linears_skips_non_matching_and_already_replaced():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert replace_linears(model, r"1\.0", FakeNF4Linear) == ["1.0"]
    assert isinstance(model[1][0], FakeNF4Linear) and type(model[0]) is torch.nn.Linear
    assert replace_linears(model, r"1\.0", FakeNF4Linear) == []  # a replaced layer is not a plain Linear


def without_bitsandbytes(monkeypatch):
    """This process cannot import bitsandbytes (as on a machine without it installed)."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_qlora_without_bitsandbytes_fails_early_naming_the_key_and_the_fix(tmp_path, capsys, monkeypatch):
    without_bitsandbytes(monkeypatch)
    with pytest.raises(ConfigError) as err:
        check_finetune_runtime(finetune("qlora"))
    assert "finetune.mode: qlora" in str(err.value) and "pip install 'cmrp[qlora]'" in str(err.value)
    check_finetune_runtime(finetune("lora"))  # other modes pass
    adapter = build()
    with pytest.raises(ConfigError, match="finetune.mode: qlora"):
        apply_finetune(adapter, finetune("qlora"))
    assert not any(type(m).__name__ == "Linear4bit" for m in adapter.model.modules())  # untouched
    # `cmrp fit` refuses before building anything
    from cmrp import cli

    out = tmp_path / "run"
    rc = cli.main(["fit", "quickstart", "finetune.mode=qlora", f"output_dir={out}"])
    assert rc != 0 and "finetune.mode: qlora" in capsys.readouterr().err
    assert not out.exists()


def test_qlora_names_the_backends_own_error_when_4bit_layers_cannot_run(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import cmrp.training.peft as peft_module

    monkeypatch.setattr(peft_module, "nf4_runtime_error", lambda: "RuntimeError: no 4-bit kernel for this device")
    with pytest.raises(ConfigError) as err:
        check_finetune_runtime(finetune("qlora"))
    assert "no 4-bit kernel for this device" in str(err.value) and "finetune.mode: lora" in str(err.value)


def nf4_layers_or_skip():
    """bitsandbytes, when its 4-bit NF4 layers run on this machine (CUDA, or its CPU backend)."""
    bnb = pytest.importorskip("bitsandbytes")
    from cmrp.training.peft import nf4_runtime_error

    error = nf4_runtime_error()
    if error is not None:
        pytest.skip(f"bitsandbytes cannot run NF4 layers here: {error}")
    return bnb


def test_qlora_with_real_nf4_layers_trains_only_lora_weights():
    """The real bitsandbytes NF4 base (on the CPU backend without a GPU): the decoder's Linear layers are
    4-bit and frozen, outputs stay close to full precision, and LoRA on top learns."""
    bnb = nf4_layers_or_skip()
    adapter = build()
    batch = t2i_batch(adapter)
    adapter.model.eval()
    torch.manual_seed(1)
    ref = adapter.losses(batch)
    apply_finetune(adapter, finetune("qlora", "generation"))
    quantised = [m for m in adapter.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == adapter.bagel.arch.llm.num_hidden_layers * len(LAYER_LINEARS) * 2
    assert all(m.weight.dtype == torch.uint8 for m in quantised)  # packed 4-bit, not a float copy
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "_moe_gen" in n for n in trainable)
    torch.manual_seed(1)
    quantised_loss = adapter.losses(batch)
    assert abs(float(quantised_loss["text"].detach()) - float(ref["text"].detach())) < 0.5
    opt = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-2)
    adapter.model.train()
    losses = []
    for _ in range(8):
        torch.manual_seed(2)  # the same flow-matching noise every step: the loss must fall
        loss = adapter.losses(batch)["image"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses


# -- gradient checkpointing --------------------------------------------------------------------------
def _grads(adapter, batch) -> dict[str, torch.Tensor]:
    adapter.model.train()
    adapter.model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    losses = adapter.losses(batch)
    (losses["text"] + losses["image"]).backward()
    return {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}


def _count_layer_calls(adapter) -> list[int]:
    """How often the first decoder layer's understanding MLP runs (forward, and recomputation in backward)."""
    calls = [0]
    mlp = adapter.bagel.language_model.model.layers[0].mlp
    forward = mlp.forward

    def counted(x):
        calls[0] += 1
        return forward(x)

    mlp.forward = counted
    return calls


def test_gradient_checkpointing_gives_identical_gradients_and_recomputes():
    plain, ckpt = build(), build()
    apply_finetune(ckpt, finetune("full", gradient_checkpointing=True))
    apply_finetune(plain, finetune("full", gradient_checkpointing=False))
    assert ckpt.bagel.arch.gradient_checkpointing and not plain.bagel.arch.gradient_checkpointing
    calls_plain, calls_ckpt = _count_layer_calls(plain), _count_layer_calls(ckpt)
    g_plain, g_ckpt = _grads(plain, t2i_batch(plain)), _grads(ckpt, t2i_batch(ckpt))
    assert calls_plain[0] == 1 and calls_ckpt[0] == 2  # the layer ran again in backward
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 50
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ckpt[name], atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_in_grpo_logprobs_on_a_cached_prefix():
    """GRPO recomputes log-probs in eval mode on top of a cached prefix: checkpointing works there too."""
    from cmrp.data.tasks import Example, Segment

    grads = []
    for on in (False, True):
        adapter = build()
        adapter.set_gradient_checkpointing(on)
        adapter.model.eval()
        spec = SamplerSpec(steps=3, noise=0.7, window=(0, 2), guidance=Guidance(text_scale=2.0))
        rollout = adapter.sample_images([Example("t2i", [Segment("text", "user", "draw me")])], spec, n=2, seed=0)
        calls = _count_layer_calls(adapter)
        adapter.rollout_logprob(rollout, 1).sum().backward()
        grads.append({n: p.grad for n, p in adapter.model.named_parameters() if p.grad is not None})
        # re-encoded prefix (understanding trainable): with checkpointing each layer runs again in backward
        grads[-1]["_calls"] = torch.tensor(calls[0])
    assert int(grads[1].pop("_calls")) > int(grads[0].pop("_calls"))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


# -- bf16 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_steps_on_cpu(precision):
    import lightning as L
    from torch.utils.data import DataLoader

    from cmrp.training.sft import UnifiedSFTModule

    adapter = build()
    apply_finetune(adapter, finetune("full"))
    batch = t2i_batch(adapter)
    cfg = OmegaConf.create({"ce_weight": 1.0, "mse_weight": 1.0, "timestep_shift": 1.0,
                            "optimizer": {"name": "adamw", "lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0,
                                          "scheduler": "constant", "warmup_steps": 0}})
    module = UnifiedSFTModule(adapter, cfg, max_steps=2)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *_):
            losses.append(float(outputs["loss"]))

    before = adapter.model.language_model.model.layers[0].mlp.up_proj.weight.detach().float().clone()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision=precision, logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None, collate_fn=lambda b: b))
    after = adapter.model.language_model.model.layers[0].mlp.up_proj.weight
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, after.detach().float())
    assert after.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


# -- distributed strategies -------------------------------------------------------------------------------
def test_fsdp_wraps_one_unit_per_decoder_layer():
    from lightning.pytorch.strategies import DDPStrategy

    from cmrp.backbones.bagel.qwen2_mot import Qwen2MoTDecoderLayer
    from cmrp.training.sharding import ShardedStrategy
    from cmrp.training.trainer import trainer_strategy

    adapter = build()
    fsdp = trainer_strategy("fsdp", adapter)
    assert isinstance(fsdp, ShardedStrategy)
    # the ViT runs only for batches with images (not on every rank alike): it stays in the root unit
    assert fsdp.wrap_modules == (Qwen2MoTDecoderLayer,)
    # the wrapped class owns both experts' weights: an FSDP unit never splits a layer's MoT pair
    layer_params = {n for n, _ in adapter.model.language_model.model.layers[0].named_parameters()}
    assert "mlp.up_proj.weight" in layer_params and "mlp_moe_gen.up_proj.weight" in layer_params
    assert isinstance(trainer_strategy("ddp", adapter), DDPStrategy)
    assert trainer_strategy("auto") == "auto"
