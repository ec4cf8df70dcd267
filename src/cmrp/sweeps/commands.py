"""`cmrp sweep SWEEP.yaml [KEY=VALUE ...] [--dry-run] [--launcher local|parallel|submitit] [--jobs N] [--out DIR]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmrp.config.yamlio import display_path
from cmrp.errors import ConfigError
from cmrp.sweeps.spec import load_sweep

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run an ablation grid (recipe variants x seeds: fit + eval per cell) and tabulate it",
        description="Run every cell of a sweep file (rows: the product of its axes; one cell per row and seed) "
        "through `cmrp fit` and `cmrp eval`, each cell a child run of one MLflow parent run, and write the "
        "comparison table: <out>/summary.md, report.html (mean ± std, 95 % intervals, paired per-seed deltas "
        "against the baseline row, the claims seed by seed, a plot per metric) and summary.json. Cells already "
        "done are skipped and half-finished ones resume (`cmrp fit --resume`), so an interrupted sweep is "
        "finished by running the same command again. The file format is in docs/sweeps.md.",
    )
    p.add_argument("sweep", metavar="SWEEP", help="sweep YAML path, or a shipped sweep name (recipes/sweeps/), e.g. sandbox")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe keys set in every cell after the sweep's own, e.g. trainer.max_steps=20 for a "
                   "quick check (use another --out: the cells' fingerprints change)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells (recipe, overrides, eval options, status) and run nothing")
    p.add_argument("--launcher", choices=("local", "parallel", "submitit"), default="local",
                   help="local (default): one cell at a time; parallel: --jobs cells at once on this machine, "
                   "threads per cell = cores // jobs; submitit: each wave of cells as a job array (SLURM, or "
                   "submitit's local executor), with the sweep file's `submitit:` parameters")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel: cells at once (default 2); submitit: array parallelism")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/sweeps/<name>)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: the file's)")
    p.add_argument("--rows", nargs="+", default=None,
                   help="only these rows (and the rows they start from); default: all")
    p.set_defaults(handler=_sweep)


def _launcher(args: argparse.Namespace, plan):
    from cmrp.sweeps.launchers import LocalLauncher, SubmititLauncher

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.launcher == "local":
        if args.jobs not in (None, 1):
            raise ConfigError("--launcher local runs one cell at a time; for --jobs N use --launcher parallel")
        return LocalLauncher(1)
    if args.launcher == "parallel":
        return LocalLauncher(args.jobs or 2)
    return SubmititLauncher(plan.out / "submitit", plan.sweep.submitit, array_parallelism=args.jobs)


def _sweep(args: argparse.Namespace) -> int:
    from cmrp.sweeps.plan import make_plan
    from cmrp.sweeps.run import describe_plan, run_sweep

    sweep = load_sweep(args.sweep)
    out = args.out or Path("runs") / "sweeps" / sweep.name
    plan = make_plan(sweep, out, seeds=args.seeds, rows=args.rows, overrides=args.overrides)
    if args.dry_run:
        describe = {"local": "local, one cell at a time", "parallel": f"parallel, {args.jobs or 2} cells at a time",
                    "submitit": "submitit"}[args.launcher]
        print(describe_plan(plan, describe))
        return 0
    launcher = _launcher(args, plan)
    result = run_sweep(plan, launcher)
    print(result.markdown)
    print(f"table:       {display_path(result.files['markdown'])}")
    print(f"report:      {display_path(result.files['html'])}")
    print(f"numbers:     {display_path(result.files['json'])}")
    print(f"cells:       {len(result.ran)} run now, {len(result.skipped)} already done")
    print(f"MLflow run:  {result.parent_run_id or '(not created: tracking unreachable)'} (the sweep; each cell's "
          "fit run is its child)")
    if result.parent_hint:
        print(f"  browse with: {result.parent_hint}")
    return 0
