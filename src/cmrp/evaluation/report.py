"""The evaluation report: a JSON of every number and a self-contained HTML page, both logged to MLflow.

The HTML has no external resource (inline CSS, images as base64 PNG data URIs), so it can be mailed,
attached to an MLflow run or opened offline and still show everything. It shows, per number, how many items
it rests on (n), a 95 % interval and which way is better (↑/↓); the training run's loss and reward curves
(read from its MLflow history); the MLflow run ids with links; images upscaled (nearest) so 32 px samples can
be seen.

Intervals: a share of items (accuracies, rates; also the oracle's per-image attribute shares, whose variance
is at most p(1-p) so the interval is conservative) gets Wilson's score interval; a mean of per-image values
(CLIP / DINO similarities) gets a Student t interval over the images; corpus-level statistics (distinct-n,
self-repetition, diversity, judge ratios) get none.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from cmrp import jsonio
from cmrp.jsonio import to_strict

__all__ = ["CSS", "DIRECTIONS", "clean_numbers", "curves_png", "delta_table", "direction", "intervals",
           "log_report", "png_data_uri", "t975", "upscaled", "write_html", "write_json"]

_TASK_TITLES = {
    "text_roleplay": "Text role-play",
    "multimodal_roleplay": "Multimodal role-play (text + image)",
    "t2i": "Text-to-image",
    "knowledge_qa": "Knowledge QA (multiple choice)",
    "vqa": "VQA (multiple choice)",
    "judge": "LLM judge",
}
_COUNTS = {"items", "prompts", "samples_per_prompt", "prompts_with_target", "show_turns", "user_image_turns",
           "mmrole_items", "memorization_missing", "personality_missing", "diversity_missing", "mmrole_missing"}


def clean_numbers(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN), tensors become floats."""
    return to_strict(value)


def write_json(report: dict[str, Any], path: Path) -> Path:
    return jsonio.write_json(path, report, ensure_ascii=True)


def delta_table(model: dict[str, Any], baseline: dict[str, Any] | None) -> list[tuple[str, Any, Any, Any]]:
    """Rows (metric, model, baseline, model - baseline) over the union of metric names."""
    rows = []
    keys = list(model) + [k for k in (baseline or {}) if k not in model]
    for key in keys:
        a = model.get(key)
        b = (baseline or {}).get(key)
        delta = a - b if isinstance(a, int | float) and isinstance(b, int | float) and key not in _COUNTS else None
        rows.append((key, a, b, delta))
    return rows


