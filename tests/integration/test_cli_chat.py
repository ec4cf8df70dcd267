"""`cmrp chat` and shareable characters through the real console script on quickstart LoRA checkpoints.

One 3-step LoRA run is made once for the module (about a minute on CPU). Several characters on one base
(adapter hot-swap) are checked in tests/unit/test_chat.py with LoRA weights that differ visibly; two CLI runs
share a base when the second has `init_from` a folder holding only the first run's `backbone/`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CMRP = str(Path(sys.executable).parent / "cmrp")
FIT = ["fit", "recipes/sandbox/sft.yaml", "trainer.max_steps=3", "finetune.mode=lora", "eval.max_items=4",
       "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2"]
CHAT = ["--steps", "2", "--max-new-tokens", "12"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CMRP, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def character_name(run: Path) -> str:
    return json.loads((run / "character" / "character.json").read_text())["name"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    first = root / "run7"
    proc = run_cli(*FIT, "data.path=sandbox://7", f"output_dir={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"first": first, "root": root}


def test_once_replies_with_text_and_a_png(runs, tmp_path):
    from PIL import Image

    run = runs["first"]
    proc = run_cli("chat", str(run), "--once", "hello", "--image", "--out", str(tmp_path / "img"), *CHAT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{character_name(run)}: ") and len(lines[0]) > len(character_name(run)) + 2
    image = Path(lines[-1].removeprefix("[image] "))
    assert lines[-1].startswith("[image] ") and image.parent == tmp_path / "img" and image.suffix == ".png"
    with Image.open(image) as img:
        img.load()
        config = json.loads((run / "checkpoint" / "backbone" / "config.json").read_text())
        size = config["architecture"]["vit"]["image_size"]
        assert img.size == (size, size) and img.mode == "RGB"


def test_bad_path_is_one_clear_error(tmp_path):
    proc = run_cli("chat", str(tmp_path / "missing"), "--once", "hi")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"cmrp chat: error: {tmp_path / 'missing'} does not exist; pass a `cmrp fit` output_dir or a character "
        "artefact"]
    (tmp_path / "empty").mkdir()
    proc = run_cli("chat", str(tmp_path / "empty"), "--once", "hi")
    assert proc.returncode == 2 and "holds no cmrp checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_interactive_session_in_tmux(runs, tmp_path):
    run = runs["first"]
    name = character_name(run)
    sock = f"cmrp-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    cmd = " ".join([CMRP, "chat", str(run), "--out", str(tmp_path / "img"), *CHAT])
    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "220", "-y", "60", cmd], check=True,
                   cwd=ROOT, timeout=10)

    def pane() -> str:
        out = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", "chat"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout

    def wait_for(predicate, seconds: float) -> str:  # generous: a loaded 2-core machine (CMRP_TEST_TIME_SCALE)
        def shown() -> str | None:
            text = pane()
            return text if predicate(text) else None

        try:
            return wait_until(shown, seconds, "the pane", every=0.3)
        except AssertionError as err:
            raise AssertionError(f"{err}; the pane shows:\n{pane()}") from None

    def replies(text: str) -> int:
        return len(re.findall(rf"^{re.escape(name)}: ", text, flags=re.M))

    def send(line: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "chat", "-l", line], check=True, timeout=10)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "Enter"], check=True, timeout=10)

    try:
        wait_for(lambda t: "you> " in t, 300)  # loading the model
        send("hello, who are you?")
        wait_for(lambda t: replies(t) >= 1, 120)
        send("what do you like to eat?")
        wait_for(lambda t: replies(t) >= 2, 120)
        send("/image draw me")
        text = wait_for(lambda t: "[image] " in t and t.rstrip().endswith("you>"), 120)
        assert replies(text) == 3
        image = Path(re.search(r"^\[image\] (\S+)$", text, flags=re.M).group(1))
        assert image.is_file() and image.parent == tmp_path / "img"
        send(f"/save {tmp_path / 't.json'}")
        wait_for(lambda t: "[saved] " in t, 120)
        turns = json.loads((tmp_path / "t.json").read_text())["turns"]
        assert [t["role"] for t in turns] == ["user", "character"] * 3
        assert turns[4]["text"] == "draw me" and turns[5]["image"] == str(image)
        send("/quit")
        wait_until(lambda: subprocess.run([*tmux, "has-session", "-t", "chat"], capture_output=True).returncode != 0,
                   120, "cmrp chat to exit on /quit", every=0.3)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


def test_eof_ends_cleanly(runs):
    proc = subprocess.run([CMRP, "chat", str(runs["first"]), *CHAT], input="hi\n", capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("you> ") == 2 and f"{character_name(runs['first'])}: " in proc.stdout


def test_character_artefact_round_trip(runs):
    from peft import PeftModel

    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.chat.artefact import load_character, load_chat_source
    from cmrp.data.tasks import Example, Segment

    run, art = runs["first"], runs["root"] / "art7"
    proc = run_cli("save-character", str(run), str(art))
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((art / "character_card.json").read_text())
    assert card["name"] == character_name(run) and card["kind"] == "lora" and card["decoding"] == "chain"
    assert card["profile"].startswith(card["name"])
    # the run's base is the shipped sandbox base (same weights): named by its portable reference and content hash
    from cmrp.resources import shipped_base

    base = shipped_base("base")
    assert card["base"]["ref"] == "sandbox://base" and re.fullmatch(r"[0-9a-f]{64}", card["base"]["content_sha256"])
    assert not (art / "base").exists() and str(run) not in json.dumps(card)
    adapter_config = json.loads((art / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sandbox://base"
    assert card["thumbnails"] and all((art / t).is_file() for t in card["thumbnails"])
    from PIL import Image

    with Image.open(art / card["thumbnails"][0]) as img:
        assert max(img.size) <= 64
    ctx = [Example("chat", [Segment("text", "system", f"You are {card['name']}. Stay in character."),
                            Segment("text", "user", "hello, who are you?")])]
    from_run, info = load_chat_source(run)
    from_art, art_info = load_character(art)
    assert info.name == art_info.name and info.profile == art_info.profile
    with torch.no_grad():
        assert from_run.generate_text(ctx, max_new_tokens=16) == from_art.generate_text(ctx, max_new_tokens=16)
    plain = PeftModel.from_pretrained(BagelAdapter.from_pretrained(base).model, str(art / "adapter"))
    assert any("lora_A" in n for n, _ in plain.named_parameters())
    proc = run_cli("chat", str(art), "--once", "hello", *CHAT)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{card['name']}: "), proc.stderr[-2000:]
    # --base: the base folder given explicitly (here a copy of the shipped one) instead of the card's reference
    shutil.copytree(base, runs["root"] / "base-copy")
    explicit = run_cli("chat", str(art), "--once", "hello", "--base", str(runs["root"] / "base-copy"), *CHAT)
    assert explicit.returncode == 0 and explicit.stdout == proc.stdout, explicit.stderr[-2000:]
    missing = run_cli("chat", str(art), "--once", "hello", "--base", str(runs["root"] / "no-base"), *CHAT)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "no-base not found" in missing.stderr, missing.stderr


@pytest.mark.slow  # one more fit and four chats: about 4 minutes on a loaded 2-core machine
def test_shared_character_travels(runs, tmp_path):
    """Characters copied to another folder, their runs gone: a LoRA character on the shipped base, and one whose
    base the run made (random init: the artefact carries a copy of it) — `cmrp chat` answers as from the run."""
    made = runs["root"] / "run-tiny"
    proc = run_cli(*FIT, "backbone=bagel-tiny", "data.path=sandbox://7", f"output_dir={made}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run, ref in ((runs["first"], "sandbox://base"), (made, "base")):
        art = tmp_path / f"made-{run.name}"
        assert run_cli("save-character", str(run), str(art)).returncode == 0
        card = json.loads((art / "character_card.json").read_text())
        assert card["base"]["ref"] == ref and (art / "base" / "model.safetensors").is_file() == (ref == "base")
        before = run_cli("chat", str(art), "--once", "hello", *CHAT)
        assert before.returncode == 0, before.stderr[-2000:]
        elsewhere = tmp_path / f"elsewhere-{run.name}" / "shared-character"
        shutil.copytree(art, elsewhere.parent / "copy")
        shutil.rmtree(art)
        (elsewhere.parent / "copy").rename(elsewhere)
        away = run.with_name(run.name + "-moved")
        run.rename(away)  # the run (and its checkpoint/backbone) is no longer where the artefact was made
        try:
            after = subprocess.run([CMRP, "chat", "shared-character", "--once", "hello", *CHAT], capture_output=True,
                                   text=True, timeout=600, cwd=elsewhere.parent)
        finally:
            away.rename(run)
        assert after.returncode == 0, after.stderr[-2000:]
        assert after.stdout == before.stdout  # the same character: same greedy reply
