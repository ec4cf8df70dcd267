"""The comparison table of a sweep: per row and column the mean, sample std and 95 % interval over seeds;
paired per-seed deltas against the baseline row; the claims, seed by seed.

Numbers come from each done cell's own files (eval.json's model numbers, the run's metrics.json), so the
table can always be recomputed from the cells. The interval of a mean over n seeds is Student's t with n-1
degrees of freedom; a paired delta's interval is the same over the per-seed differences (seeds are paired
by their number: the same seed in two rows shares its SFT data order and initial state).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cmrp.sweeps.spec import Claim, Condition, Metric

__all__ = ["ARROWS", "cell_values", "fmt_number", "markdown", "stats", "summarize"]

_COMPARE = {">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def _dig(data: Any, path: tuple[str, ...]) -> float:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return math.nan
        data = data[key]
    if isinstance(data, bool) or not isinstance(data, int | float):
        return math.nan
    return float(data)


def cell_values(cell_dir: Path, metrics: dict[str, Metric]) -> dict[str, float]:
    """Every column's number for one done cell (NaN where its file does not hold it)."""
    sources = {}
    for name, path in (("eval", cell_dir / "eval" / "eval.json"), ("fit", cell_dir / "metrics.json")):
        try:
            sources[name] = json.loads(path.read_text())
        except (OSError, ValueError):
            sources[name] = {}
    model = ((sources["eval"].get("model") or {}).get("numbers")) or {}
    return {name: _dig(model if m.source == "eval" else sources["fit"], m.path) for name, m in metrics.items()}


def stats(values: list[float]) -> dict[str, Any]:
    """n, mean, sample std and the 95 % t interval of the mean (NaN values left out)."""
    from cmrp.evaluation.report import t975

    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if not n:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None}
    mean = sum(finite) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def _check(condition: Condition, values: dict[str, float]) -> bool | None:
    left = values.get(condition.left, math.nan)
    right = values.get(condition.right, math.nan) if isinstance(condition.right, str) else condition.right
    if not (math.isfinite(left) and math.isfinite(right)):
        return None
    return bool(_COMPARE[condition.op](left, right))


