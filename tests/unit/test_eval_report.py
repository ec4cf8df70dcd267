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


def test_intervals_wilson_for_shares_t_for_per_image_values_none_for_corpus_statistics():
    from cmrp.evaluation.report import intervals

    numbers = {"vqa": {"items": 20, "mcq_acc_likelihood": 0.5},
               "t2i": {"prompts": 2, "samples_per_prompt": 2, "clip_t": 0.25, "diversity": 0.3},
               "text_roleplay": {"items": 5, "distinct_2": 0.8}}
    out = intervals(numbers, {"t2i": {"clip_t": [0.1, 0.2, 0.3, 0.4]}})
    vqa = out["vqa"]["mcq_acc_likelihood"]
    assert vqa["n"] == 20 and vqa["method"] == "Wilson"
    assert (round(vqa["low"], 3), round(vqa["high"], 3)) == (0.299, 0.701)  # Wilson 95 % for 10/20
    clip = out["t2i"]["clip_t"]  # mean 0.25, sd 0.1291, t(3) 3.182: half width 0.2054
    assert clip["n"] == 4 and (round(clip["low"], 4), round(clip["high"], 4)) == (0.0446, 0.4554)
    assert out["t2i"]["diversity"] == {"n": 2, "low": None, "high": None, "method": "none"}
    assert out["text_roleplay"]["distinct_2"]["n"] == 5 and out["text_roleplay"]["distinct_2"]["low"] is None
    assert "items" not in out["vqa"]  # counts get no interval


def test_curves_png_draws_loss_and_reward_panels():
    import base64
    import io

    from PIL import Image

    from cmrp.evaluation.report import curves_png

    assert curves_png({}) is None
    uri = curves_png({"train/loss": [(0, 3.0), (1, 2.0), (2, 1.5)], "reward/total": [(3, 0.2), (4, 0.3)],
                      "val/reward/total": [(3, 0.21), (5, 0.33)]}, "run x")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    assert image.width > 2 * image.height  # two panels side by side
    halves = [image.crop((0, 0, image.width // 2, image.height)), image.crop((image.width // 2, 0, image.width,
                                                                              image.height))]
    for half in halves:  # each panel has its blue line
        assert sum(1 for r, g, b in half.getdata() if abs(r - 31) < 40 and abs(g - 95) < 40 and abs(b - 191) < 40) > 30


def test_small_images_are_enlarged_with_nearest_neighbour():
    import base64
    import io

    from PIL import Image

    from cmrp.evaluation.report import png_data_uri

    image = torch.zeros(3, 32, 32)
    image[0, :16] = 1.0  # top half red
    shown = Image.open(io.BytesIO(base64.b64decode(png_data_uri(image).split(",", 1)[1]))).convert("RGB")
    assert shown.size == (128, 128)
    assert shown.getpixel((5, 63)) == (255, 0, 0) and shown.getpixel((5, 64)) == (0, 0, 0)  # sharp edge, no blur
