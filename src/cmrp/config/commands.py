"""`cmrp validate | cat | cp | ls`: check, show, copy and list recipes without building anything.

`validate` checks everything a run would need (recipe, backbone card and its adapter, reward preset and the
pretrained weights it loads, output directory, the character's training examples) without building a model,
through the same pass `cmrp fit` runs first (`cmrp.training.preflight`); `cat` prints a recipe as the run will
see it (inheritance, overrides, the backbone card and the reward preset resolved); `cp` copies a shipped recipe
to edit; `ls` shows what can be named in a recipe. `ls`, `cat` and `cp` import no torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cmrp.config.assets import asset_names, find_asset, is_path_ref
from cmrp.config.params import Redactor
from cmrp.config.yamlio import display_path
from cmrp.data.sources import load_recipe_character
from cmrp.errors import ConfigError
from cmrp.registry import BACKBONES, DECODING, REWARDS
from cmrp.resources import asset_dir

__all__ = ["add_recipe_arguments", "register"]

_LS_WHAT = ("recipes", "backbones", "rewards", "decoding")


def add_recipe_arguments(p: argparse.ArgumentParser, example: str = "quickstart", overrides_example: str = "") -> None:
    """RECIPE and its KEY=VALUE overrides, as every command that loads a recipe takes them."""
    p.add_argument("recipe", help=f"recipe YAML path or shipped recipe name, e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of recipe keys" + (f", e.g. {overrides_example}" if overrides_example else ""))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a recipe, its backbone card and reward preset without running anything",
        description="Load a recipe with its `base:` files and overrides, and check every key, type and "
        "reference. RECIPE is a path or a shipped recipe name (see `cmrp ls recipes`).",
    )
    add_recipe_arguments(p)
    p.set_defaults(handler=_validate)

    p = subparsers.add_parser(
        "cat",
        help="print a recipe fully resolved: base files, overrides, backbone card and reward preset",
        description="Print the recipe a run of `cmrp fit RECIPE [key=value ...]` would use, as YAML: `base:` "
        "inheritance merged, overrides applied, interpolations resolved, the backbone card and the reward preset "
        "written out in full (secrets hidden). The output is itself a recipe: `cmrp cat quickstart > mine.yaml`.",
    )
    add_recipe_arguments(p)
    p.set_defaults(handler=_cat)

    p = subparsers.add_parser(
        "cp",
        help="copy a shipped recipe to edit it",
        description="Copy the shipped recipe NAME (see `cmrp ls recipes`) to DEST (a file, or a folder to copy "
        "into). Its `base:` references become shipped names, so the copy works from anywhere.",
    )
    p.add_argument("name", help="shipped recipe name, e.g. quickstart or bagel/sft")
    p.add_argument("dest", type=Path, help="destination file or folder")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.set_defaults(handler=_cp)

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
    from cmrp.training.preflight import check_run  # the pass `cmrp fit` runs before any work

    cfg = load_recipe(args.recipe, args.overrides)
    card, preset = resolve_recipe_parts(cfg)
    BACKBONES.require(card.adapter, where=f"backbone card {card.name!r}, key 'adapter'")
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

    shown = Redactor.from_environ().text("".join(" " + o for o in args.overrides))
    print(f"the whole recipe as a run sees it: cmrp cat {args.recipe}{shown}")
    return 0


def resolved_recipe(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """A recipe with everything it names written out (backbone card, reward preset), secrets hidden."""
    from omegaconf import OmegaConf

    from cmrp.config.loader import load_recipe, resolve_recipe_parts

    cfg = load_recipe(recipe, overrides)
    card, _ = resolve_recipe_parts(cfg)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data["backbone"] = OmegaConf.to_container(card, resolve=True)
    return Redactor.from_environ().mapping(data)


def _cat(args: argparse.Namespace) -> int:
    import yaml

    from cmrp.config.loader import find_recipe

    data = resolved_recipe(args.recipe, args.overrides)
    given = Redactor.from_environ().text(" ".join([display_path(find_recipe(args.recipe)), *args.overrides]))
    print(f"# cmrp cat {given}\n# base files merged, overrides applied, backbone card and reward preset resolved")
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110), end="")
    return 0


def _shipped_base_refs(text: str, source: Path) -> str:
    """`base: ../sft.yaml` (relative to the shipped file) -> `base: bagel/sft` (a shipped name)."""
    import re

    root = asset_dir("recipes").resolve()

    def shipped_name(ref: str) -> str:
        if not is_path_ref(ref) or Path(ref).is_absolute():
            return ref
        target = (source.parent / ref).resolve()
        return target.relative_to(root).with_suffix("").as_posix() if target.is_relative_to(root) else ref

    def line(match: re.Match) -> str:
        refs = [r.strip().strip("'\"") for r in match["refs"].strip("[] ").split(",")]
        names = [shipped_name(r) for r in refs if r]
        value = names[0] if not match["refs"].lstrip().startswith("[") else f"[{', '.join(names)}]"
        return f"{match['key']}{value}{match['rest']}"

    return re.sub(r"(?m)^(?P<key>base:\s*)(?P<refs>\[[^\]]*\]|[^#\n]*?)(?P<rest>\s*(#.*)?)$", line, text)


def _run_line_for(text: str, source: Path, dest: Path) -> str:
    """A copy's `# Run: cmrp fit recipes/<shipped>.yaml` line names the copy instead."""
    import re

    shipped = "recipes/" + source.resolve().relative_to(asset_dir("recipes").resolve()).as_posix()
    return re.sub(rf"\A(# Run: cmrp [a-z ]+? ){re.escape(shipped)}(?=\s|$)", lambda m: m[1] + dest.as_posix(), text)


