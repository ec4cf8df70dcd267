"""`cmrp fit RECIPE [key=value ...]`."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="train a character from a recipe (Unified-SFT, then Character-GRPO)",
        description="Run a recipe's stages, tracked in MLflow. RECIPE is a path or a shipped recipe name "
        "(see `cmrp ls recipes`); overrides are dotted keys, e.g. trainer.max_steps=50 finetune.mode=full.",
    )
    p.add_argument("recipe", help="recipe YAML path or shipped recipe name, e.g. quickstart")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys")
    p.set_defaults(handler=_fit)


def _fit(args: argparse.Namespace) -> int:
    from cmrp.config import load_recipe
    from cmrp.training.fit import run_fit

    cfg = load_recipe(args.recipe, args.overrides)
    result = run_fit(cfg)
    if not result.run_id:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    before, after = result.metrics["before"], result.metrics["after"]
    print(f"character:      {result.metrics['character']}")
    for key in after:
        print(f"{key + ':':<16}{before[key]:.3f} -> {after[key]:.3f}")
    if "loss_drop" in result.metrics:
        m = result.metrics
        change = f"{100 * abs(m['loss_drop']):.0f}% {'lower' if m['loss_drop'] >= 0 else 'higher'}"
        print(f"train/loss:     {m['loss_first']:.3f} -> {m['loss_last']:.3f} ({change})")
    if "grpo" in result.metrics:
        g = result.metrics["grpo"]
        b, a = g["heldout_reward_before"].get("total", float("nan")), g["heldout_reward_after"].get("total", float("nan"))
        print(f"grpo reward:    {b:.3f} -> {a:.3f} (held-out prompts)")
    print(f"MLflow run:     {result.run_id} in {result.tracking_uri}")
    print(f"  browse with:  mlflow ui --backend-store-uri {result.tracking_uri}")
    if result.grid_path is not None:
        print(f"sample grid:    {result.grid_path}")
    print(f"checkpoint:     {result.checkpoint_dir}")
    print(f"metrics:        {result.output_dir / 'metrics.json'}")
    print(f"time:           {result.timings['total_s']:.0f} s")
    return 0
