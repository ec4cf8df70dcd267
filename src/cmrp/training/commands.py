"""`cmrp fit RECIPE [key=value ...] [--resume]` (flags and overrides in any order) and `cmrp tracking sync OUTPUT_DIR`."""

from __future__ import annotations

import argparse

from cmrp.config.commands import add_recipe_arguments
from cmrp.tracking import browse_hint, sync_pending
from cmrp.training.storage import writing

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="train a character from a recipe (Unified-SFT, then Character-GRPO)",
        description="Run a recipe's stages, tracked in MLflow. RECIPE is a path or a shipped recipe name "
        "(see `cmrp ls recipes`); overrides are dotted keys, e.g. trainer.max_steps=50 finetune.mode=full.",
    )
    add_recipe_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the latest valid checkpoint in <output_dir>/resume (same as resume=auto); "
                   "give the same recipe and overrides as the interrupted run")
    p.set_defaults(handler=_fit)

    t = subparsers.add_parser(
        "tracking",
        help="tracking utilities (upload what a run could not log)",
        description="When the tracking server fails, `cmrp fit` (and `cmrp eval`) goes on and writes what it "
        "could not log to <output_dir>/tracking/pending.jsonl; `cmrp tracking sync` uploads it.",
    )
    sub = t.add_subparsers(dest="tracking_command", metavar="SUBCOMMAND")
    sub.required = True
    s = sub.add_parser("sync", help="upload a run's pending tracking records to MLflow",
                       description="Upload <output_dir>/tracking/pending.jsonl (params, metrics, artifacts, status) "
                       "to the run it belongs to (created if the server never saw it), and pending-*.jsonl kept "
                       "from earlier runs in the same folder; each file is then renamed synced-<time>-*.jsonl so "
                       "nothing is uploaded twice. Rows the run already holds (a resumed run's replayed steps) "
                       "are not uploaded again.")
    s.add_argument("output_dir", help="the run's output directory")
    s.add_argument("--tracking-uri", default=None,
                   help="where to upload (default: the URI the run used, recorded in the file)")
    s.set_defaults(handler=_sync)


def grpo_reward_line(grpo: dict) -> str:
    """The summary's GRPO line: the held-out composite before -> after, or why it was not measured."""
    before, after = grpo["heldout_reward_before"], grpo["heldout_reward_after"]
    if "total" not in before or "total" not in after:
        return ("grpo reward:    not measured (no held-out image prompt: grpo.heldout_prompts, by default "
                "eval.grid_prompts, is 0 or the test split has none)")
    return f"grpo reward:    {before['total']:.4f} -> {after['total']:.4f} (held-out prompts)"


def _fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cmrp.config import load_recipe  # omegaconf: only when a recipe is read
    from cmrp.training.fit import run_fit

    overrides = [*args.overrides, "resume=auto"] if args.resume else args.overrides
    cfg = load_recipe(args.recipe, overrides)
    with writing(Path(cfg.output_dir)):  # a full disk or read-only mount mid-run: one clear error
        result = run_fit(cfg)  # checks what `cmrp validate` checks (and this machine) before any work
    if not result.main:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    before, after = result.metrics["before"], result.metrics["after"]
    print(f"character:      {result.metrics['character']}")
    for key in after:
        print(f"{key + ':':<19}{before[key]:.3f} -> {after[key]:.3f}")
    if "loss_drop" in result.metrics:
        m = result.metrics
        change = f"{100 * abs(m['loss_drop']):.0f}% {'lower' if m['loss_drop'] >= 0 else 'higher'}"
        print(f"train/loss:     {m['loss_first']:.3f} -> {m['loss_last']:.3f} ({change})")
    if "grpo" in result.metrics:
        print(grpo_reward_line(result.metrics["grpo"]))

    uri = result.tracking_uri  # redacted: the run never returns the real one
    if result.resumed_from is not None:
        print(f"resumed from:   {result.resumed_from}")
    print(f"MLflow run:     {result.run_id or '(not created: server unreachable)'} in {uri}")
    if result.tracking_pending is not None:
        print(f"  not logged:   {result.tracking_pending} — upload with: cmrp tracking sync {result.output_dir}")
    else:
        print(f"  browse with:  {browse_hint(uri, result.experiment_id, result.run_id)}")
    if result.grid_path is not None:
        print(f"sample grid:    {result.grid_path}")
    print(f"checkpoint:     {result.checkpoint_dir}")
    print(f"metrics:        {result.output_dir / 'metrics.json'}")
    print(f"time:           {result.timings['total_s']:.0f} s")
    return 0


def _sync(args: argparse.Namespace) -> int:
    for done in sync_pending(args.output_dir, args.tracking_uri):
        print(f"{done['file'].name}: uploaded to run {done['run_id']} in {done['tracking_uri']}: {done['params']} "
              f"params, {done['metrics']} metric values, {done['artifacts']} artifacts"
              + (f", status {done['status']}" if done["status"] else ""))
        if done["missing_artifacts"]:
            print(f"  missing artifact files (not uploaded): {', '.join(done['missing_artifacts'])}")
        if done["damaged_lines"]:
            print(f"  skipped {done['damaged_lines']} damaged line(s) (cut short by a crash)")
        print(f"  records archived as {done['archived_as']}")
        print(f"  browse with: {browse_hint(done['tracking_uri'], done['experiment_id'], done['run_id'])}")
    return 0