def _cp(args: argparse.Namespace) -> int:
    if is_path_ref(args.name):
        raise ConfigError(f"cmrp cp {args.name}: give a shipped recipe name (see `cmrp ls recipes`), not a path; "
                          "to copy a file of your own use cp")
    source = find_asset("recipes", args.name)
    dest = args.dest.expanduser()
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        raise ConfigError(f"{dest.parent} is not a folder")
    text = _shipped_base_refs(source.read_text(encoding="utf-8"), source)
    dest.write_text(_run_line_for(text, source, dest), encoding="utf-8")
    print(f"copied {args.name} to {dest}; edit it, then: cmrp validate {dest} && cmrp fit {dest}")
    return 0


def _table(title: str, rows: Iterable[tuple[str, str]], empty: str) -> None:
    """`name  description` rows; long descriptions wrap under themselves (never cut)."""
    import shutil
    import textwrap

    rows = list(rows)
    print(f"{title}:")
    if not rows:
        print(f"  ({empty})")
        return
    width = max(len(name) for name, _ in rows)
    room = max(40, shutil.get_terminal_size((120, 24)).columns - width - 5)
    for name, detail in rows:
        lines = textwrap.wrap(detail, room) or [""]
        print(f"  {name:<{width}}  {lines[0]}".rstrip())
        for line in lines[1:]:
            print(f"  {'':<{width}}  {line}")


def _first_comment(text: str) -> str:
    """A recipe's leading `# ...` lines are its description."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        if not stripped.startswith("# Run:"):  # how to run it, not what it is
            lines.append(stripped.lstrip("#").strip())
    return " ".join(line for line in lines if line)


def _recipes() -> None:
    from cmrp.config.loader import find_recipe

    names = asset_names("recipes")
    rows = [(name, _first_comment(find_recipe(name).read_text(encoding="utf-8"))) for name in names]
    _table("recipes", rows, "none shipped")


def _describe_each(
    names: list[str], load: Callable[[str], Any], detail: Callable[[Any], str]
) -> list[tuple[str, str]]:
    """One row per shipped file; a broken file is shown as such instead of hiding the rest."""
    rows = []
    for name in names:
        try:
            rows.append((name, detail(load(name))))
        except ConfigError as err:
            rows.append((name, f"INVALID: {err}"))
    return rows


def _backbones() -> None:
    from cmrp.config.loader import load_backbone_card

    rows = _describe_each(
        asset_names("backbones"), load_backbone_card, lambda card: f"adapter {card.adapter}"
    )
    _table("backbone cards", rows, "none shipped")


def _rewards() -> None:
    from cmrp.config.loader import load_reward_preset

    rows = _describe_each(
        asset_names("rewards"),
        load_reward_preset,
        lambda preset: ", ".join(f"{term} {spec['weight']:g}" for term, spec in preset["terms"].items()),
    )
    _table("reward presets", rows, "none shipped")
    _table("reward terms", ((name, "") for name in REWARDS.names()), "none registered")


def _decoding() -> None:
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
