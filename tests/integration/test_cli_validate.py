"""`cmrp validate` and `cmrp ls` through `cmrp.cli.main`, on tiny recipes written here.

Most tests assemble the CLI from this area's sub-commands only, so they exercise `main`'s real
error handling without depending on the other areas' command modules; one test uses the full CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cmrp import cli, resources
from cmrp.registry import DECODING

CARD = "name: tiny-card\nadapter: bagel\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def own_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("cmrp.config.commands",))


@pytest.fixture
def assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "assets"
    write(root / "backbones" / "tiny-card.yaml", CARD)
    write(root / "backbones" / "broken.yaml", "adapter: bagel\nadaptr: x\n")
    write(
        root / "rewards" / "pre.yaml",
        "description: two terms\nterms: {clip_similarity: {weight: 0.5}, brightness: {weight: 1}}\n",
    )
    write(root / "recipes" / "quick.yaml", "# The quick one.\nname: quick\nbackbone: tiny-card\n")
    write(
        root / "recipes" / "family" / "sft_grpo.yaml",
        "base: ../quick.yaml\nstages: [sft, grpo]\nrewards: pre\n",
    )
    monkeypatch.setattr(resources, "asset_dir", lambda kind: root / kind)
    return root


def test_validate_ok_through_the_full_cli(tmp_path, capsys):
    write(tmp_path / "card.yaml", CARD)
    recipe = write(tmp_path / "r.yaml", "backbone: card.yaml\nfinetune: {mode: lora}\n")
    assert cli.main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: ") and "r.yaml (backbone tiny-card, stages sft, finetune lora)" in out


def test_validate_ok_with_overrides(own_cli, assets, capsys):
    assert cli.main(["validate", "quick", "finetune.mode=full", "stages=[sft,grpo]", "rewards=pre"]) == 0
    out = capsys.readouterr().out
    assert "quick.yaml (backbone tiny-card, stages sft+grpo, finetune full, rewards pre)" in out


def test_validate_nested_recipe_name(own_cli, assets, capsys):
    assert cli.main(["validate", "family/sft_grpo"]) == 0
    assert "stages sft+grpo" in capsys.readouterr().out


def test_validate_typo_exits_2_with_a_clear_message(own_cli, tmp_path, capsys):
    write(tmp_path / "card.yaml", CARD)
    recipe = write(tmp_path / "r.yaml", "backbone: card.yaml\ntrainer:\n  max_step: 5\n")
    assert cli.main(["validate", str(recipe)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cmrp validate: error: ")
    assert "r.yaml:3" in captured.err and "did you mean 'trainer.max_steps'?" in captured.err
    assert "Traceback" not in captured.err


def test_validate_bad_override_exits_2(own_cli, assets, capsys):
    assert cli.main(["validate", "quick", "finetune.mode=lorra"]) == 2
    assert "command-line override 'finetune.mode=lorra'" in capsys.readouterr().err


def test_validate_missing_recipe_lists_names(own_cli, assets, capsys):
    assert cli.main(["validate", "quik"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'quick'?" in err and "family/sft_grpo" in err


def test_validate_checks_the_card_adapter(own_cli, tmp_path, capsys):
    write(tmp_path / "card.yaml", "name: c\nadapter: bagle\n")
    recipe = write(tmp_path / "r.yaml", "backbone: card.yaml\n")
    assert cli.main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone adapter 'bagle'" in err and "Did you mean 'bagel'?" in err


def test_ls_recipes(own_cli, assets, capsys):
    assert cli.main(["ls", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "recipes:"
    assert lines[1].split() == ["family/sft_grpo"]
    assert lines[2] == "  quick            The quick one."  # names aligned in one column


def test_ls_backbones_shows_adapters_and_broken_cards(own_cli, assets, capsys):
    assert cli.main(["ls", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "  tiny-card  adapter bagel" in out
    assert "broken     INVALID:" in out and "adaptr" in out


def test_ls_rewards_lists_presets_and_terms(own_cli, assets, capsys):
    assert cli.main(["ls", "rewards"]) == 0
    out = capsys.readouterr().out
    assert "reward presets:\n  pre  clip_similarity 0.5, brightness 1\n" in out
    assert "reward terms:" in out


def test_ls_decoding(own_cli, capsys):
    assert cli.main(["ls", "decoding"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decoding strategies:")
    for name in DECODING.names():
        assert f"  {name}" in out


def test_ls_decoding_without_the_sampling_module(own_cli, capsys, monkeypatch):
    def missing() -> list[str]:
        raise ModuleNotFoundError("No module named 'cmrp.sampling.decoding'", name="cmrp.sampling.decoding")

    monkeypatch.setattr(DECODING, "names", missing)
    assert cli.main(["ls", "decoding"]) == 0
    assert "(none registered)" in capsys.readouterr().out


def test_ls_everything(own_cli, assets, capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for title in ("recipes:", "backbone cards:", "reward presets:", "reward terms:", "decoding strategies:"):
        assert title in out


def test_ls_rejects_an_unknown_list(own_cli, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["ls", "widgets"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
