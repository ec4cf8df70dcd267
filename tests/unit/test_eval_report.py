"""The HTML report writer, rendered in headless Chromium: page loads, tables present, every image decodes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cmrp.evaluation.report import write_html, write_json

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).is_file()), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="Chromium is not installed (.ci/run installs Debian's chromium)")


def render_probe(html_file: Path, workdir: Path) -> tuple[dict[str, int], str]:
    """Open the page in headless Chromium with a probe that counts images, decoded images and metric
    tables once the page has loaded; returns those counts and the rendered DOM."""
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             "document.body.dataset.images = imgs.length;"
             "document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
             "document.body.dataset.tables = document.querySelectorAll('table.metrics').length; });</script>")
    probed = workdir / "probe.html"
    probed.write_text(html_file.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={workdir / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    counts = {k: int(v) for k, v in re.findall(r'data-(\w+)="(\d+)"', body.group(1))}
    assert {"images", "decoded", "tables"} <= set(counts), body.group(0)
    return counts, proc.stdout


def _fake_report() -> tuple[dict, dict]:
    model = {"t2i": {"prompts": 2, "clip_t": 0.31, "clip_i_references": 0.7, "diversity": 0.2},
             "knowledge_qa": {"items": 4, "mcq_acc_likelihood": 0.75},
             "text_roleplay": {"items": 3, "distinct_2": 0.5, "self_repetition": 0.1, "mean_words": float("nan")}}
    baseline = {"t2i": {"prompts": 2, "clip_t": 0.2, "clip_i_references": 0.5, "diversity": 0.3},
                "knowledge_qa": {"items": 4, "mcq_acc_likelihood": 0.25},
                "text_roleplay": {"items": 3, "distinct_2": 0.6, "self_repetition": 0.0, "mean_words": 9.0}}
    report = {"checkpoint": "/runs/x/checkpoint", "character": "Kiko <b>", "features": "pixel",
              "baseline_source": "base", "settings": {"samples": 2},
              "model": {"numbers": model}, "baseline": {"numbers": baseline},
              "reference": {"text_roleplay": {"distinct_2": 0.7}}}
    g = torch.Generator().manual_seed(0)
    visuals = {
        "references": list(torch.rand(3, 3, 16, 16, generator=g)),
        "t2i_prompts": ["a red fox", "a blue fox"],
        "t2i_targets": [torch.rand(3, 16, 16, generator=g), None],
        "t2i_model": [torch.rand(2, 3, 16, 16, generator=g) for _ in range(2)],
        "t2i_baseline": [torch.rand(2, 3, 16, 16, generator=g) for _ in range(2)],
        "replies": [{"task": "text_roleplay", "context": "User: hi", "reference": "Boop!", "model": "Hi <3",
                     "baseline": "zzz"}],
    }
    return report, visuals


def test_report_files(tmp_path):
    report, visuals = _fake_report()
    data = json.loads(write_json(report, tmp_path / "eval.json").read_text())
    assert data["model"]["numbers"]["text_roleplay"]["mean_words"] is None  # NaN -> null, strict JSON
    page = write_html(report, visuals, tmp_path / "report.html").read_text()
    assert "Kiko &lt;b&gt;" in page and "Hi &lt;3" in page  # escaped
    assert "+0.500" in page  # knowledge QA delta
    assert "http://" not in page and "https://" not in page  # self-contained


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    report, visuals = _fake_report()
    page = write_html(report, visuals, tmp_path / "report.html")
    counts, dom = render_probe(page, tmp_path)
    assert counts["images"] == 3 + 1 + 2 * 2 * 2  # references, one target, model and baseline samples
    assert counts["decoded"] == counts["images"]
    assert counts["tables"] == 1 + 3  # summary + one per task
    assert "Text-to-image" in dom and "a blue fox" in dom
