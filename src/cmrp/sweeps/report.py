"""The sweep's HTML report (self-contained, like `cmrp eval`'s: inline CSS, plots as data URIs) and one
PNG plot per metric: every seed's value per row, the mean with its 95 % interval, the baseline's mean as a
dashed line.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from cmrp.sweeps.table import ARROWS
from cmrp.sweeps.table import fmt_number as _num

__all__ = ["metric_plots", "write_html"]

_WIDE = ".wide{overflow-x:auto;max-width:100%} .wide td.k{white-space:nowrap} body{max-width:none}"


def metric_plots(summary: dict[str, Any], folder: Path) -> dict[str, Path]:
    """`<folder>/<metric>.png` for every metric; returns metric -> file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = list(summary["rows"].values())
    seeds = sorted({int(s) for r in rows for s in r["values"]})
    colours = plt.get_cmap("tab10")
    out = {}
    for metric, info in summary["metrics"].items():
        fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(rows) + 1.5), 3.4), dpi=110)
        labelled: set[int] = set()
        for x, row in enumerate(rows):
            for k, seed in enumerate(seeds):
                value = (row["values"].get(str(seed)) or {}).get(metric)
                if value is not None and math.isfinite(value):
                    offset = (k - (len(seeds) - 1) / 2) * 0.08
                    ax.plot(x + offset, value, "o", color=colours(k % 10), markersize=4, alpha=0.8,
                            label=None if seed in labelled else f"seed {seed}")
                    labelled.add(seed)
            s = row["stats"][metric]
            if s["mean"] is not None:
                err = [[s["mean"] - s["low"]], [s["high"] - s["mean"]]] if s["low"] is not None else None
                ax.errorbar(x, s["mean"], yerr=err, fmt="_", color="black", markersize=14, capsize=4, linewidth=1.2)
        base = summary["rows"].get(summary.get("baseline") or "", {}).get("stats", {}).get(metric, {})
        if base.get("mean") is not None:
            ax.axhline(base["mean"], color="#888", linestyle="--", linewidth=1, label="baseline mean")
        ax.set_title(f"{metric} {ARROWS[info['better']]}  ({info['source']})", fontsize=9)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = folder / f"{metric}.png"
        fig.savefig(path, format="png")
        plt.close(fig)
        out[metric] = path
    return out


