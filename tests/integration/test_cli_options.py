"""CLI options no other test runs end to end, each through the real console script on tiny sandbox runs:
`--version`; `cmrp ls` on the shipped recipes, cards and reward presets; `decoding: think` in a recipe and
`cmrp chat --decoding/--temperature/--seed` on its run; `save-character` of a full fine-tuning run;
`resume: auto` in a recipe; `cmrp eval --baseline DIR`. (`chat --base` is in test_cli_chat.py, which has a
LoRA character.)"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tomllib
from functools import cache
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.test_cli_fit import ROOT, read_run, run_cli
from tests.integration.test_resume import kill_after

# both runs share every setting `cmrp eval` reads from a recipe (decoding, text length): only training differs
SHARED = ["recipes/sandbox/sft.yaml", "decoding=think", "data.batch_size=2", "data.max_text_tokens=32",
          "eval.max_items=2", "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2"]
RESUMABLE = [*SHARED, "trainer.max_steps=6", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1",
             "resume=auto"]
CHAT = ["--steps", "2", "--max-new-tokens", "12"]
EVAL = ["--features", "sandbox", "--max-items", "2", "--samples", "1", "--steps", "2", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def think_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("think") / "run"
    proc = run_cli("fit", *SHARED, "trainer.max_steps=2", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run with `resume: auto`, SIGKILLed after its step-2 checkpoint and started again with the same
    command (no --resume), then once more after it finished; the three runs' stdout."""
    out = tmp_path_factory.mktemp("auto") / "run"
    printed = []
    kill_after(RESUMABLE, out, lambda names: "00-sft-00000002" in names)
    for _ in range(2):
        proc = run_cli("fit", *RESUMABLE, f"output_dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed.append(proc.stdout)
    return out, printed


@cache
def chat(source: str, *args: str) -> tuple[str, str | None]:
    """`cmrp chat SOURCE --once ... ARGS`: the reply line and, with --image, the image's sha256."""
    out = Path(source).parent / f"chat-{hashlib.sha256(repr(args).encode()).hexdigest()[:12]}"
    proc = run_cli("chat", source, "--once", "hello, draw yourself", "--out", str(out), *CHAT, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    image = lines[-1].removeprefix("[image] ") if lines[-1].startswith("[image] ") else None
    return lines[0], hashlib.sha256(Path(image).read_bytes()).hexdigest() if image else None


def test_version_is_the_installed_packages():
    proc = run_cli("--version")
    assert proc.returncode == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.stdout == f"cmrp {importlib.metadata.version('cmrp')}\n" == f"cmrp {version}\n"


def test_ls_lists_every_shipped_recipe_card_and_reward_preset():
    def names(kind: str, header: str) -> set[str]:
        proc = run_cli("ls", kind)
        assert proc.returncode == 0 and "INVALID" not in proc.stdout, proc.stdout + proc.stderr
        listed = set()
        for line in proc.stdout.split(header, 1)[1].splitlines():
            if not line.startswith("  "):
                break  # the next section
            if line[2] != " ":  # not a wrapped description
                listed.add(line.split()[0])
        return listed

    recipes = {str(p.relative_to(ROOT / "recipes").with_suffix("")) for p in (ROOT / "recipes").rglob("*.yaml")}
    sweeps = {r for r in recipes if r.startswith("sweeps/")}  # `cmrp sweep` files, not recipes
    assert sweeps and names("recipes", "recipes:\n") == recipes - sweeps
    assert names("backbones", "backbone cards:\n") == {p.stem for p in (ROOT / "backbones").glob("*.yaml")}
    assert names("rewards", "reward presets:\n") == {p.stem for p in (ROOT / "rewards").glob("*.yaml")}


def test_recipe_decoding_think_is_the_runs_and_its_characters_default(think_run):
    _, run = read_run(think_run)
    assert run.data.params["decoding"] == "think"
    assert json.loads((think_run / "metrics.json").read_text())["examples_per_task"]["thinking"] > 0
    default = chat(str(think_run), "--image")
    assert default == chat(str(think_run), "--image", "--decoding", "think")
    chain, joint = chat(str(think_run), "--image", "--decoding", "chain"), chat(str(think_run), "--image",
                                                                                 "--decoding", "joint")
    # the reply comes first in every strategy; the image differs: after the thinking, after the reply, or alone
    assert default[0] == chain[0] == joint[0]
    assert len({default[1], chain[1], joint[1]}) == 3


def test_chat_temperature_and_seed(think_run):
    greedy = chat(str(think_run))[0]
    assert chat(str(think_run), "--seed", "5")[0] == greedy  # greedy replies do not depend on the seed
    hot = chat(str(think_run), "--temperature", "1.5", "--seed", "1")[0]
    chat.cache_clear()  # really run it again
    assert chat(str(think_run), "--temperature", "1.5", "--seed", "1")[0] == hot  # sampled, reproducibly
    assert chat(str(think_run), "--temperature", "1.5", "--seed", "2")[0] != hot
    assert hot != greedy


def test_save_character_of_a_full_fine_tuning_run(think_run, tmp_path):
    art = tmp_path / "character"
    proc = run_cli("save-character", str(think_run), str(art))
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((art / "character_card.json").read_text())
    assert card["kind"] == "full" and card["decoding"] == "think" and card["finetune"]["mode"] == "full"
    assert not (art / "adapter").exists()  # the whole fine-tuned backbone, no adapter
    saved = load_file(str(art / "backbone" / "model.safetensors"))
    trained = load_file(str(think_run / "checkpoint" / "backbone" / "model.safetensors"))
    assert saved.keys() == trained.keys() and all((saved[k] == trained[k]).all() for k in saved)
    assert chat(str(art), "--image") == chat(str(think_run), "--image")  # the same character, its own decoding
    # --base belongs to LoRA characters: a full one carries its whole model, so a base is refused, not ignored
    proc = run_cli("chat", str(art), "--base", str(think_run), "--once", "hello")
    assert proc.returncode == 2 and "drop --base" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_resume_auto_continues_a_killed_run(resumed_run):
    out, (resumed, again) = resumed_run
    assert "resumed from:" in resumed and "00-sft-0000000" in resumed
    assert "this run already finished" in again
    client, run = read_run(out)  # one MLflow run, continued: every step logged once
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(6))


def test_eval_baseline_dir_is_that_run_evaluated_the_same_way(think_run, resumed_run, tmp_path):
    other, _ = resumed_run
    proc = run_cli("eval", str(think_run), "--baseline", str(other), *EVAL, "--out", str(tmp_path / "vs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "vs" / "eval.json").read_text())
    assert report["baseline_source"] == str(other)
    proc = run_cli("eval", str(other), "--baseline", "none", *EVAL, "--out", str(tmp_path / "alone"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads((tmp_path / "alone" / "eval.json").read_text())
    assert alone["baseline"] is None
    assert report["baseline"]["numbers"] == alone["model"]["numbers"]
    assert report["model"]["numbers"] != report["baseline"]["numbers"]
