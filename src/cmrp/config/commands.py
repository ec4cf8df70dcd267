"""`cmrp validate RECIPE [key=value ...]` and `cmrp ls [recipes|backbones|rewards|decoding]`.

`validate` checks everything a run would need (recipe, backbone card and its adapter, reward preset,
output directory, the character's training examples) without building a model, through the same pass
`cmrp fit` runs first (`cmrp.training.preflight`); `ls` shows what can be named in a recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["register"]

_LS_WHAT = ("recipes", "backbones", "rewards", "decoding")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a recipe, its backbone card and reward preset without running anything",
        description="Load a recipe with its `base:` files and overrides, and check every key, type and "
        "reference. RECIPE is a path or a shipped recipe name (see `cmrp ls recipes`).",
    )
    p.add_argument("recipe", help="recipe YAML path or shipped recipe name, e.g. quickstart")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys")
    p.set_defaults(handler=_validate)

    p = subparsers.add_parser(
        "ls",
        help="list shipped recipes, backbone cards, reward presets and terms, decoding strategies",
        description="List what a recipe can name. Without an argument, list everything.",
    )
    p.add_argument("what", nargs="?", choices=_LS_WHAT, help="which list (default: all)")
    p.set_defaults(handler=_ls)


def _validate(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from cmrp.config.loader import find_recipe, load_recipe, resolve_recipe_parts
    from cmrp.config.yamlio import display_path
    from cmrp.data.sources import load_recipe_character
    from cmrp.registry import BACKBONES
    from cmrp.training.preflight import check_run  # the pass `cmrp fit` runs before any work

    cfg = load_recipe(args.recipe, args.overrides)
    card, preset = resolve_recipe_parts(cfg)
    BACKBONES.get(card.adapter, where=f"backbone card {card.name!r}, key 'adapter'")
    with tempfile.TemporaryDirectory(prefix="cmrp-validate-") as scratch:  # where a sandbox character is drawn
        check = check_run(cfg, lambda: load_recipe_character(cfg.data, Path(scratch)), fit=False)
    parts = [f"backbone {card.name}", f"stages {'+'.join(cfg.stages)}", f"finetune {cfg.finetune.mode}"]
    if preset is not None:
        parts.append(f"rewards {preset['name']}")
    print(f"OK: {display_path(find_recipe(args.recipe))} ({', '.join(parts)})")
    if check.counts:
        print("  training examples: " + ", ".join(f"{task} {n}" for task, n in check.counts.items()))
    if check.prompts is not None:
        print(f"  GRPO image prompts: {check.prompts}")
    for note in check.notes:
        print(f"  note: `cmrp fit` would stop on this machine: {note}")
    return 0


def _table(title: str, rows: Iterable[tuple[str, str]], empty: str) -> None:
    rows = list(rows)
    print(f"{title}:")
    if not rows:
        print(f"  ({empty})")
        return
    width = max(len(name) for name, _ in rows)
    for name, detail in rows:
        print(f"  {name:<{width}}  {detail}".rstrip())


def _first_comment(text: str) -> str:
    """A recipe's leading `# ...` line is its one-line description."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def _recipes() -> None:
    from cmrp.config.assets import asset_names
    from cmrp.config.loader import find_recipe

    names = asset_names("recipes")
    rows = [(name, _first_comment(find_recipe(name).read_text(encoding="utf-8"))) for name in names]
    _table("recipes", rows, "none shipped")


def _describe_each(
    names: list[str], load: Callable[[str], Any], detail: Callable[[Any], str]
) -> list[tuple[str, str]]:
    """One row per shipped file; a broken file is shown as such instead of hiding the rest."""
    from cmrp.errors import ConfigError

    rows = []
    for name in names:
        try:
            rows.append((name, detail(load(name))))
        except ConfigError as err:
            rows.append((name, f"INVALID: {err}"))
    return rows


def _backbones() -> None:
    from cmrp.config.assets import asset_names
    from cmrp.config.loader import load_backbone_card

    rows = _describe_each(
        asset_names("backbones"), load_backbone_card, lambda card: f"adapter {card.adapter}"
    )
    _table("backbone cards", rows, "none shipped")


def _rewards() -> None:
    from cmrp.config.assets import asset_names
    from cmrp.config.loader import load_reward_preset
    from cmrp.registry import REWARDS

    rows = _describe_each(
        asset_names("rewards"),
        load_reward_preset,
        lambda preset: ", ".join(f"{term} {spec['weight']:g}" for term, spec in preset["terms"].items()),
    )
    _table("reward presets", rows, "none shipped")
    _table("reward terms", ((name, "") for name in REWARDS.names()), "none registered")


def _decoding() -> None:
    from cmrp.registry import DECODING

    try:
        names = DECODING.names()
    except ModuleNotFoundError as err:
        if err.name != "cmrp.sampling.decoding":
            raise
        names = []
    rows = [(name, str(getattr(DECODING.get(name), "description", ""))) for name in names]
    _table("decoding strategies", rows, "none registered")


def _ls(args: argparse.Namespace) -> int:
    listers = {"recipes": _recipes, "backbones": _backbones, "rewards": _rewards, "decoding": _decoding}
    chosen = [args.what] if args.what else list(_LS_WHAT)
    for index, what in enumerate(chosen):
        if index:
            print()
        listers[what]()
    return 0