def _stat_cell(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "<td><span class='na'>–</span></td>"
    text = _num(s["mean"]) + (f" ± {_num(s['std'])}" if s["std"] is not None else "")
    if s["low"] is not None:
        text += f" <span class='ci'>[{_num(s['low'])}, {_num(s['high'])}]</span>"
    return f"<td>{text}</td>"


def _delta_cell(s: dict[str, Any], better: str) -> str:
    """The mean change, green where it is an improvement, red where a regression, grey where neutral."""
    if not s["n"]:
        return "<td><span class='na'>–</span></td>"
    gain = s["mean"] if better == "higher" else -s["mean"]
    cls = "flat" if better == "neither" or abs(gain) < 5e-4 else "up" if gain > 0 else "down"
    text = f"<span class='{cls}'>{_num(s['mean'], True)}</span>"
    if s["std"] is not None:
        text += f" ± {_num(s['std'])} <span class='ci'>[{_num(s['low'], True)}, {_num(s['high'], True)}]</span>"
    return f"<td>{text}</td>"


def _head(summary: dict[str, Any], first: str) -> str:
    cols = "".join(f"<th title='{html.escape(info['source'], quote=True)}'>{html.escape(m)} <span class='dir'>"
                   f"{ARROWS[info['better']]}</span></th>" for m, info in summary["metrics"].items())
    return f"<tr><th class='k'>row</th><th>{first}</th>{cols}</tr>"


def _tables(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    rows = [_head(summary, "seeds")]
    for row in summary["rows"].values():
        rows.append(f"<tr><td class='k'>{html.escape(row['label'])}</td><td>{len(row['seeds'])}</td>"
                    + "".join(_stat_cell(row["stats"][m]) for m in metrics) + "</tr>")
    out = ("<h2>Table</h2><p class='meta'>mean ± sample std over seeds <span class='ci'>[95 % t interval of the "
           f"mean]</span>; ↑ higher is better, ↓ lower is better</p><div class='wide'><table class='sweep'>{''.join(rows)}"
           "</table></div>")
    deltas = [r for r in summary["rows"].values() if "delta" in r]
    if deltas:
        base = summary["rows"].get(summary["baseline"], {}).get("label", summary["baseline"])
        rows = [_head(summary, "paired seeds")]
        for row in deltas:
            n = max(row["delta"][m]["n"] for m in metrics)
            rows.append(f"<tr><td class='k'>{html.escape(row['label'])}</td><td>{n}</td>"
                        + "".join(_delta_cell(row["delta"][m], info["better"]) for m, info in metrics.items())
                        + "</tr>")
        out += (f"<h2>Paired deltas against {html.escape(base)}</h2><p class='meta'>row − baseline on the same seed: "
                "mean ± std <span class='ci'>[95 % interval]</span>; green is better, red worse</p>"
                f"<div class='wide'><table class='deltas'>{''.join(rows)}</table></div>")
    return out


def _claims(summary: dict[str, Any]) -> str:
    parts = []
    for claim in summary["claims"]:
        columns = list(dict.fromkeys(k for s in claim["per_seed"] for k in s["values"]))
        prefix = "Δ " if claim["against"] else ""
        head = ("<tr><th>seed</th>" + "".join(f"<th>{html.escape(prefix + c)}</th>" for c in columns)
                + "<th>holds</th></tr>")
        body = []
        for s in claim["per_seed"]:
            verdict = "n/a" if s["holds"] is None else "yes" if s["holds"] else "no"
            cls = "na" if s["holds"] is None else "up" if s["holds"] else "down"
            body.append(f"<tr><td>{s['seed']}</td>" + "".join(f"<td>{_num(s['values'][c], bool(prefix))}</td>"
                                                                for c in columns)
                        + f"<td><span class='{cls}'>{verdict}</span></td></tr>")
        verdict = claim["holds_on_every_seed"]
        said = ("not measured (a column it reads is missing)" if verdict is None
                else f"holds on every seed: <b>{verdict}</b> ({claim['seeds_holding']}/{len(claim['per_seed'])} seeds)")
        against = f" against {html.escape(claim['against'])}" if claim["against"] else ""
        parts.append(f"<h3>{html.escape(claim['name'])}</h3><p class='meta'>row {html.escape(claim['row'])}{against}; "
                     f"holds when {html.escape(', '.join(claim['conditions']))}</p>"
                     f"<table class='claim'>{head}{''.join(body)}</table><p>{said}</p>")
    return "<h2>Claims</h2>" + "".join(parts) if parts else ""


def _cells(summary: dict[str, Any], out: Path, cells: list[dict[str, Any]]) -> str:
    metrics = list(summary["metrics"])
    head = ("<tr><th class='k'>cell</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
            + "<th class='k'>eval report</th></tr>")
    body = []
    for cell in cells:
        report = Path(cell["dir"]) / "eval" / "report.html"
        try:
            link = report.relative_to(out).as_posix()
        except ValueError:
            link = report.as_uri()
        body.append(f"<tr><td class='k'>{html.escape(cell['row'])}/seed{cell['seed']}</td>"
                    + "".join(f"<td>{_num(cell['values'][m])}</td>" for m in metrics)
                    + f"<td class='k'><a href='{html.escape(link, quote=True)}'>report.html</a></td></tr>")
    return f"<h2>Every cell</h2><div class='wide'><table class='cells'>{head}{''.join(body)}</table></div>"


def write_html(summary: dict[str, Any], cells: list[dict[str, Any]], plots: dict[str, Path], out: Path,
               path: Path, meta: dict[str, Any]) -> Path:
    from cmrp.evaluation.report import CSS

    info = " · ".join(f"{html.escape(k)} <code>{html.escape(str(v))}</code>" for k, v in meta.items() if v)
    figures = "".join(
        f"<img class='curves' alt='{html.escape(m, quote=True)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode('ascii')}'>" for m, p in plots.items())
    missing = meta.get("not done")
    body = [f"<h1>cmrp sweep — {html.escape(summary['name'])}</h1><div class='meta'>{info}</div>",
            _tables(summary), _claims(summary), f"<h2>Per metric</h2><div>{figures}</div>" if figures else "",
            _cells(summary, out, cells),
            f"<p class='meta'>not done: {html.escape(str(missing))}</p>" if missing else ""]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>cmrp sweep {html.escape(summary['name'])}"
            f"</title><style>{CSS}{_WIDE}</style></head><body>{''.join(body)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path
