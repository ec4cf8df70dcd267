"""Where the quickstart's wall time goes: one real `cmrp fit` run, its phases and GRPO's per-iteration split.

    python benchmarks/quickstart.py [--recipe recipes/quickstart.yaml] [--out FILE] [--cprofile FILE] [key=value ...]

Runs `cmrp fit RECIPE output_dir=<temporary>` in a child process (measure it alone: the machine's other work
changes every number) and prints JSON: the child's wall, user and system seconds and peak RSS, the phases
`cmrp fit` timed itself (`timings` in metrics.json: setup, evaluation before, SFT, GRPO, evaluation after), the
rest (interpreter start, imports, held-out GRPO reward, checkpoint and report writing), SFT steps per second
and the mean GRPO iteration split logged to MLflow (`grpo/time_{sample,reward,train,reward_compute}_s`:
reward is the wait for rewards still running after sampling; reward_compute their own time, overlapped).
`--cprofile FILE` runs the child under cProfile (slower; for finding hot functions, not for timing).
The profile behind the current settings is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_rollout import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ITERATION_PARTS = ("sample", "reward", "train", "reward_compute")


def grpo_split(db: Path) -> dict[str, float]:
    """Mean seconds per GRPO iteration of each logged part, read from the run's MLflow sqlite store."""
    if not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        split = {}
        for part in ITERATION_PARTS:
            values = [row[0] for row in con.execute("select value from metrics where key = ?", (f"grpo/time_{part}_s",))]
            if values:
                split[part] = statistics.mean(values)
    return split


def run(recipe: str, overrides: list[str], cprofile: Path | None) -> dict:
    cmrp = shutil.which("cmrp")
    if cmrp is None:
        raise SystemExit("the `cmrp` command is not on PATH: pip install -e . first")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [cmrp, "fit", recipe, f"output_dir={out}", *overrides]
        if cprofile:
            command = [sys.executable, "-m", "cProfile", "-o", str(cprofile), *command]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"cmrp fit failed ({done.returncode}):\n{done.stderr[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        timings = metrics.get("timings", {})
        result: dict = {
            "recipe": recipe, "overrides": overrides, "profiled": bool(cprofile),
            "wall_s": wall, "user_s": after.ru_utime - before.ru_utime, "system_s": after.ru_stime - before.ru_stime,
            "peak_rss_mb": after.ru_maxrss / 1024,  # kB on Linux
            "fit_timings_s": timings,
            "outside_fit_timings_s": wall - sum(v for k, v in timings.items() if k != "total_s"),
            "grpo_iteration_s": grpo_split(out / "mlflow.db"),
        }
        resolved = yaml.safe_load((out / "recipe.yaml").read_text())
        if timings.get("sft_s"):
            result["sft_steps_per_s"] = resolved["trainer"]["max_steps"] / timings["sft_s"]
        grpo = metrics.get("grpo") or {}
        for key in ("heldout_reward_before", "heldout_reward_after"):
            if key in grpo:
                result[key] = grpo[key].get("total")
        for key in ("before", "after"):  # `cmrp fit`'s own held-out check
            for name, value in (metrics.get(key) or {}).items():
                result[f"{name}_{key}"] = value
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cprofile", type=Path, help="write a cProfile of the child here (slows it down)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    emit(run(args.recipe, args.overrides, args.cprofile), args.out)


if __name__ == "__main__":
    main()
