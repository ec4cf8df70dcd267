"""`cmrp validate` passes for every shipped recipe (BAGEL-7B paper recipes included) without building
or downloading any model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cmrp import cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "sweeps" not in p.parts)  # sweeps: cmrp sweep
BAGEL_RECIPES = {"sft", "grpo", "sft_grpo", "lora/sft", "lora/grpo", "lora/sft_grpo",
                 "qlora/sft", "qlora/grpo", "qlora/sft_grpo"}


def test_the_bagel_paper_recipes_are_shipped():
    shipped = {p.relative_to(ROOT / "recipes" / "bagel").with_suffix("").as_posix()
               for p in (ROOT / "recipes" / "bagel").rglob("*.yaml")}
    assert BAGEL_RECIPES <= shipped


@pytest.fixture
def no_model_building(monkeypatch):
    """Any attempt to build or load a backbone fails the test."""
    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.backbones.bagel.model import Bagel

    def forbidden(*args, **kwargs):
        raise AssertionError("cmrp validate built or loaded a model")

    monkeypatch.setattr(Bagel, "__init__", forbidden)
    monkeypatch.setattr(BagelAdapter, "build", classmethod(forbidden))
    monkeypatch.setattr(BagelAdapter, "from_pretrained", classmethod(forbidden))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES])
def test_cmrp_validate_passes(recipe, no_model_building, capsys):
    assert cli.main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: ") and recipe.name in out


def test_paper_settings_of_the_bagel_recipes():
    from cmrp.config import load_recipe

    sft = load_recipe(ROOT / "recipes" / "bagel" / "sft.yaml")
    assert sft.backbone == "bagel-7b-mot" and sft.finetune.mode == "full"
    assert (sft.sft.ce_weight, sft.sft.mse_weight) == (0.25, 1.0)
    opt = sft.sft.optimizer
    assert (opt.name, opt.lr, list(opt.betas), opt.scheduler) == ("adamw", 2e-5, [0.9, 0.95], "constant")
    assert 500 <= sft.trainer.max_steps <= 1000
    g = load_recipe(ROOT / "recipes" / "bagel" / "grpo.yaml").grpo
    assert (g.group_size, g.sample_steps, g.cfg_scale, g.timestep_shift) == (8, 15, 4.0, 3.0)
    assert (g.window_size, list(g.window_range), g.clip_range, g.kl_beta) == (3, [0.0, 0.5], 1e-5, 0.0)
    assert g.optimizer.lr == 1e-5 and list(g.train_groups) == ["generation"]
    assert load_recipe(ROOT / "recipes" / "bagel" / "grpo.yaml").eval.sample_steps == 50
    lora = load_recipe(ROOT / "recipes" / "bagel" / "lora" / "grpo.yaml")
    assert lora.finetune.mode == "lora" and lora.finetune.targets == "generation"
    qlora = load_recipe(ROOT / "recipes" / "bagel" / "qlora" / "sft_grpo.yaml")
    assert qlora.finetune.mode == "qlora" and qlora.finetune.r == 64 and qlora.sft.ce_weight == 0.25


def test_real_cli_validates_a_7b_recipe_in_a_fresh_process():
    """The console entry point, as a user runs it: offline, no GPU, no weights on disk."""
    proc = subprocess.run([sys.executable, "-m", "cmrp.cli", "validate", str(ROOT / "recipes/bagel/qlora/grpo.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "OK: " in proc.stdout and "finetune qlora" in proc.stdout


def test_qlora_cannot_be_sharded(capsys):
    rc = cli.main(["validate", str(ROOT / "recipes/bagel/qlora/sft.yaml"), "trainer.strategy=fsdp"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "trainer.strategy" in err and "QLoRA" in err
