"""Import time of `cmrp.rewards` against `import torch` alone, each in fresh interpreters.

    python benchmarks/rewards_import.py [--repeats 7] [--out FILE]

Other projects import our rewards next to their own trainer, so `import cmrp.rewards` should cost little
more than the torch it needs anyway. Each repeat starts two new `python -X importtime` processes (torch
alone; torch then cmrp.rewards) and reads the cumulative import time of the top-level modules from
`-X importtime`, so interpreter start-up is left out. Reported: the medians and the ratio
median(torch + cmrp.rewards) / median(torch) — the target is at most 1.2 — and which heavy model
libraries, if any, `cmrp.rewards` pulled in (there should be none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_rollout import emit  # noqa: E402

TARGET_RATIO = 1.2
HEAVY = ("transformers", "open_clip", "lpips", "lightning", "mlflow", "omegaconf", "torchmetrics", "huggingface_hub")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _top_level_us(stderr: str, modules: tuple[str, ...]) -> int:
    """Sum of the cumulative import times (µs) `-X importtime` reports for `modules` themselves."""
    total = 0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if name in modules:
            total += int(cumulative)
    return total


def _run(code: str, modules: tuple[str, ...]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    return _top_level_us(proc.stderr, modules) / 1e6, proc.stdout.strip()


def measure(repeats: int) -> dict:
    torch_only, with_rewards, loaded = [], [], ""
    probe = f"import sys, torch, cmrp.rewards; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    for _ in range(repeats):
        seconds, _ = _run("import torch", ("torch",))
        torch_only.append(seconds)
        seconds, loaded = _run(probe, ("torch", "cmrp.rewards"))
        with_rewards.append(seconds)
    base, total = statistics.median(torch_only), statistics.median(with_rewards)
    return {
        "benchmark": "rewards_import",
        "python": sys.version.split()[0],
        "repeats": repeats,
        "torch_s": {"median": base, "all": torch_only},
        "torch_plus_cmrp_rewards_s": {"median": total, "all": with_rewards},
        "cmrp_rewards_alone_s": total - base,
        "ratio": total / base,
        "target_ratio": TARGET_RATIO,
        "within_target": total / base <= TARGET_RATIO,
        "heavy_modules_loaded": [m for m in loaded.split(",") if m],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
