"""The sandbox ablation table: the recipes of recipes/ablations/sandbox/ through the real CLI, over seeds.

For every training seed: `cmrp fit` SFT only, then each GRPO variant from that SFT checkpoint
(`init_from`, `stages=[grpo]`: SFT+GRPO with the full sandbox reward and without each reward term), and
the LoRA and joint-decoding variants end to end; every run is scored by `cmrp eval --features sandbox`
(the oracle probe, the sandbox CLIP and probe features). Prints a Markdown table (mean ± sample std over
seeds) and writes every number to JSON.

The paper's GRPO claim is checked on the `sft_only` vs `sft_grpo` pairs of each seed: within-prompt image
diversity up, max similarity to the reference images down, identity fidelity down by at most 0.05.

    python benchmarks/sandbox_ablations.py --seeds 0 1 2 --out runs/ablations --json ablations.json
    python benchmarks/sandbox_ablations.py --seeds 0 1 2 --variants sft_only sft_grpo   # the claim only

Runs that already have an eval.json are not run again, so an interrupted table continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = "recipes/ablations/sandbox"
GRPO_FROM_SFT = ("sft_grpo", "no_vqa", "no_clip", "no_diversity", "no_penalty")
END_TO_END = ("lora", "joint")
VARIANTS = ("sft_only", *GRPO_FROM_SFT, *END_TO_END)
# (column, section of eval.json's model numbers, key)
COLUMNS = (
    ("knowledge MCQ", "knowledge_qa", "mcq_acc_likelihood"),
    ("VQA MCQ", "vqa", "mcq_acc_likelihood"),
    ("identity (oracle)", "t2i", "identity_fidelity"),
    ("prompt faithfulness", "t2i", "prompt_faithfulness"),
    ("diversity", "t2i", "diversity"),
    ("max sim. to refs", "t2i", "dino_max_reference"),
    ("CLIP-T", "t2i", "clip_t"),
    ("quirk rate", "text_roleplay", "quirk_rate"),
)


def _cli(args: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("a") as f:
        f.write(f"$ cmrp {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "cmrp.cli", *args], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cmrp {' '.join(args[:2])} failed (exit {done.returncode}); see {log}")


def run_variant(variant: str, seed: int, out: Path, eval_args: list[str], threads: int) -> dict:
    """Fit (unless done) and evaluate one variant for one seed; returns its eval numbers."""
    run = out / f"{variant}-s{seed}"
    report = run / "eval" / "eval.json"
    if not report.is_file():
        run.mkdir(parents=True, exist_ok=True)
        log = run / "log.txt"
        fit = ["fit", f"{RECIPES}/{variant}.yaml", f"seed={seed}", f"output_dir={run}"]
        if variant in GRPO_FROM_SFT:
            fit += [f"init_from={out / f'sft_only-s{seed}'}", "stages=[grpo]"]
        t = time.perf_counter()
        _cli(fit, log, threads)
        fit_s = time.perf_counter() - t
        _cli(["eval", str(run), "--features", "sandbox", "--baseline", "none", *eval_args], log, threads)
        (run / "fit_seconds.txt").write_text(f"{fit_s:.1f}\n")
    numbers = json.loads(report.read_text())["model"]["numbers"]
    fit_s = float((run / "fit_seconds.txt").read_text()) if (run / "fit_seconds.txt").is_file() else math.nan
    return {"variant": variant, "seed": seed, "fit_s": fit_s,
            **{label: numbers.get(section, {}).get(key, math.nan) for label, section, key in COLUMNS}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(rows: list[dict]) -> dict:
    """Per variant: mean and sample std over seeds of every column; the GRPO claim per seed."""
    table = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        table[variant] = {"seeds": sorted(r["seed"] for r in mine),
                          **{label: _mean_std([r[label] for r in mine]) for label, _, _ in COLUMNS},
                          "fit_s": _mean_std([r["fit_s"] for r in mine])}
    claim = []
    by = {(r["variant"], r["seed"]): r for r in rows}
    for seed in sorted({r["seed"] for r in rows}):
        sft, grpo = by.get(("sft_only", seed)), by.get(("sft_grpo", seed))
        if sft and grpo:
            claim.append({
                "seed": seed,
                "diversity_change": grpo["diversity"] - sft["diversity"],
                "max_sim_change": grpo["max sim. to refs"] - sft["max sim. to refs"],
                "identity_change": grpo["identity (oracle)"] - sft["identity (oracle)"],
            })
    holds = bool(claim) and all(c["diversity_change"] > 0 and c["max_sim_change"] < 0
                                and c["identity_change"] >= -0.05 for c in claim)
    return {"table": table, "grpo_claim": {"per_seed": claim, "holds_on_every_seed": holds}}


def markdown(summary: dict) -> str:
    labels = [label for label, _, _ in COLUMNS]
    lines = ["| variant | seeds | " + " | ".join(labels) + " |", "|" + " --- |" * (len(labels) + 2)]
    for variant, row in summary["table"].items():
        cells = [f"{row[label][0]:.3f} ± {row[label][1]:.3f}" for label in labels]
        lines.append(f"| {variant} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    claim = summary["grpo_claim"]
    if claim["per_seed"]:
        lines += ["", "GRPO vs SFT only, per seed (Δ = SFT+GRPO − SFT only):", "",
                  "| seed | Δ diversity | Δ max sim. to refs | Δ identity |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['seed']} | {c['diversity_change']:+.4f} | {c['max_sim_change']:+.4f} | {c['identity_change']:+.3f} |"
                  for c in claim["per_seed"]]
        lines.append(f"\nclaim holds on every seed: {claim['holds_on_every_seed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--end-to-end-seeds", type=int, nargs="+", default=None,
                   help="seeds for the lora / joint variants (default: the first seed only)")
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--json", type=Path, default=None, help="write rows + summary here")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cores // jobs threads)")
    p.add_argument("--samples", type=int, default=8, help="images per held-out T2I prompt in cmrp eval")
    args = p.parse_args(argv)
    out = args.out.resolve()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    eval_args = ["--samples", str(args.samples)]
    e2e_seeds = args.end_to_end_seeds or args.seeds[:1]
    first = [(v, s) for s in args.seeds for v in args.variants if v == "sft_only"]
    first += [(v, s) for s in e2e_seeds for v in args.variants if v in END_TO_END]
    second = [(v, s) for s in args.seeds for v in args.variants if v in GRPO_FROM_SFT]
    if second and "sft_only" not in args.variants:
        first += [("sft_only", s) for s in args.seeds]  # GRPO variants start from it
    t0 = time.perf_counter()
    rows: list[dict] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for phase in (first, second):
            rows += pool.map(lambda vs: run_variant(vs[0], vs[1], out, eval_args, threads), phase)
    rows = [r for r in rows if r["variant"] in args.variants]
    summary = summarize(rows)
    print(markdown(summary))
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s ({args.jobs} in parallel, {threads} threads each)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
