"""What a person sees: `cmrp fit` in a real terminal (tmux) shows Lightning's progress bar for each stage, with
loss / reward, it/s and time left, and none of Lightning's noise. The pane is also rendered to a PNG in headless
Chromium (set CMRP_SCREENSHOTS=DIR to keep it; the report's screenshot is taken in test_cli_eval)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import CMRP, ROOT
from tests.unit.test_eval_report import CHROMIUM

ARGS = ["recipes/bagel-tiny/sft_grpo.yaml", "trainer.max_steps=6", "data.batch_size=2", "data.max_text_tokens=32",
        "grpo.max_steps=3", "grpo.group_size=2", "grpo.prompts_per_step=1", "grpo.sample_steps=3",
        "grpo.minibatch_size=2", "eval.max_items=2", "eval.grid_prompts=1", "eval.images_per_prompt=1",
        "eval.sample_steps=2", "checkpoint.every_n_steps=0"]
BAR = r"{stage}: 100%\|█+\| {n}/{n} \[\d+:\d\d<\d+:\d\d, +[\d.]+(it/s|s/it), {values}\]"


def keep_screenshot(path: Path) -> None:
    """Copy a screenshot to $CMRP_SCREENSHOTS (for looking at it), when set."""
    folder = os.environ.get("CMRP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


def render_terminal(text: str, png: Path) -> None:
    """The captured pane as a terminal-looking page, screenshot by headless Chromium."""
    from playwright.sync_api import sync_playwright

    page_file = png.with_suffix(".html")
    page_file.write_text("<html><body style='margin:0;background:#1e1e1e'><pre style='color:#e6e6e6;font:13px "
                         f"DejaVu Sans Mono,monospace;padding:12px;margin:0'>{html.escape(text)}</pre></body></html>",
                         encoding="utf-8")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 200})
            page.goto(page_file.as_uri())
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow  # one SFT + GRPO fit: about a minute on a loaded 2-core machine
@pytest.mark.skipif(shutil.which("tmux") is None or CHROMIUM is None,
                    reason="needs tmux and chromium (apt-get install -y tmux chromium)")
def test_fit_in_a_terminal_shows_progress_bars_and_no_noise(tmp_path):
    sock = f"cmrp-screens-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    command = " ".join([CMRP, "fit", *ARGS, f"output_dir={tmp_path / 'run'}", "; echo CMRP-EXIT=$?; sleep 600"])
    subprocess.run([*tmux, "new-session", "-d", "-s", "fit", "-x", "150", "-y", "60", command], check=True, cwd=ROOT,
                   timeout=10)

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", "fit"], capture_output=True,
                              text=True, timeout=10).stdout

    try:
        deadline, live = time.monotonic() + 900, None
        while "CMRP-EXIT=" not in (text := pane()):
            assert time.monotonic() < deadline, f"cmrp fit did not end; the pane shows:\n{text}"
            if live is None and re.search(r"sft: +\d+%\|", text) and "grpo:" not in text:
                live = text  # the bar while SFT runs
            time.sleep(0.5)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
    assert "CMRP-EXIT=0" in text, text
    # one bar per stage, named after it, with its numbers, the rate and the time left
    assert re.search(BAR.format(stage="sft", n=6, values=r"loss=[\d.]+"), text), text
    assert re.search(BAR.format(stage="grpo", n=3, values=r"reward=-?[\d.]+, loss=-?[\d.e+-]+"), text), text
    for noise in ("Tip:", "litlogger", "LeafSpec", "max_epochs", "max_steps=", "Epoch 0"):
        assert noise not in text, (noise, text)
    assert text.count("GPU available") <= 1  # said once, not by every stage's Trainer
    assert "MLflow run:" in text and "browse with:  mlflow ui --backend-store-uri sqlite:///" in text
    png = tmp_path / "terminal-cmrp-fit.png"
    render_terminal(text.split("CMRP-EXIT=")[0].rstrip(), png)
    from PIL import Image

    with Image.open(png) as image:
        assert image.width >= 1200 and image.height > 200
    keep_screenshot(png)
    if live is not None:  # kept for looking at, not asserted: its timing depends on the machine's load
        render_terminal(live.rstrip(), tmp_path / "terminal-cmrp-fit-live.png")
        keep_screenshot(tmp_path / "terminal-cmrp-fit-live.png")