def upscaled(image, min_side: int = 128):
    """A PIL image enlarged by a whole factor (nearest neighbour: pixels stay sharp squares) until its short
    side is at least `min_side`; larger images are returned as they are."""
    from PIL import Image

    factor = max(1, -(-min_side // max(1, min(image.size))))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor),
                                                  Image.Resampling.NEAREST)


def png_data_uri(image: torch.Tensor, min_side: int = 128) -> str:
    """A [3, H, W] tensor in [0, 1] as a data:image/png;base64 URI, upscaled for viewing (`upscaled`)."""
    import numpy as np
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    upscaled(Image.fromarray(arr), min_side).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- n, 95 % intervals, directions ---------------------------------------------------------------------
_SHARES = {"mcq_acc_likelihood", "mcq_acc_generated", "answer_parse_rate", "catchphrase_rate", "quirk_rate",
           "empty_rate", "identity_fidelity", "prompt_faithfulness"}
_LOWER_IS_BETTER = {"self_repetition", "empty_rate", "fid", "kid_mean"}
_NEUTRAL = {"mean_words", "answer_parse_rate", "dino_max_reference", "kid_std", "fid_real_images",
            "fid_generated_images"}  # no "better" direction
# metric -> ↑ higher is better, ↓ lower is better ("" neutral); counts and unknown names get none
DIRECTIONS = {"↑": "higher is better", "↓": "lower is better"}
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # Student t, 97.5 % quantile, 1..30 degrees of freedom


def direction(key: str) -> str:
    if key in _COUNTS or key in _NEUTRAL or key.endswith("_missing") or key.endswith("_items"):
        return ""
    return "↓" if key in _LOWER_IS_BETTER else "↑"


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (a two-sided 95 % interval)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df  # within 0.002 of the exact quantile


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _count(task: str, key: str, numbers: dict[str, Any]) -> int | None:
    """How many items (images, replies, questions) a number of `task` averages over."""
    if task == "t2i":
        per_prompt = numbers.get("samples_per_prompt") or 1
        if key == "diversity":
            return numbers.get("prompts")
        if key in ("clip_i_target", "dino_target"):
            return (numbers.get("prompts_with_target") or 0) * per_prompt
        return (numbers.get("prompts") or 0) * per_prompt
    if task == "multimodal_roleplay":
        if key == "clip_t_reply_user_image":
            return numbers.get("user_image_turns")
        if key == "cross_modal_clip_t":
            return (numbers.get("show_turns") or 0) + (numbers.get("user_image_turns") or 0)
        if key in ("clip_t_reply_drawn", "clip_i_target", "dino_references", "identity_fidelity",
                   "prompt_faithfulness"):
            return numbers.get("show_turns")
        return numbers.get("items")
    if task == "judge":
        return numbers.get("mmrole_items") if key.startswith("mmrole_") else None
    return numbers.get("items")


def intervals(numbers: dict[str, dict[str, Any]], samples: dict[str, dict[str, list[float]]] | None = None
              ) -> dict[str, dict[str, dict[str, Any]]]:
    """`task -> metric -> {n, low, high, method}` for every number (low/high None where no interval applies)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, values in numbers.items():
        for key, value in values.items():
            if key in _COUNTS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            per = ((samples or {}).get(task) or {}).get(key)
            per = [v for v in per if math.isfinite(v)] if per else None
            n = len(per) if per else _count(task, key, values)
            low = high = None
            method = "none"
            if math.isfinite(value) and per and len(per) > 1:
                mean = sum(per) / len(per)
                sd = math.sqrt(sum((v - mean) ** 2 for v in per) / (len(per) - 1))
                half = t975(len(per) - 1) * sd / math.sqrt(len(per))
                low, high, method = mean - half, mean + half, "t over images"
            elif math.isfinite(value) and key in _SHARES and n and 0 <= value <= 1:
                (low, high), method = _wilson(float(value), int(n)), "Wilson"
            out.setdefault(task, {})[key] = {"n": n, "low": low, "high": high, "method": method}
    return out


def curves_png(history: dict[str, list[tuple[int, float]]], title: str = "") -> str | None:
    """The training run's loss and reward curves (run-wide steps) as a PNG data URI; None without any."""
    panels = [(key, label) for key, label in (("train/loss", "SFT loss (train/loss)"),
                                              ("reward/total", "GRPO reward (reward/total)")) if history.get(key)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.2), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        steps, values = zip(*history[key], strict=True)
        ax.plot(steps, values, color="#1f5fbf", linewidth=1.4, marker="." if len(steps) < 40 else None,
                label="per step")
        held = history.get("val/reward/total") if key == "reward/total" else None
        if held:
            hs, hv = zip(*held, strict=True)
            ax.plot(hs, hv, "o--", color="#d9480f", label="held-out prompts (val/reward/total)")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("run step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _with_interval(value: Any, ci: dict[str, Any] | None) -> str:
    text = _fmt(value)
    if ci and ci.get("low") is not None:
        text += f" <span class='ci'>[{ci['low']:.3f}, {ci['high']:.3f}]</span>"
    return text


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<span class='na'>–</span>"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _delta(value: Any, key: str = "") -> str:
    """The change, green where it is an improvement, red where it is a regression, grey where neutral."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<span class='na'>–</span>"
    better = -value if key in _LOWER_IS_BETTER else value
    # a change that rounds to 0.000 is shown as no change
    cls = "flat" if key in _NEUTRAL else "up" if better >= 5e-4 else "down" if better <= -5e-4 else "flat"
    return f"<span class='{cls}'>{value:+.3f}</span>"


def _img(image: torch.Tensor | None, title: str = "") -> str:
    if image is None:
        return "<div class='cell empty'></div>"
    return f"<img class='cell' src='{png_data_uri(image)}' title='{html.escape(title, quote=True)}' alt='{html.escape(title, quote=True)}'>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .meta{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f6} td.k,th.k{text-align:left;font-family:ui-monospace,Menlo,monospace}
.up{color:#0a7d28;font-weight:600} .down{color:#b3261e;font-weight:600} .flat{color:#777} .na{color:#aaa}
.grid{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin:4px 0}
.cell{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc;border-radius:3px}
.ci{color:#666;font-size:11px} .dir{color:#555;font-weight:600} img.curves{max-width:100%;border:1px solid #ddd}
.empty{background:#fafafa} .label{font-size:12px;color:#555;width:90px}
.prompt{font-size:13px;margin:10px 0 2px} .sep{width:12px}
td.text{text-align:left;max-width:360px;white-space:pre-wrap;vertical-align:top}
"""


def _ci(report: dict[str, Any], who: str, task: str, key: str) -> dict[str, Any] | None:
    return (((report.get(who) or {}).get("intervals") or {}).get(task) or {}).get(key)


def _name_cell(key: str) -> str:
    arrow = direction(key)
    title = f" title='{DIRECTIONS[arrow]}'" if arrow else ""
    return f"<td class='k'>{html.escape(key)} <span class='dir'{title}>{arrow}</span></td>"


def _metric_tables(report: dict[str, Any]) -> str:
    model = report["model"]["numbers"]
    baseline = (report.get("baseline") or {}).get("numbers") or {}
    reference = report.get("reference") or {}
    has_base = bool(report.get("baseline"))
    parts = []
    for task in _TASK_TITLES:
        if task not in model and task not in baseline:
            continue
        parts.append(f"<h3 id='task-{task}'>{_TASK_TITLES[task]}</h3>")
        head = "<tr><th class='k'>metric</th><th>n</th><th>model [95 % CI]</th>"
        head += "<th>baseline [95 % CI]</th><th>Δ</th>" if has_base else ""
        head += "<th>reference data</th></tr>" if task in reference else "</tr>"
        rows = [head]
        for key, a, b, d in delta_table(model.get(task, {}), baseline.get(task) if has_base else None):
            ci = _ci(report, "model", task, key)
            n = ci.get("n") if ci else (a if key in _COUNTS else None)
            row = f"<tr>{_name_cell(key)}<td>{_fmt(n)}</td><td>{_with_interval(a, ci)}</td>"
            if has_base:
                row += f"<td>{_with_interval(b, _ci(report, 'baseline', task, key))}</td><td>{_delta(d, key)}</td>"
            if task in reference:
                row += f"<td>{_fmt(reference[task].get(key))}</td>"
            rows.append(row + "</tr>")
        parts.append(f"<table class='metrics' data-task='{task}'>{''.join(rows)}</table>")
    return "\n".join(parts)


def _summary_table(report: dict[str, Any]) -> str:
    """One headline number per task, model vs baseline."""
    headline = [("text_roleplay", "token_f1"), ("text_roleplay", "distinct_2"),
                ("text_roleplay", "catchphrase_rate"), ("multimodal_roleplay", "cross_modal_clip_t"),
                ("multimodal_roleplay", "identity_fidelity"), ("multimodal_roleplay", "text_image_agreement"),
                ("t2i", "clip_i_references"), ("t2i", "clip_t"), ("t2i", "dino_references"),
                ("t2i", "dino_max_reference"), ("t2i", "diversity"), ("t2i", "fid"), ("t2i", "kid_mean"),
                ("t2i", "identity_fidelity"), ("t2i", "prompt_faithfulness"),
                ("knowledge_qa", "mcq_acc_likelihood"), ("vqa", "mcq_acc_likelihood"),
                ("judge", "personality"), ("judge", "mmrole_overall")]
    model = report["model"]["numbers"]
    baseline = (report.get("baseline") or {}).get("numbers")
    rows = ["<tr><th class='k'>task</th><th class='k'>metric</th><th>n</th><th>model [95 % CI]</th>"
            + ("<th>baseline [95 % CI]</th><th>Δ</th></tr>" if baseline is not None else "</tr>")]
    for task, key in headline:
        if key not in model.get(task, {}):
            continue
        a = model[task][key]
        ci = _ci(report, "model", task, key)
        row = (f"<tr><td class='k'>{task}</td>{_name_cell(key)}<td>{_fmt(ci.get('n') if ci else None)}</td>"
               f"<td>{_with_interval(a, ci)}</td>")
        if baseline is not None:
            b = baseline.get(task, {}).get(key)
            d = a - b if isinstance(a, int | float) and isinstance(b, int | float) else None
            row += f"<td>{_with_interval(b, _ci(report, 'baseline', task, key))}</td><td>{_delta(d, key)}</td>"
        rows.append(row + "</tr>")
    return (f"<table class='metrics summary'>{''.join(rows)}</table><p class='meta'>↑ higher is better, ↓ lower "
            "is better. Intervals: Wilson for shares of items, Student t over images for similarity means, none "
            "for corpus-level statistics; images of one prompt are not independent, so those are optimistic.</p>")


def _image_section(report: dict[str, Any], visuals: dict[str, Any]) -> str:
    parts = []
    refs = visuals.get("references") or []
    if refs:
        cells = "".join(_img(r, "reference image") for r in refs)
        parts.append(f"<h3>Reference images of the character</h3><div class='grid refs'>{cells}</div>")
    prompts = visuals.get("t2i_prompts") or []
    model_imgs, base_imgs = visuals.get("t2i_model") or [], visuals.get("t2i_baseline") or []
    targets = visuals.get("t2i_targets") or []
    if prompts:
        parts.append("<h3>Text-to-image: one row per held-out prompt</h3>"
                     "<p class='meta'>target (or first reference) | model samples | baseline samples</p>")
    for i, prompt in enumerate(prompts):
        row = [_img(targets[i] if i < len(targets) else None, "target"), "<span class='sep'></span>"]
        row += [_img(x, "model") for x in (model_imgs[i] if i < len(model_imgs) else [])]
        if base_imgs:
            row.append("<span class='sep'></span>")
            row += [_img(x, "baseline") for x in (base_imgs[i] if i < len(base_imgs) else [])]
        parts.append(f"<div class='prompt'>{html.escape(prompt)}</div><div class='grid'>{''.join(row)}</div>")
    return "\n".join(parts)


def _replies_section(visuals: dict[str, Any]) -> str:
    samples = visuals.get("replies") or []
    if not samples:
        return ""
    has_base = any(s.get("baseline") is not None for s in samples)
    head = "<tr><th class='k'>task</th><th class='k'>context</th><th class='k'>reference</th><th class='k'>model</th>"
    head += "<th class='k'>baseline</th></tr>" if has_base else "</tr>"
    rows = [head]
    for s in samples:
        row = (f"<tr><td class='k'>{html.escape(s['task'])}</td><td class='text'>{html.escape(s['context'])}</td>"
               f"<td class='text'>{html.escape(s['reference'])}</td><td class='text'>{html.escape(s['model'])}</td>")
        if has_base:
            row += f"<td class='text'>{html.escape(s.get('baseline') or '')}</td>"
        rows.append(row + "</tr>")
    return f"<h2>Sample replies</h2><table class='replies'>{''.join(rows)}</table>"


def _oracle_note(report: dict[str, Any]) -> str:
    """For sandbox characters: what identity_fidelity / prompt_faithfulness measure, and their chance levels."""
    oracle = report.get("oracle")
    if not oracle:
        return ""
    accuracy = oracle.get("probe_heldout_accuracy") or {}
    worst = min(accuracy.values()) if accuracy else None
    return ("<p class='meta oracle'>Sandbox oracle: <code>identity_fidelity</code> is the share of the character's "
            "identity attributes (body shape and colour, eyes, accessory and its colour) that the shipped "
            "attribute probe reads in each generated image; <code>prompt_faithfulness</code> the share of the "
            "attributes the prompt asks for. Chance (uniformly random attributes): identity "
            f"{_fmt(oracle.get('chance_identity_fidelity'))}, prompt {_fmt(oracle.get('chance_prompt_faithfulness'))}"
            f"; probe accuracy on held-out clean renders ≥ {_fmt(worst)} per attribute.</p>")


def _runs_section(report: dict[str, Any], visuals: dict[str, Any]) -> str:
    """Where the numbers and curves come from: the training run and this evaluation's run in MLflow."""
    parts = []
    for label, run in (("training run", report.get("training_run") or {}), ("evaluation run", report.get("mlflow") or {})):
        if not run.get("run_id"):
            parts.append(f"<li>{label}: <i>{html.escape(run.get('note') or 'not in MLflow')}</i></li>")
            continue
        link = run.get("link")
        ident = f"<code>{html.escape(run['run_id'])}</code>"
        if link:
            ident = f"<a href='{html.escape(link, quote=True)}'>{ident}</a>"
        parts.append(f"<li>{label}: {ident} in <code>{html.escape(str(run.get('tracking_uri', '')))}</code>"
                     + (f" — {html.escape(run['note'])}" if run.get("note") else "") + "</li>")
    out = f"<h2>Runs</h2><ul class='meta runs'>{''.join(parts)}</ul>"
    curves = visuals.get("curves")
    source = (report.get("training_run") or {}).get("history_source", "")
    if curves:
        out += (f"<h3>Training curves</h3><img class='curves' src='{curves}' alt='loss and reward curves'>"
                f"<p class='meta'>from {html.escape(source)}</p>")
    else:
        out += f"<p class='meta'>No training curves: {html.escape(source or 'no history found')}.</p>"
    return out


def write_html(report: dict[str, Any], visuals: dict[str, Any], path: Path) -> Path:
    """The report page: runs and curves, summary, per-task tables (model vs baseline with n, intervals and
    deltas), image grids, replies."""
    title = f"cmrp eval — {report.get('character', '')}"
    meta = (f"checkpoint <code>{html.escape(str(report.get('checkpoint')))}</code> · baseline "
            f"{html.escape(str(report.get('baseline_source') or 'none'))} · features "
            f"<b>{html.escape(str(report.get('features')))}</b> · settings "
            f"{html.escape(json.dumps(report.get('settings', {})))}")
    judge = report.get("judge_endpoint")
    if judge:
        meta += f" · judge {html.escape(judge)}, protocol {html.escape(str(report.get('judge_protocol') or 'json'))}"
    for note in report.get("feature_notes") or []:  # e.g. why FID/KID is missing, and how to enable it
        meta += f"<br>{html.escape(note)}"
    body = [
        f"<h1>{html.escape(title)}</h1><div class='meta'>{meta}</div>",
        _runs_section(report, visuals),
        "<h2>Summary</h2>", _summary_table(report), _oracle_note(report),
        "<h2>Per-task breakdown</h2>", _metric_tables(report),
        "<h2>Images</h2>", _image_section(report, visuals),
        _replies_section(visuals),
    ]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _flat_metrics(numbers: dict[str, dict[str, Any]], prefix: str) -> dict[str, float]:
    out = {}
    for task, values in numbers.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            out[f"{prefix}/{task}/{key}"] = float(value)
    return out


def log_report(logger: Any, report: dict[str, Any], files: list[Path]) -> None:
    """Params, `eval/model/...`, `eval/baseline/...`, `eval/delta/...` metrics and the files, through a
    `cmrp.tracking.TrackingLogger` (so a tracking server that is down leaves them in pending.jsonl)."""
    logger.log_hyperparams({"checkpoint": report.get("checkpoint"), "baseline": report.get("baseline_source") or "none",
                            "features": report.get("features"),
                            **{f"settings.{k}": v for k, v in report.get("settings", {}).items()}})
    metrics = _flat_metrics(report["model"]["numbers"], "eval/model")
    if report.get("baseline"):
        base = report["baseline"]["numbers"]
        metrics.update(_flat_metrics(base, "eval/baseline"))
        for task, key, a, b in ((t, k, v, base.get(t, {}).get(k)) for t, vals in report["model"]["numbers"].items()
                                for k, v in vals.items()):
            if key in _COUNTS or not all(isinstance(x, int | float) and math.isfinite(x) for x in (a, b)):
                continue
            metrics[f"eval/delta/{task}/{key}"] = float(a - b)
    logger.log_metrics(metrics, step=0)
    for file in files:
        logger.log_artifact(file)
