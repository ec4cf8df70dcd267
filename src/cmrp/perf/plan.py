"""`cmrp plan`: will a recipe fit, before anything is launched.

The recipe's backbone is built on the meta device (sizes only), its fine-tuning mode applied as counts
(`cmrp.perf.model`), and each training stage's per-GPU memory estimated (`cmrp.perf.memory`) for the
recipe's precision and strategy over the chosen number of GPUs, for the longest sequence a batch may
hold (assumed; every term is printed so it can be checked). FLOPs per step come from `cmrp.perf.flops`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from cmrp.config.loader import resolve_recipe_parts
from cmrp.errors import ConfigError
from cmrp.perf.flops import (
    RolloutShape,
    SFTLayout,
    grpo_iteration_flops,
    guided_steps,
    latent_tokens,
    sft_step_flops,
)
from cmrp.perf.memory import (
    GB,
    MemoryEstimate,
    Precision,
    SequenceShape,
    Strategy,
    estimate_memory,
    grpo_update_shape,
)
from cmrp.perf.model import LoraSpec, meta_adapter, planned_counts

__all__ = ["StagePlan", "parse_memory", "plan_as_json", "plan_recipe", "render_plan"]

DEFAULT_GPUS_PER_NODE = 8  # when trainer.devices is `auto`
_EMPTY_TURN = 4  # tokens of the unconditional context (bos, role header, eos), about


@dataclass
class StagePlan:
    stage: str
    trainable: int
    shape: SequenceShape
    memory: MemoryEstimate
    flops: float  # per GPU per step (SFT) or per iteration (GRPO)
    describe: str  # the assumed sequence, in words


def parse_memory(text: str) -> float:
    """'80GB', '80 GB', '80G', '141GiB', '80' (GB) -> bytes. GB = 10^9 bytes, GiB = 2^30."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|G|GIB|TB|MB|MIB)?\s*", str(text).upper())
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 80GB, 141GB or 24GiB")
    value, unit = float(m.group(1)), m.group(2) or "GB"
    return value * {"GB": 1e9, "G": 1e9, "GIB": 2**30, "TB": 1e12, "MB": 1e6, "MIB": 2**20}[unit]


def _world(trainer: Any, gpus: int | None, nodes: int | None) -> tuple[int, int, str]:
    note = ""
    if gpus is None:
        devices = trainer.devices
        if isinstance(devices, int) and devices > 0:
            gpus = devices
        elif isinstance(devices, list | tuple) or str(devices).startswith("["):
            gpus = len(list(devices))
        else:
            gpus = DEFAULT_GPUS_PER_NODE
            note = f"trainer.devices is {devices!r}: assuming {gpus} GPUs per node (--gpus to change)"
    nodes = int(trainer.num_nodes) if nodes is None else nodes
    if gpus < 1 or nodes < 1:
        raise ConfigError(f"--gpus and --nodes must be at least 1 (got {gpus} and {nodes})")
    return int(gpus), int(nodes), note