def _claim(claim: Claim, per_seed: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    """The claim on every seed that has its row (and `against` row): the numbers it reads and whether it holds."""
    mine = per_seed.get(claim.row, {})
    other = per_seed.get(claim.against, {}) if claim.against else None
    columns = list(dict.fromkeys([c.left for c in claim.holds]
                                 + [c.right for c in claim.holds if isinstance(c.right, str)]))
    seeds = []
    for seed in sorted(mine):
        if other is not None and seed not in other:
            continue
        values = {k: mine[seed].get(k, math.nan) - (other[seed].get(k, math.nan) if other is not None else 0.0)
                  for k in columns}
        checks = [_check(c, values) for c in claim.holds]
        holds = None if any(c is None for c in checks) else all(checks)
        seeds.append({"seed": seed, "values": values, "holds": holds})
    measured = [s for s in seeds if s["holds"] is not None]
    return {
        "name": claim.name, "row": claim.row, "against": claim.against,
        "conditions": [str(c) for c in claim.holds], "on": "paired deltas" if claim.against else "values",
        "per_seed": seeds,
        "seeds_measured": len(measured),
        "seeds_holding": sum(1 for s in measured if s["holds"]),
        # None: not measured on any seed (a column missing, or no paired seed)
        "holds_on_every_seed": (len(measured) == len(seeds) and all(s["holds"] for s in measured)) if measured else None,
    }


def summarize(sweep: Any, rows: dict[str, str], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole table from done cells `[{row, seed, dir, values}]`: see the module docstring."""
    metrics = list(sweep.metrics)
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    for cell in cells:
        per_seed.setdefault(cell["row"], {})[cell["seed"]] = cell["values"]
    base = per_seed.get(sweep.baseline, {}) if sweep.baseline else {}
    table = {}
    for row, label in rows.items():
        mine = per_seed.get(row, {})
        entry: dict[str, Any] = {"label": label, "seeds": sorted(mine),
                                 "values": {str(s): v for s, v in sorted(mine.items())},
                                 "stats": {m: stats([v[m] for v in mine.values()]) for m in metrics}}
        if sweep.baseline and row != sweep.baseline:
            paired = sorted(set(mine) & set(base))
            entry["delta"] = {}
            for m in metrics:
                diffs = {s: mine[s][m] - base[s][m] for s in paired}
                entry["delta"][m] = {**stats(list(diffs.values())),
                                     "per_seed": {str(s): d if math.isfinite(d) else None for s, d in diffs.items()}}
        table[row] = entry
    return {
        "name": sweep.name, "sweep_file": str(sweep.path), "baseline": sweep.baseline,
        "metrics": {m.name: {"source": m.spec, "better": m.direction()} for m in sweep.metrics.values()},
        "rows": table,
        "claims": [_claim(c, per_seed) for c in sweep.claims],
    }


# -- Markdown ------------------------------------------------------------------------------------------
def fmt_number(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    size = round(abs(value), 9)
    digits = 0 if size >= 100 else 1 if size >= 10 else 3 if size >= 0.01 or size == 0 else 4
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _mean_std(s: dict[str, Any], signed: bool = False) -> str:
    if not s["n"]:
        return "–"
    text = fmt_number(s["mean"], signed)
    return text + (f" ± {fmt_number(s['std'])}" if s["std"] is not None else "")


def _interval(s: dict[str, Any], signed: bool = False) -> str:
    return f"[{fmt_number(s['low'], signed)}, {fmt_number(s['high'], signed)}]" if s["low"] is not None else ""


ARROWS = {"higher": "↑", "lower": "↓", "neither": ""}


def markdown(summary: dict[str, Any], missing: list[str] = ()) -> str:
    """The table as Markdown: mean ± std [95 % CI] per row; paired deltas; the claims with per-seed numbers."""
    metrics = list(summary["metrics"])
    head = "| row | seeds | " + " | ".join(f"{m} {ARROWS[summary['metrics'][m]['better']]}".strip()
                                           for m in metrics) + " |"
    lines = [f"## {summary['name']}", "",
             "Mean ± sample std over seeds, [95 % t interval of the mean]; ↑ higher is better, ↓ lower is better.", "",
             head, "|" + " --- |" * (len(metrics) + 2)]
    for row in summary["rows"].values():
        cells = [f"{_mean_std(row['stats'][m])} {_interval(row['stats'][m])}".strip() for m in metrics]
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    base = summary.get("baseline")
    if base and any("delta" in r for r in summary["rows"].values()):
        label = summary["rows"].get(base, {}).get("label", base)
        lines += ["", f"Paired per-seed deltas against **{label}** (row − baseline, same seed): mean ± std "
                  "[95 % interval].", "", head.replace("| seeds |", "| paired seeds |"),
                  "|" + " --- |" * (len(metrics) + 2)]
        for row in summary["rows"].values():
            if "delta" not in row:
                continue
            d = row["delta"]
            cells = [f"{_mean_std(d[m], True)} {_interval(d[m], True)}".strip() for m in metrics]
            lines.append(f"| {row['label']} | {max(d[m]['n'] for m in metrics)} | " + " | ".join(cells) + " |")
    for claim in summary["claims"]:
        lines += ["", _claim_markdown(claim, summary)]
    if missing:
        lines += ["", f"Not in the table (not done): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def _claim_markdown(claim: dict[str, Any], summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    name = rows.get(claim["row"], {}).get("label", claim["row"])
    if claim["against"]:
        other = rows.get(claim["against"], {}).get("label", claim["against"])
        what = f"Δ = {name} − {other}, per seed"
    else:
        what = f"{name}, per seed"
    columns = list(dict.fromkeys(k for s in claim["per_seed"] for k in s["values"]))
    prefix = "Δ " if claim["against"] else ""
    out = [f"**Claim: {claim['name']}** ({what}; holds when {', '.join(claim['conditions'])})"]
    if claim["per_seed"]:  # none when a row it compares was not run: no table, only the verdict below
        out += ["", "| seed | " + " | ".join(prefix + c for c in columns) + " | holds |",
                "|" + " --- |" * (len(columns) + 2)]
    for s in claim["per_seed"]:
        holds = "n/a" if s["holds"] is None else "yes" if s["holds"] else "no"
        out.append(f"| {s['seed']} | " + " | ".join(fmt_number(s["values"][c], bool(prefix)) for c in columns)
                   + f" | {holds} |")
    verdict = claim["holds_on_every_seed"]
    if verdict is None:
        out.append("\nclaim not measured: a column it reads is missing from the cells (or no seed has both rows)")
    else:
        out.append(f"\nclaim holds on every seed: {verdict} ({claim['seeds_holding']}/{len(claim['per_seed'])} seeds)")
    return "\n".join(out)
