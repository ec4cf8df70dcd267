"""`cmrp plan RECIPE [key=value ...]`: parameters, per-GPU memory and FLOPs of a recipe, before launching it."""

from __future__ import annotations

import argparse

from cmrp.config.commands import add_recipe_arguments

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate a recipe's parameters, per-GPU memory and FLOPs without weights or GPUs",
        description="Build the recipe's backbone on the meta device (no memory, no weights), apply its fine-tuning "
        "mode, and estimate per-GPU memory (weights, gradients, optimiser states, activations with and without "
        "gradient checkpointing) for its precision and strategy (DDP or FSDP) over --gpus x --nodes GPUs, for the "
        "longest sequence a batch may hold; say whether it fits --gpu-memory. BAGEL backbones.",
    )
    add_recipe_arguments(p, "bagel/sft", "data.batch_size=2 trainer.strategy=fsdp")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: trainer.devices, 8 when auto)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB, 24GiB (default 80GB)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens of the longest sequence (default: 2 x data.max_text_tokens)")
    p.add_argument("--understood-images", type=int, default=None,
                   help="understood images in it, at the largest ViT size (default: 1 when the vqa task is on)")
    p.add_argument("--generated-images", type=int, default=None,
                   help="generated images in it (default: 1 when the t2i task is on)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (every term in bytes)")
    p.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    import json

    from cmrp.config import load_recipe  # omegaconf: only when a recipe is read
    from cmrp.perf.plan import parse_memory, plan_as_json, plan_recipe, render_plan

    gpu_memory = parse_memory(args.gpu_memory)
    cfg = load_recipe(args.recipe, args.overrides)
    plan = plan_recipe(cfg, gpus=args.gpus, nodes=args.nodes, text_tokens=args.text_tokens,
                       understood_images=args.understood_images, generated_images=args.generated_images)
    if args.json:
        print(json.dumps(plan_as_json(plan, gpu_memory), indent=2))
    else:
        print(render_plan(plan, gpu_memory))
    return 0
