"""`cmrp cat | cp | ls | validate`: what they print, and that they import no torch (they answer in about a
second; the registries list names and constructor kwargs from source). `validate` of a recipe with a GRPO stage
is the exception: it builds the reward to list every pretrained model it would miss, which imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cmrp.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "lightning", "transformers", "mlflow", "peft")


@pytest.mark.parametrize("argv", [["ls"], ["validate", "sandbox/sft"], ["cat", "quickstart"],
                                  ["cat", "quickstart", "rewards.terms.clip_similarity.weight=0.9"]])
def test_config_commands_import_nothing_heavy(argv):
    code = ("import contextlib, io, sys\nfrom cmrp.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"cmrp {' '.join(argv)} imported: {out.stdout.strip()}"


def test_registry_source_reading_matches_the_imported_registrations():
    """Names and kwargs read from source are what the decorators register and the constructors take."""
    import inspect

    from cmrp.registry import BACKBONES, DECODING, FEATURE_MODELS, REWARDS, Registry

    for registry in (BACKBONES, REWARDS, DECODING, FEATURE_MODELS):
        fresh = Registry(registry.kind, None, registry._builtin_modules, registry._symbol)  # noqa: SLF001
        static = {name: fresh.parameters(name) for name in fresh.names()}
        assert not fresh._loaded  # noqa: SLF001 - nothing imported to answer
        for name in static:
            registry.get(name)  # imports the built-in modules: their decorators register
        assert sorted(static) == sorted(registry._items) == registry.names()  # noqa: SLF001
        if registry is REWARDS:
            for name, params in static.items():
                signature = inspect.signature(registry.get(name))
                assert params == [p for p in signature.parameters if p != "self"], name


def test_cat_prints_a_recipe_that_loads_back_with_card_and_reward_resolved(tmp_path, capsys):
    assert main(["cat", "quickstart", "rewards.terms.clip_similarity.weight=0.9", "grpo.group_size=4"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["backbone"]["name"] == "bagel-sandbox" and data["backbone"]["weights"] == "sandbox://base"
    assert data["rewards"]["terms"]["clip_similarity"] == {"weight": 0.9, "kwargs": {"encoder": "sandbox-clip"}}
    assert data["rewards"]["terms"]["trainset_penalty"]["kwargs"]["tau_high"] == 0.85
    assert data["grpo"]["group_size"] == 4 and "base" not in data
    (tmp_path / "all.yaml").write_text(text)
    assert main(["cat", str(tmp_path / "all.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == data  # a fixed point: the output is itself a recipe


def test_cat_hides_secrets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789abcdef")
    assert main(["cat", "quickstart", "tracking.tracking_uri=https://u:hunter22@h/x",
                 "tracking.run_name=r-${oc.env:MY_SERVICE_TOKEN}"]) == 0
    out = capsys.readouterr().out
    assert "hunter22" not in out and "tok-0123456789abcdef" not in out and "u:***@h" in out


def test_cp_copies_with_shipped_base_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "bagel/lora/sft", "mine.yaml"]) == 0
    copied = (tmp_path / "mine.yaml").read_text()
    assert "base: bagel/sft\n" in copied and copied.startswith("# Run: cmrp fit mine.yaml\n# Unified-SFT of BAGEL-7B-MoT with LoRA")
    assert main(["validate", "mine.yaml"]) == 0
    assert main(["cp", "bagel/lora/sft", "mine.yaml"]) == 2  # exists: not overwritten without --force
    assert "--force" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert main(["cp", "ablations/sandbox/no_clip", "d"]) == 0
    copied = (tmp_path / "d" / "no_clip.yaml").read_text()
    assert "base: ablations/sandbox/sft_grpo" in copied and copied.startswith("# Run: cmrp fit d/no_clip.yaml\n")
    assert main(["cp", "quickstart", "d"]) == 0 and main(["validate", "d/quickstart.yaml"]) == 0


def test_ls_prints_whole_descriptions(capsys):
    assert main(["ls", "recipes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    quickstart = (ROOT / "recipes" / "quickstart.yaml").read_text().splitlines()
    assert quickstart[0] == "# Run: cmrp fit recipes/quickstart.yaml"  # how to run it: not part of the description
    description = " ".join(line.lstrip("# ").strip() for line in quickstart[1:] if line.startswith("#"))
    assert " ".join(description.split()) in out  # every other line of the leading comment, not cut
    assert "Run: cmrp" not in out


def test_reward_overrides_are_validated_with_the_closest_name(capsys):
    assert main(["validate", "quickstart", "rewards.terms.clip_similarty.weight=0.9"]) == 2
    assert "did you mean 'clip_similarity'" in capsys.readouterr().err
    assert main(["validate", "quickstart", "rewards.terms.clip_similarity.wieght=0.9"]) == 2
    assert "did you mean 'rewards.terms.clip_similarity.weight'" in capsys.readouterr().err
    assert main(["validate", "quickstart", "rewards.terms.clip_similarity.kwargs.encodr=x"]) == 2
    assert "did you mean 'encoder'" in capsys.readouterr().err


def test_inline_reward_changes_a_named_preset(tmp_path):
    from cmrp.config import load_recipe

    (tmp_path / "r.yaml").write_text("base: quickstart\n"
                                     "rewards: {base: sandbox, terms: {clip_similarity: {weight: 0.9}}}\n")
    cfg = load_recipe(str(tmp_path / "r.yaml"))
    assert cfg.rewards.terms.clip_similarity.weight == 0.9 and cfg.rewards.terms.vqa_consistency.weight == 0.3
    (tmp_path / "bad.yaml").write_text("base: quickstart\nrewards: {base: sandbox, terms: {clip_simlarity: {weight: 1}}}\n")
    from cmrp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"bad.yaml:2: key .rewards.terms.clip_simlarity. .*did you mean 'clip_similarity'"):
        load_recipe(str(tmp_path / "bad.yaml"))


def test_fit_summary_says_why_the_grpo_reward_was_not_measured():
    """With no held-out image prompt (grpo.heldout_prompts or eval.grid_prompts 0) the held-out reward is empty: the summary says so
    instead of printing "nan -> nan"."""
    from cmrp.training.commands import grpo_reward_line

    measured = {"heldout_reward_before": {"total": 0.6304, "clip": 0.8}, "heldout_reward_after": {"total": 0.6336}}
    # four decimals: GRPO's effect in the sandbox is a few thousandths
    assert grpo_reward_line(measured) == "grpo reward:    0.6304 -> 0.6336 (held-out prompts)"
    line = grpo_reward_line({"heldout_reward_before": {}, "heldout_reward_after": {}})
    assert "nan" not in line and "grpo.heldout_prompts" in line and "eval.grid_prompts" in line
