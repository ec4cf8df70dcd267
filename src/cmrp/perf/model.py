"""Parameter counts of a BAGEL model as a recipe trains it, without memory: the model is built on the
meta device from the card's architecture (no weights, no tokenizer), and LoRA / QLoRA are counted
from the adapter's own target patterns — the regular expressions `apply_finetune` hands to PEFT — so
`cmrp plan` needs neither the checkpoint nor a GPU. The same counts can be read off a real (possibly
PEFT-wrapped) model, which the tests use to check the meta-device path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from cmrp.backbones.bagel import BagelAdapter
from cmrp.backbones.bagel.model import Bagel, BagelArch
from cmrp.errors import ConfigError
from cmrp.perf.flops import Trainable
from cmrp.perf.memory import ParamCounts
from cmrp.training.peft import _target_regex, base_name

__all__ = ["LoraSpec", "meta_adapter", "model_counts", "planned_counts"]

_DECODER_LAYER = re.compile(r"(?:base_model\.model\.)?language_model\.model\.layers\.(\d+)\.")
_VIT_LAYER = re.compile(r"(?:base_model\.model\.)?vit_model\.vision_model\.encoder\.layers\.(\d+)\.")
# frozen weights a backward still multiplies by (input gradients through the decoder and its heads)
_BACKWARD_LINEAR = re.compile(r"language_model\.(model\.layers\..*_proj(_moe_gen)?|lm_head)\.weight|llm2vae\.weight")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA as a recipe's `finetune` section asks for it: rank, targets (a name or patterns), 4-bit base."""

    rank: int
    targets: Any = "default"
    quantized: bool = False


def meta_adapter(card: Any):
    """A BAGEL adapter whose model lives on the meta device (sizes only); the card's `architecture`."""
    from omegaconf import DictConfig, OmegaConf

    if card.get("adapter") != "bagel":
        raise ConfigError(f"backbone card {card.get('name')!r}: `cmrp plan` estimates BAGEL backbones (adapter "
                          f"'bagel'); this card's adapter is {card.get('adapter')!r}")
    spec = card.get("architecture") or {}
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    try:
        arch = BagelArch.from_dict(spec)
    except TypeError as err:
        raise ConfigError(f"backbone card {card.get('name')!r}: bad architecture key ({err})") from None
    with torch.device("meta"):
        model = Bagel(arch)
    return BagelAdapter(model, None, card)


def _lora_modules(adapter: Any, targets: Any) -> list[tuple[str, int, int]]:
    """(name, in, out) of the Linear layers LoRA wraps for `targets` (PEFT matches the same regex)."""
    pattern = re.compile(_target_regex(adapter, targets))
    return [(n, m.in_features, m.out_features) for n, m in adapter.model.named_modules()
            if type(m) is torch.nn.Linear and pattern.fullmatch(n)]


def _base(name: str) -> str:
    return base_name(name)


def _units(names_numel: list[tuple[str, int]]) -> tuple[int, int]:
    """(largest FSDP unit, parameters outside every unit): one unit per decoder / SigLIP layer."""
    units: dict[tuple[str, str], int] = {}
    outside = 0
    for name, n in names_numel:
        m = _DECODER_LAYER.match(name) or _VIT_LAYER.match(name)
        if m:
            key = ("llm" if m.re is _DECODER_LAYER else "vit", m.group(1))
            units[key] = units.get(key, 0) + n
        else:
            outside += n
    return max(units.values(), default=0), outside


def model_counts(adapter: Any) -> tuple[ParamCounts, Trainable]:
    """Counts of a real model as it is now (its `requires_grad` flags, PEFT wrapping included)."""
    params = [(n, p) for n, p in adapter.model.named_parameters()]
    lora_a = [(n, p) for n, p in params if ".lora_A." in n]
    layer0 = [n for n, _ in lora_a if ".layers.0." in n and "language_model" in n]
    per_expert = max(sum("_moe_gen" in n for n in layer0), sum("_moe_gen" not in n for n in layer0))
    largest, outside = _units([(n, p.numel()) for n, p in params])
    counts = ParamCounts(
        total=sum(p.numel() for _, p in params),
        trainable=sum(p.numel() for _, p in params if p.requires_grad),
        quantized=0,
        autoencoder=sum(p.numel() for p in adapter.bagel.vae.parameters()),
        frozen_linear=sum(p.numel() for n, p in params if not p.requires_grad
                          and _BACKWARD_LINEAR.fullmatch(_base(n))),
        largest_unit=largest,
        lora_linears_per_layer=per_expert,
        lora_rank=int(lora_a[0][1].shape[0]) if lora_a else 0,
        unwrapped=outside,
    )
    return counts, Trainable.from_model(adapter.model)


