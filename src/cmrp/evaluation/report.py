"""The evaluation report: a JSON of every number and a self-contained HTML page, both logged to MLflow.

The HTML has no external resource (inline CSS, images as base64 PNG data URIs), so it can be mailed,
attached to an MLflow run or opened offline and still show everything.
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

__all__ = ["clean_numbers", "delta_table", "log_to_mlflow", "png_data_uri", "write_html", "write_json"]

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
    from cmrp.jsonio import to_strict

    return to_strict(value)


def write_json(report: dict[str, Any], path: Path) -> Path:
    from cmrp import jsonio

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


def png_data_uri(image: torch.Tensor) -> str:
    """A [3, H, W] tensor in [0, 1] as a data:image/png;base64 URI."""
    import numpy as np
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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


_LOWER_IS_BETTER = {"self_repetition", "empty_rate", "fid", "kid_mean"}
_NEUTRAL = {"mean_words", "answer_parse_rate", "kid_std", "fid_real_images", "fid_generated_images"}


def _delta(value: Any, key: str = "") -> str:
    """The change, green where it is an improvement, red where it is a regression, grey where neutral."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<span class='na'>–</span>"
    better = -value if key in _LOWER_IS_BETTER else value
    cls = "flat" if key in _NEUTRAL else "up" if better > 1e-9 else "down" if better < -1e-9 else "flat"
    return f"<span class='{cls}'>{value:+.3f}</span>"


def _img(image: torch.Tensor | None, title: str = "") -> str:
    if image is None:
        return "<div class='cell empty'></div>"
    return f"<img class='cell' src='{png_data_uri(image)}' title='{html.escape(title, quote=True)}' alt='{html.escape(title, quote=True)}'>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .meta{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f6} td.k,th.k{text-align:left;font-family:ui-monospace,Menlo,monospace}
.up{color:#0a7d28;font-weight:600} .down{color:#b3261e;font-weight:600} .flat{color:#777} .na{color:#aaa}
.grid{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin:4px 0}
.cell{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc;border-radius:3px}
.empty{background:#fafafa} .label{font-size:12px;color:#555;width:90px}
.prompt{font-size:13px;margin:10px 0 2px} .sep{width:12px}
td.text{text-align:left;max-width:360px;white-space:pre-wrap;vertical-align:top}
"""


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
        head = "<tr><th class='k'>metric</th><th>model</th>"
        head += "<th>baseline</th><th>Δ</th>" if has_base else ""
        head += "<th>reference data</th></tr>" if task in reference else "</tr>"
        rows = [head]
        for key, a, b, d in delta_table(model.get(task, {}), baseline.get(task) if has_base else None):
            row = f"<tr><td class='k'>{html.escape(key)}</td><td>{_fmt(a)}</td>"
            if has_base:
                row += f"<td>{_fmt(b)}</td><td>{_delta(d, key)}</td>"
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
    rows = ["<tr><th class='k'>task</th><th class='k'>metric</th><th>model</th>"
            + ("<th>baseline</th><th>Δ</th></tr>" if baseline is not None else "</tr>")]
    for task, key in headline:
        if key not in model.get(task, {}):
            continue
        a = model[task][key]
        row = f"<tr><td class='k'>{task}</td><td class='k'>{key}</td><td>{_fmt(a)}</td>"
        if baseline is not None:
            b = baseline.get(task, {}).get(key)
            d = a - b if isinstance(a, int | float) and isinstance(b, int | float) else None
            row += f"<td>{_fmt(b)}</td><td>{_delta(d, key)}</td>"
        rows.append(row + "</tr>")
    return f"<table class='metrics summary'>{''.join(rows)}</table>"


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
        cells = [_img(targets[i] if i < len(targets) else None, "target"), "<span class='sep'></span>"]
        cells += [_img(x, "model") for x in (model_imgs[i] if i < len(model_imgs) else [])]
        if base_imgs:
            cells.append("<span class='sep'></span>")
            cells += [_img(x, "baseline") for x in (base_imgs[i] if i < len(base_imgs) else [])]
        parts.append(f"<div class='prompt'>{html.escape(prompt)}</div><div class='grid'>{''.join(cells)}</div>")
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


def write_html(report: dict[str, Any], visuals: dict[str, Any], path: Path) -> Path:
    """The report page: summary, per-task tables (model vs baseline with deltas), image grids, replies."""
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
        "<h2>Summary</h2>", _summary_table(report), _oracle_note(report),
        "<h2>Per-task breakdown</h2>", _metric_tables(report),
        "<h2>Images</h2>", _image_section(report, visuals),
        _replies_section(visuals),
    ]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
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


def log_to_mlflow(report: dict[str, Any], files: list[Path], tracking_uri: str, experiment: str,
                  artifact_root: Path | None, run_name: str = "eval") -> str:
    """A new MLflow run with eval/model/..., eval/baseline/... and eval/delta/... metrics and the files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = artifact_root.as_uri() if artifact_root is not None else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"cmrp.kind": "eval", "cmrp.checkpoint": str(report.get("checkpoint"))})
    run_id = run.info.run_id
    params = {"checkpoint": report.get("checkpoint"), "baseline": report.get("baseline_source") or "none",
              "features": report.get("features"), **{f"settings.{k}": v for k, v in report.get("settings", {}).items()}}
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:500])
    metrics = _flat_metrics(report["model"]["numbers"], "eval/model")
    if report.get("baseline"):
        base = report["baseline"]["numbers"]
        metrics.update(_flat_metrics(base, "eval/baseline"))
        for task, key, a, b in ((t, k, v, base.get(t, {}).get(k)) for t, vals in report["model"]["numbers"].items()
                                for k, v in vals.items()):
            if key in _COUNTS or not all(isinstance(x, int | float) and math.isfinite(x) for x in (a, b)):
                continue
            metrics[f"eval/delta/{task}/{key}"] = float(a - b)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for file in files:
        client.log_artifact(run_id, str(file))
    client.set_terminated(run_id, "FINISHED")
    return run_id
