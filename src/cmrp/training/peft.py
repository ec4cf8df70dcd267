"""Fine-tuning modes: LoRA / QLoRA adapters through `peft`, or full fine-tuning.

The adapter decides which modules LoRA targets (`Backbone.lora_targets`); this module only wraps.
LoRA adapters are saved in PEFT's own format so `peft.PeftModel.from_pretrained` loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmrp.errors import ConfigError

__all__ = ["apply_finetune", "base_name", "count_trainable", "freeze_to_groups", "is_peft", "save_adapter"]


def _target_regex(adapter: Any, targets: Any) -> str:
    if isinstance(targets, str):
        patterns = adapter.lora_targets(targets)
    else:
        patterns = [str(t) for t in targets]
    if not patterns:
        raise ConfigError("finetune.targets selects no modules")
    return "(?:" + "|".join(f"(?:{p})" for p in patterns) + ")"


def _quantize_linears_4bit(model: torch.nn.Module, regex: str) -> None:
    """Replace the targeted Linear layers with bitsandbytes 4-bit (NF4) layers: the QLoRA base."""
    import re

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "finetune.mode: qlora needs bitsandbytes: pip install 'cmrp[qlora]' (and a CUDA GPU)"
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError("finetune.mode: qlora needs a CUDA GPU (4-bit bitsandbytes layers); use lora on CPU")
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and re.fullmatch(regex, name):
            q = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None,
                compute_dtype=torch.bfloat16, quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, q.cuda())


def apply_finetune(adapter: Any, finetune: Any) -> None:
    """Make the adapter's model trainable according to `finetune` (a recipe's `finetune:` section)."""
    mode = finetune.mode
    if mode == "full":
        for p in adapter.model.parameters():
            p.requires_grad_(True)
        _freeze_fixed_tables(adapter.model)
        return
    if mode not in ("lora", "qlora"):
        raise ConfigError(f"finetune.mode: unknown mode {mode!r}; use lora, qlora or full")
    from peft import LoraConfig, get_peft_model

    regex = _target_regex(adapter, finetune.targets)
    if mode == "qlora":
        _quantize_linears_4bit(adapter.model, regex)
    config = LoraConfig(r=finetune.r, lora_alpha=finetune.alpha, lora_dropout=finetune.dropout, target_modules=regex)
    adapter.model = get_peft_model(adapter.model, config)


def _freeze_fixed_tables(model: torch.nn.Module) -> None:
    """Fixed sin-cos position tables are not trained (as in BAGEL)."""
    for name, p in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):
            p.requires_grad_(False)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_adapter(model: torch.nn.Module, directory: str | Path) -> Path:
    """Save a PEFT-wrapped model's adapter (adapter_model.safetensors + adapter_config.json)."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def base_name(name: str) -> str:
    """The backbone's own parameter name of a (possibly PEFT-wrapped) parameter; LoRA weights keep
    their module's name, e.g. `...q_proj_moe_gen.lora_A.default.weight` -> `...q_proj_moe_gen.lora_A...`."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer", "")


def freeze_to_groups(adapter: Any, groups: list[str]) -> list[str]:
    """Keep trainable only the parameters of the adapter's `trainable_groups()` named in `groups`
    (e.g. ["generation"]: the paper's GRPO trains the generation expert only). [] keeps everything.
    Returns the names left trainable; raises ConfigError when nothing is."""
    import re

    available = adapter.trainable_groups()
    if groups:
        unknown = [g for g in groups if g not in available]
        if unknown:
            raise ConfigError(f"grpo.train_groups: {unknown} unknown for this backbone; it has {sorted(available)}")
        pattern = re.compile("|".join(f"(?:{p})" for g in groups for p in available[g]))
        for name, p in adapter.model.named_parameters():
            if p.requires_grad and not pattern.fullmatch(base_name(name)):
                p.requires_grad_(False)
    trained = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    if not trained:
        raise ConfigError(
            f"grpo.train_groups {groups}: no trainable parameter is left (LoRA targets and train groups do not "
            "overlap); use finetune.targets: generation or default"
        )
    return trained