def _sft_shape(adapter, cfg, text_tokens: int | None, understood: int | None, generated: int | None
               ) -> tuple[SequenceShape, str]:
    """The padded batch of one SFT step. By default the batch mixes the recipe's image tasks — every
    sequence holds `text_tokens` of text and one image, understood (vqa) or generated (t2i) in turn —
    and is padded to its longest sequence; `understood` / `generated` put that many of each in every
    sequence instead."""
    arch = adapter.arch
    tasks = {t for t, w in dict(cfg.data.tasks).items() if float(w) > 0}
    text = int(text_tokens if text_tokens is not None else 2 * cfg.data.max_text_tokens)
    side = int(arch.vit_resize[1]) if arch.vit_resize else arch.vit.image_size
    patches = (side // arch.vit.patch_size) ** 2
    gen = latent_tokens(arch, (adapter.image_size, adapter.image_size))
    batch = int(cfg.data.batch_size)
    if understood is None and generated is None:
        kinds = [k for k, on in (("u", arch.visual_und and "vqa" in tasks), ("g", arch.visual_gen and "t2i" in tasks)) if on]
        per_seq = [((kinds[i % len(kinds)] == "u"), (kinds[i % len(kinds)] == "g")) if kinds else (0, 0)
                   for i in range(batch)]
        mix = " or ".join({"u": "an understood image", "g": "a generated image"}[k] for k in kinds)
        each = f", each with {mix}" if kinds else ""
    else:
        per_seq = [(int(understood or 0), int(generated or 0))] * batch
        each = f", each with {understood or 0} understood and {generated or 0} generated image(s)"
    lengths = [text + u * (patches + 2) + g * (gen + 2) for u, g in per_seq]
    shape = SequenceShape(batch=batch, length=max(lengths), gen_tokens=gen * sum(g for _, g in per_seq),
                          labelled=batch * (text // 2), vit_patches=(patches,) * sum(u for u, _ in per_seq),
                          gen_images=sum(g for _, g in per_seq), gen_hw=(adapter.image_size, adapter.image_size))
    sizes = f"understood images {side} px = {patches:,} ViT tokens, generated {adapter.image_size} px = {gen:,} latent tokens"
    return shape, f"{batch} sequences padded to {max(lengths):,} tokens ({text:,} text{each}; {sizes})"


def _finetune(cfg) -> tuple[str, Any]:
    ft = cfg.finetune
    if ft.mode == "full":
        return "full", None
    targets = ft.targets if isinstance(ft.targets, str) else [str(t) for t in ft.targets]
    return str(ft.mode), LoraSpec(int(ft.r), targets, quantized=ft.mode == "qlora")


def _sft_stage(adapter, cfg, precision, strategy, checkpointing, seq_args) -> StagePlan:
    mode, lora = _finetune(cfg)
    counts, train = planned_counts(adapter, mode=mode, lora=lora)
    shape, describe = _sft_shape(adapter, cfg, *seq_args)
    memory = estimate_memory(adapter.arch, counts, shape, precision=precision, strategy=strategy, train=train,
                             optimizer=cfg.sft.optimizer.name)
    layout = SFTLayout(und_tokens=shape.tokens - shape.gen_tokens, gen_tokens=shape.gen_tokens,
                       attention_pairs=shape.batch * shape.length**2, labelled=shape.labelled,
                       vit_patches=shape.vit_patches, gen_images=shape.gen_images, gen_hw=shape.gen_hw)
    flops = sft_step_flops(adapter.arch, layout, train, checkpointing=checkpointing).total
    return StagePlan("sft", counts.trainable, shape, memory, flops, describe)


def _grpo_stage(adapter, cfg, precision, strategy, checkpointing, text_tokens: int | None) -> StagePlan:
    g = cfg.grpo
    arch = adapter.arch
    mode, lora = _finetune(cfg)
    counts, train = planned_counts(adapter, mode=mode, lora=lora, train_groups=list(g.train_groups))
    prefix = int(text_tokens if text_tokens is not None else 2 * cfg.data.max_text_tokens)
    branches = 2 if float(g.cfg_scale) != 1.0 else 1
    hw = (adapter.image_size, adapter.image_size)
    shape = grpo_update_shape(arch, minibatch=int(g.minibatch_size), branches=branches, prefix_tokens=prefix,
                              image_hw=hw)
    memory = estimate_memory(arch, counts, shape, precision=precision, strategy=strategy, train=train,
                             optimizer=g.optimizer.name)
    # sampling (no gradients): the group's expanded prefix caches, twice (guidance branches are concatenated)
    llm = arch.llm
    cache = llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * prefix * precision.compute_bytes
    rollout = 2 * cache * int(g.group_size) * branches
    memory = replace(memory, transient=max(memory.transient, rollout))
    shift = float(g.timestep_shift if g.timestep_shift is not None else arch.timestep_shift)
    steps = int(g.sample_steps)
    rollout_shape = RolloutShape(int(g.prompts_per_step), int(g.group_size), steps, prefix, hw, branches=branches,
                                 guided=guided_steps(steps, shift, tuple(g.cfg_interval)) if branches > 1 else 0,
                                 uncond_tokens=(_EMPTY_TURN,) if branches > 1 else ())
    parts = grpo_iteration_flops(arch, rollout_shape, train, window=min(int(g.window_size), steps),
                                 inner_epochs=int(g.inner_epochs), minibatch=int(g.minibatch_size),
                                 kl=float(g.kl_beta) > 0, checkpointing=checkpointing)
    flops = parts["rollout"].total + parts["update"].total
    latent = latent_tokens(arch, hw)
    describe = (f"{g.minibatch_size} samples x {branches} guidance branch{'es' * (branches > 1)} x {latent + 2:,} "
                f"image-block tokens over a {prefix}-token prompt; G = {g.group_size}, {steps} steps")
    return StagePlan("grpo", counts.trainable, shape, memory, flops, describe)


def plan_recipe(cfg: Any, *, gpus: int | None = None, nodes: int | None = None, text_tokens: int | None = None,
                understood_images: int | None = None, generated_images: int | None = None) -> dict[str, Any]:
    """Everything `cmrp plan` prints, as data."""
    card, _ = resolve_recipe_parts(cfg)
    adapter = meta_adapter(card)
    arch = adapter.arch
    ft = cfg.finetune
    checkpointing = bool(arch.gradient_checkpointing if ft.gradient_checkpointing is None else ft.gradient_checkpointing)
    gpus, nodes, note = _world(cfg.trainer, gpus, nodes)
    precision = Precision.parse(cfg.trainer.precision)
    strategy = Strategy.parse(cfg.trainer.strategy, gpus * nodes)
    total = sum(p.numel() for p in adapter.model.parameters())
    vae = sum(p.numel() for p in adapter.bagel.vae.parameters())
    stages = []
    for stage in cfg.stages:
        if stage == "sft":
            stages.append(_sft_stage(adapter, cfg, precision, strategy, checkpointing,
                                     (text_tokens, understood_images, generated_images)))
        elif stage == "grpo":
            stages.append(_grpo_stage(adapter, cfg, precision, strategy, checkpointing, text_tokens))
    return {"recipe": cfg.name, "backbone": card.name, "finetune": ft.mode, "precision": precision.name,
            "strategy": strategy.kind, "gpus": gpus, "nodes": nodes, "checkpointing": checkpointing,
            "parameters": total, "autoencoder_parameters": vae, "stages": stages, "notes": [note] if note else []}


def plan_as_json(plan: dict[str, Any], gpu_memory: float) -> dict[str, Any]:
    """`cmrp plan --json`: the plan with every memory term in bytes and the fit verdicts."""
    out = {k: v for k, v in plan.items() if k != "stages"}
    out["gpu_memory"] = gpu_memory
    out["stages"] = []
    for st in plan["stages"]:
        memory = st.memory.as_dict()
        out["stages"].append({
            "stage": st.stage, "trainable": st.trainable, "batch": st.describe, "flops": st.flops,
            "memory": memory, "fits": memory["peak_checkpointed" if plan["checkpointing"] else "peak"] <= gpu_memory,
        })
    return out


def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB" if x >= 0.1 * GB else f"{x / 1e6:,.1f} MB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render_plan(plan: dict[str, Any], gpu_memory: float) -> str:
    """The human-readable report; says for each stage whether it fits `gpu_memory` bytes per GPU."""
    world = plan["gpus"] * plan["nodes"]
    lines = [
        f"recipe {plan['recipe']}: backbone {plan['backbone']}, finetune {plan['finetune']}, {plan['precision']}, "
        f"{plan['strategy']} over {world} GPU{'s' * (world > 1)} ({plan['nodes']} node{'s' * (plan['nodes'] > 1)} x "
        f"{plan['gpus']}), gradient checkpointing {'on' if plan['checkpointing'] else 'off'}",
        f"parameters: {_count(plan['parameters'])}"
        + (f" (+ {_count(plan['autoencoder_parameters'])} frozen autoencoder)" if plan["autoencoder_parameters"] else ""),
    ]
    lines += [f"note: {n}" for n in plan["notes"]]
    for st in plan["stages"]:
        m = st.memory
        share = 100 * st.trainable / max(1, plan["parameters"])
        lines += ["", f"stage {st.stage}: {_count(st.trainable)} trainable ({share:.2f} %); batch per GPU: {st.describe}"]
        rows = [("weights", m.weights), ("gradients", m.gradients), ("optimiser states", m.optimizer),
                ("compute copies", m.compute_copies_checkpointed if plan["checkpointing"] else m.compute_copies),
                ("activations, checkpointing on", m.activations_checkpointed),
                ("activations, checkpointing off", m.activations)]
        if m.transient:
            rows.append(("outside the graph (VAE / sampling)", m.transient))
        width = max(len(r[0]) for r in rows)
        lines += [f"  {name:<{width}}  {_gb(v):>10}" for name, v in rows]
        for ckpt in (True, False):
            peak = m.peak(ckpt)
            verdict = "fits in" if peak <= gpu_memory else "does NOT fit in"
            chosen = "   <- the recipe's setting" if ckpt == plan["checkpointing"] else ""
            lines.append(f"  peak with checkpointing {'on: ' if ckpt else 'off:'} {_gb(peak)} per GPU, {verdict} "
                         f"{_gb(gpu_memory)}{chosen}")
        unit = "step" if st.stage == "sft" else "iteration"
        amount = f"{st.flops / 1e12:,.1f} TFLOP" if st.flops >= 1e11 else f"{st.flops / 1e9:,.2f} GFLOP"
        what = "forward + backward" if st.stage == "sft" else "rollout + update"
        lines.append(f"  compute: {amount} per GPU per {unit} ({what})")
    lines += ["", "GB = 10^9 bytes. Not counted: CUDA context and allocator fragmentation (~1-3 GB), NCCL buffers."]
    return "\n".join(lines)
