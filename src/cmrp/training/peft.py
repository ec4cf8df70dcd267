"""Fine-tuning modes: LoRA / QLoRA adapters through `peft`, or full fine-tuning.

The adapter decides which modules LoRA targets (`Backbone.lora_targets`: `generation`,
`understanding` or `default` = both experts); this module only wraps. QLoRA first swaps the base's
Linear layers for frozen bitsandbytes NF4 layers (`replace_linears` + `linear_4bit`): on a CUDA GPU, or
on the CPU where the installed bitsandbytes has a CPU backend for 4-bit layers (checked up front by
`check_finetune_runtime`, which builds and runs one tiny NF4 layer). `finetune.gradient_checkpointing` switches per-layer activation
recomputation through the adapter. LoRA adapters are saved in PEFT's own format so
`peft.PeftModel.from_pretrained` loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from cmrp.backbones.protocol import Backbone, SupportsGradientCheckpointing, require
from cmrp.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [
    "apply_finetune",
    "base_name",
    "check_finetune_runtime",
    "count_trainable",
    "freeze_to_groups",
    "is_peft",
    "linear_4bit",
    "nf4_runtime_error",
    "quantize_base_4bit",
    "replace_linears",
    "save_adapter",
]


def _target_regex(adapter: Backbone, targets: Any) -> str:
    if isinstance(targets, str):
        patterns = adapter.lora_targets(targets)
    else:
        patterns = [str(t) for t in targets]
    if not patterns:
        raise ConfigError("finetune.targets selects no modules")
    return "(?:" + "|".join(f"(?:{p})" for p in patterns) + ")"


def _nf4_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def nf4_runtime_error() -> str | None:
    """Why this machine cannot run bitsandbytes' NF4 layers (None when it can): one tiny 4-bit layer is
    built, quantised on the device QLoRA would use (CUDA, else the CPU backend) and run forward and
    backward. The message is bitsandbytes' own."""
    try:
        layer = linear_4bit(torch.nn.Linear(64, 64))
        x = torch.randn(2, 64, device=_nf4_device(), requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "the 4-bit layer gave no finite gradient"
    except ImportError:
        raise
    except Exception as err:  # whatever the backend raises: its own words go into the message
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def check_finetune_runtime(finetune: Any) -> None:
    """Fail before anything is built when this machine cannot run the fine-tuning mode: QLoRA's 4-bit base
    needs bitsandbytes with NF4 layers on a CUDA GPU or on its CPU backend."""
    if finetune.mode != "qlora":
        return
    try:
        import bitsandbytes  # noqa: F401

        error = nf4_runtime_error()
    except ImportError:
        raise ConfigError(
            "finetune.mode: qlora needs bitsandbytes: pip install 'cmrp[qlora]' (or use finetune.mode: lora)"
        ) from None
    if error is not None:
        where = "the CUDA GPU" if torch.cuda.is_available() else "the CPU (no CUDA GPU is visible)"
        raise ConfigError(
            f"finetune.mode: qlora: bitsandbytes cannot run 4-bit NF4 layers on {where}: {error}. Use "
            "finetune.mode: lora (the same adapters on a full-precision base), a bitsandbytes with a CPU backend, "
            "or a CUDA machine."
        )


def replace_linears(model: torch.nn.Module, regex: str, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> list[str]:
    """Swap every `nn.Linear` whose qualified name matches `regex` for `make(linear)` in place (same
    name, so state-dict keys and LoRA target patterns still match). Returns the replaced names."""
    import re

    pattern = re.compile(regex)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and pattern.fullmatch(name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, make(module))
            replaced.append(name)
    return replaced


def linear_4bit(module: torch.nn.Linear, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A bitsandbytes NF4 copy of a Linear layer (frozen): QLoRA's base layer, on the GPU (computing in
    bfloat16 by default) or, without one, on the CPU backend (float32)."""
    import bitsandbytes as bnb

    device = _nf4_device()
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    if module.bias is not None:
        q.bias = torch.nn.Parameter(module.bias.data.cpu(), requires_grad=False)
    return q.to(device)  # quantisation happens on this move


def quantize_base_4bit(adapter: Backbone, targets_regex: str,
                       make: Callable[[torch.nn.Linear], torch.nn.Module] = linear_4bit) -> list[str]:
    """QLoRA's base: every Linear of the adapter's default LoRA set (both experts' projections) and of the
    chosen targets becomes 4-bit and frozen; embeddings, norms and heads stay as they are."""
    regex = "(?:" + "|".join([_target_regex(adapter, "default"), targets_regex]) + ")"
    replaced = replace_linears(adapter.model, regex, make)
    if not replaced:
        raise ConfigError("finetune.mode: qlora found no Linear layer to quantise among finetune.targets")
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    return replaced


def apply_finetune(adapter: Backbone, finetune: Any) -> None:
    """Make the adapter's model trainable according to `finetune` (a recipe's `finetune:` section)."""
    mode = finetune.mode
    checkpointing = finetune.get("gradient_checkpointing") if hasattr(finetune, "get") else None
    if checkpointing is not None:
        require(adapter, SupportsGradientCheckpointing,
                feature="finetune.gradient_checkpointing").set_gradient_checkpointing(bool(checkpointing))
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
        check_finetune_runtime(finetune)
        quantize_base_4bit(adapter, regex)
    config = LoraConfig(r=finetune.r, lora_alpha=finetune.alpha, lora_dropout=finetune.dropout, target_modules=regex)
    try:
        adapter.model = get_peft_model(adapter.model, config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        if "not found" not in str(err):
            raise
        raise ConfigError(f"finetune.targets {finetune.targets!r} matches no module of this backbone (patterns "
                          f"{regex}); use a target set of the card (default, generation, understanding) or fix "
                          "the patterns") from None


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
    cast("PeftModel", model).save_pretrained(str(directory), safe_serialization=True)  # LoRA modes wrap it in PEFT
    return directory


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def base_name(name: str) -> str:
    """The backbone's own parameter name of a (possibly PEFT-wrapped) parameter; LoRA weights keep
    their module's name, e.g. `...q_proj_moe_gen.lora_A.default.weight` -> `...q_proj_moe_gen.lora_A...`."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer", "")


def freeze_to_groups(adapter: Backbone, groups: list[str]) -> list[str]:
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

