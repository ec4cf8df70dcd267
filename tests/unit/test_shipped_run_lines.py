"""Every shipped recipe, sweep and backbone card starts with `# Run: <command>`, and the command is real.

The line is what a reader copies, so it is held to what `cmrp` itself accepts: the command parses with
the CLI's own parser, its YAML path exists and is the file itself or a recipe that includes it (through
`base:`, or for a backbone card by naming it, overrides included), and its overrides load.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cmrp.cli import build_parser
from cmrp.config import load_recipe
from cmrp.config.assets import find_asset

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(ROOT / "recipes").rglob("*.yaml"), *(ROOT / "backbones").glob("*.yaml")])
# the commands whose first positional argument is a recipe or sweep file
RECIPE_COMMANDS = {("fit",), ("plan",), ("validate",), ("sweep",), ("sandbox", "pretrain")}


def shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def run_line(path: Path) -> str:
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    assert first.startswith("# Run: "), f"{shown(path)}: the first line must be `# Run: <command>`"
    return first.removeprefix("# Run: ").strip()


def parsed(command: str, path: Path) -> tuple[tuple[str, ...], Path, list[str]]:
    """(sub-command words, the recipe file it runs, its KEY=VALUE overrides), checked by the CLI's parser."""
    words = shlex.split(command)
    assert words[0] == "cmrp", f"{shown(path)}: `# Run:` must be a cmrp command, not {command!r}"
    args, extra = build_parser().parse_known_args(words[1:])
    assert all("=" in arg and not arg.startswith("-") for arg in extra), f"{shown(path)}: cmrp rejects {extra}"
    verb = tuple(w for w in words[1:3] if not w.endswith(".yaml") and "=" not in w and not w.startswith("-"))
    verb = verb if verb in RECIPE_COMMANDS else verb[:1]
    assert verb in RECIPE_COMMANDS, f"{shown(path)}: `{command}` runs no recipe file"
    target = words[1 + len(verb)]
    assert target.endswith(".yaml") and (ROOT / target).is_file(), f"{shown(path)}: {target} is no file"
    overrides = [*getattr(args, "overrides", []), *extra]
    return verb, (ROOT / target).resolve(), overrides


def included_files(recipe: Path) -> set[Path]:
    """The recipe and every file it inherits through `base:` (what `cmrp fit` reads)."""
    data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    bases = data.get("base") or []
    found = {recipe.resolve()}
    for ref in [bases] if isinstance(bases, str) else bases:
        found |= included_files(find_asset("recipes", ref, relative_to=recipe.parent))
    return found


def card_of(recipe: Path, overrides: list[str]) -> Path:
    """The backbone card the recipe runs with these overrides."""
    return find_asset("backbones", str(load_recipe(recipe, overrides).backbone), relative_to=recipe.parent)


def test_every_shipped_yaml_is_covered():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert {"recipes/quickstart.yaml", "recipes/sweeps/sandbox.yaml", "backbones/bagel-tiny.yaml"} <= names
    assert any(n.startswith("recipes/ablations/") for n in names) and len(names) > 50


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_run_line_runs_this_file(path: Path):
    verb, target, overrides = parsed(run_line(path), path)
    if path.parent.name == "backbones":  # a card: a recipe that uses it
        assert verb != ("sweep",)
        assert card_of(target, overrides) == path.resolve(), f"{path.name}: {target} does not use this card"
    elif verb == ("sweep",):
        assert target == path.resolve()
    else:  # the recipe itself, or one that includes it
        assert path.resolve() in included_files(target), f"{shown(path)}: {target} does not include it"
        load_recipe(target, overrides)  # the overrides are valid keys and values


def test_a_wrong_run_line_is_caught(tmp_path):
    card = ROOT / "backbones" / "janus-tiny.yaml"
    with pytest.raises(AssertionError, match="does not use this card"):
        verb, target, overrides = parsed("cmrp fit recipes/quickstart.yaml", card)
        assert card_of(target, overrides) == card.resolve(), f"{card.name}: {target} does not use this card"
    with pytest.raises(AssertionError, match="no file"):
        parsed("cmrp fit recipes/nowhere.yaml", card)
    with pytest.raises(AssertionError, match="must be a cmrp command"):
        parsed("python train.py", card)
    (tmp_path / "r.yaml").write_text("name: r\n")
    with pytest.raises(AssertionError, match="first line"):
        run_line(tmp_path / "r.yaml")