def planned_counts(adapter: Any, *, mode: str, lora: LoraSpec | None = None,
                   train_groups: list[str] | None = None) -> tuple[ParamCounts, Trainable]:
    """Counts of the meta-device model once `finetune` (mode, LoRA spec) and, for GRPO, `train_groups`
    are applied — computed, not wrapped, so nothing is allocated and PEFT is not imported."""
    base = [(n, p) for n, p in adapter.model.named_parameters()]
    group = None
    if train_groups:
        available = adapter.trainable_groups()
        unknown = [g for g in train_groups if g not in available]
        if unknown:
            raise ConfigError(f"grpo.train_groups: {unknown} unknown for this backbone; it has {sorted(available)}")
        group = re.compile("|".join(f"(?:{p})" for g in train_groups for p in available[g]))
    lora_params: list[tuple[str, int]] = []
    if mode == "full":
        trainable = [(n, p.numel()) for n, p in base if not n.endswith("pos_embed.pos_embed")]
    elif mode in ("lora", "qlora"):
        if lora is None:
            raise ConfigError("finetune.mode lora/qlora needs finetune.r and finetune.targets")
        for name, fan_in, fan_out in _lora_modules(adapter, lora.targets):
            lora_params.append((f"{name}.lora_A.default.weight", lora.rank * fan_in))
            lora_params.append((f"{name}.lora_B.default.weight", lora.rank * fan_out))
        trainable = list(lora_params)
    else:
        raise ConfigError(f"finetune.mode: unknown mode {mode!r}; use lora, qlora or full")
    if group is not None:
        trainable = [(n, k) for n, k in trainable if group.fullmatch(n)]
        if not trainable:
            raise ConfigError(f"grpo.train_groups {train_groups}: no trainable parameter is left (LoRA targets and "
                              "train groups do not overlap); use finetune.targets: generation or default")
    trained = {n for n, _ in trainable}
    quantized = 0
    if mode == "qlora":
        # QLoRA's base: the default LoRA set (both experts' projections) and the chosen targets, in 4 bits
        names = {n for n, _, _ in _lora_modules(adapter, "default")} | {n for n, _, _ in _lora_modules(adapter, lora.targets)}
        quantized = sum(p.numel() for n, p in base if n.rsplit(".", 1)[0] in names and n.endswith("weight"))
    lora_names = [n for n, _ in lora_params if ".lora_A." in n and ".layers.0." in n and n in trained]
    per_expert = max(sum("_moe_gen" in n for n in lora_names), sum("_moe_gen" not in n for n in lora_names))
    largest, outside = _units([(n, p.numel()) for n, p in base] + lora_params)
    counts = ParamCounts(
        total=sum(p.numel() for _, p in base) + sum(k for _, k in lora_params),
        trainable=sum(k for _, k in trainable),
        quantized=quantized,
        autoencoder=sum(p.numel() for p in adapter.bagel.vae.parameters()),
        frozen_linear=sum(p.numel() for n, p in base if n not in trained and _BACKWARD_LINEAR.fullmatch(n)),
        largest_unit=largest,
        lora_linears_per_layer=per_expert,
        lora_rank=lora.rank if lora is not None and mode != "full" else 0,
        unwrapped=outside,
    )
    return counts, _planned_trainable(mode, lora, trained)


def _planned_trainable(mode: str, lora: LoraSpec | None, trained: set[str]) -> Trainable:
    def has(pattern: str) -> bool:
        return any(re.match(pattern, n) for n in trained)

    layers = r"language_model\.model\.layers\.\d+\.(self_attn|mlp)"

    def kind(gen: bool) -> str:
        names = [n for n in trained if re.match(layers, n) and ("_moe_gen" in n) == gen and "norm" not in n]
        if not names:
            return "frozen"
        return "lora" if mode != "full" else "full"

    return Trainable(und=kind(False), gen=kind(True), embed=has(r"language_model\.model\.embed_tokens"),
                     lm_head=has(r"language_model\.lm_head"), vit=has(r"vit_model\."), connector=has(r"connector\."),
                     gen_io=has(r"(vae2llm|llm2vae|time_embedder)\."),
                     lora_rank=lora.rank if lora is not None and mode != "full" else 0)
