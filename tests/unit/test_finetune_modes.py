"""LoRA trains only adapter weights and saves in PEFT's format; full mode trains the base."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.backbones.bagel import BagelAdapter
from cmrp.errors import ConfigError
from cmrp.training.peft import apply_finetune, count_trainable, save_adapter
from cmrp.training.sft import build_optimizer
from tests.unit.test_bagel import CORPUS, examples, image_paths, small_card  # noqa: F401 - fixture reuse


def finetune(mode: str, targets="default"):
    return OmegaConf.create({"mode": mode, "r": 4, "alpha": 8, "dropout": 0.0, "targets": targets})


def train_steps(adapter, batch, steps=3):
    opt = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-2)
    adapter.model.train()
    for _ in range(steps):
        losses = adapter.losses(batch)
        opt.zero_grad()
        (losses["text"] + losses["image"]).backward()
        opt.step()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build():
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(), corpus=CORPUS)
    torch.nn.init.normal_(a.model.llm2vae.weight, std=0.02)
    return a


def test_lora_changes_only_lora_weights_and_saves_adapter_keys(image_paths, tmp_path):  # noqa: F811
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = build()
    base_copy = build().model
    apply_finetune(adapter, finetune("lora"))
    trainable, total = count_trainable(adapter.model)
    assert 0 < trainable < total / 5
    assert all("lora_" in n for n, p in adapter.model.named_parameters() if p.requires_grad)
    before = snapshot(adapter.model)
    batch = adapter.collate(examples(image_paths))
    train_steps(adapter, batch)
    after = snapshot(adapter.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    # both experts are targeted by default
    assert any("_moe_gen" in k for k in changed) and any("mlp.gate_proj" in k for k in changed)

    out = save_adapter(adapter.model, tmp_path / "adapter")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    # peft itself loads it onto a fresh base and reproduces the trained model's outputs
    loaded = PeftModel.from_pretrained(base_copy, str(out))
    loaded.eval()
    adapter.model.eval()
    fresh = BagelAdapter(loaded, adapter.tokenizer)
    exs = examples(image_paths)[:2]
    assert torch.allclose(fresh.score_text(exs), adapter.score_text(exs), atol=1e-5)


def test_lora_generation_targets_only_touch_generation_expert():
    adapter = build()
    apply_finetune(adapter, finetune("lora", targets="generation"))
    lora_names = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert lora_names and all("_moe_gen" in n for n in lora_names)


def test_full_mode_changes_base_weights(image_paths):  # noqa: F811
    adapter = build()
    apply_finetune(adapter, finetune("full"))
    before = snapshot(adapter.model)
    train_steps(adapter, adapter.collate(examples(image_paths)))
    after = snapshot(adapter.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "language_model.model.layers.0.mlp.gate_proj.weight" in changed
    assert "language_model.model.layers.0.mlp_moe_gen.gate_proj.weight" in changed
    assert "latent_pos_embed.pos_embed" not in changed  # fixed sin-cos table stays frozen


def test_qlora_without_bitsandbytes_fails_clearly(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    adapter = build()
    with pytest.raises(ConfigError, match="qlora"):
        apply_finetune(adapter, finetune("qlora"))


def test_unknown_lora_target_set():
    adapter = build()
    with pytest.raises(ConfigError, match="unknown LoRA target set 'vision'"):
        apply_finetune(adapter, finetune("lora", targets="vision"))


@pytest.mark.parametrize("kind,expected_mid,expected_end", [("constant", 1.0, 1.0), ("cosine", 0.5, 0.0), ("linear", 0.5, 0.0)])
def test_schedules(kind, expected_mid, expected_end):
    params = [torch.nn.Parameter(torch.zeros(1))]
    cfg = OmegaConf.create({"name": "adamw", "lr": 1.0, "betas": [0.9, 0.95], "weight_decay": 0.0,
                            "scheduler": kind, "warmup_steps": 10})
    opt, sched = build_optimizer(params, cfg, max_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # warmup starts at 1/10
    assert lrs[60] == pytest.approx(expected_mid, abs=0.02)
    assert lrs[-1] == pytest.approx(expected_end, abs=0.02)
