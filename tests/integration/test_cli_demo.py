"""`cmrp demo` through the real console script, driven by Playwright in headless Chromium.

One 3-step LoRA run is made for the module (about a minute on CPU), as in test_cli_chat.py; the demo server
is then started with `--port 0` (it binds a free port itself and prints it), a message is sent with 'with image' ticked, and the page must
show the character's reply (the same text `cmrp chat --once` prints) and a loaded image.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.waiting import scaled, wait_until

ROOT = Path(__file__).resolve().parents[2]
CMRP = str(Path(sys.executable).parent / "cmrp")
FIT = ["fit", "recipes/sandbox/sft.yaml", "trainer.max_steps=3", "finetune.mode=lora", "eval.max_items=4",
       "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2"]
CHAT = ["--steps", "2", "--max-new-tokens", "12"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MESSAGE = "hello, who are you?"

NEEDS_BROWSER = [
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                       reason="gradio is not installed (pip install 'cmrp[demo]')"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CMRP, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def words(text: str) -> str:
    """Only the word characters: the chat page renders replies as Markdown."""
    return re.sub(r"\W+", "", text)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run7"
    proc = run_cli(*FIT, "data.path=sandbox://7", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def served_at(log: Path, server: subprocess.Popen, seconds: float) -> str:
    """The page's URL, once the server has printed it (it binds its port itself: `--port 0`) and answers."""
    def printed():
        return re.search(r"serving a chat with .* on (http://127\.0\.0\.1:\d+) ", log.read_text())

    url = wait_until(printed, seconds, "the demo server's address line", server, every=0.5).group(1) + "/"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=scaled(5)) as response:  # noqa: S310 - the local server
                return response.status == 200
        except OSError:
            return False

    wait_until(answers, seconds, f"{url} to answer", server, every=0.5)
    return url


@NEEDS_BROWSER[0]
@NEEDS_BROWSER[1]
@NEEDS_BROWSER[2]
def test_demo_page_shows_reply_and_image(run, tmp_path):
    from playwright.sync_api import sync_playwright

    log = open(tmp_path / "server.log", "w+")
    once = None
    server = subprocess.Popen([CMRP, "demo", str(run), "--port", "0", "--out", str(tmp_path / "img"), *CHAT],
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        once = subprocess.Popen([CMRP, "chat", str(run), "--once", MESSAGE, "--out", str(tmp_path / "once"), *CHAT],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            url = served_at(tmp_path / "server.log", server, 300)
        except AssertionError as err:
            log.seek(0)
            raise AssertionError(f"{err}\n{log.read()[-3000:]}") from None
        stdout, stderr = once.communicate(timeout=scaled(300))
        assert once.returncode == 0, stderr[-3000:]
        expected = stdout.splitlines()[0].split(": ", 1)[1]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url, timeout=scaled(60_000))
                page.locator("#cmrp-message textarea").fill(MESSAGE)
                page.locator("#cmrp-with-image input[type=checkbox]").check()
                page.locator("#cmrp-send").click()
                page.wait_for_function(
                    "() => Array.from(document.querySelectorAll('#cmrp-chat img'))"
                    ".some(img => img.complete && img.naturalWidth > 0)", timeout=scaled(120_000))
                text = page.locator("#cmrp-chat").inner_text()
                shown = page.evaluate("() => Math.max(...Array.from(document.querySelectorAll('#cmrp-chat img'))"
                                      ".map(img => img.naturalWidth))")
            finally:
                browser.close()
        assert MESSAGE in text
        assert words(expected) and words(expected) in words(text)
        # the sample as drawn, and the copy the page shows, enlarged (nearest neighbour) from 32 px
        assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["image-0001-view.png", "image-0001.png"]
        assert shown >= 256
    finally:
        if once is not None and once.poll() is None:
            once.kill()
            once.wait(timeout=15)
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        log.close()


def test_demo_defaults_to_localhost_without_share():
    from cmrp.cli import build_parser

    args = build_parser().parse_args(["demo", "some/run"])
    assert args.host == "127.0.0.1" and args.share is False


def test_bad_path_is_one_clear_error(tmp_path):
    proc = run_cli("demo", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"cmrp demo: error: {tmp_path / 'missing'} does not exist; pass a `cmrp fit` output_dir or a character "
        "artefact"]


def test_missing_gradio_is_a_clear_error(monkeypatch):
    from cmrp.chat.demo import _import_gradio
    from cmrp.errors import CmrpError

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(CmrpError, match=re.escape("pip install 'cmrp[demo]'")):
        _import_gradio()
