"""From a sweep file to its cells: rows (the product of the axes) x seeds, each a `cmrp fit` + `cmrp eval`.

Every cell's recipe is loaded and validated here (so `--dry-run` finds a bad override before anything runs)
and fingerprinted with the function `cmrp fit --resume` uses. A cell's record, `<cell>/sweep-cell.json`, is
written when the cell starts (state `started`) and again when its eval.json is written (state `done`); it
holds the recipe's fingerprint, the fingerprint of the cell it starts from (`init_from_cell`) and the eval
options. A cell is done when its record says so and matches all three; a cell whose recipe, or whose
starting cell, changed since its earlier run is `changed` and is never silently mixed with the old run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrp.config import Redactor, load_recipe
from cmrp.config.layers import override_layers
from cmrp.errors import ConfigError
from cmrp.evaluation.commands import register
from cmrp.sweeps.spec import Sweep, Variant, check_managed, render_value
from cmrp.tracking import default_tracking_uri

__all__ = ["RECORD", "Cell", "Plan", "cell_status", "eval_arguments", "make_plan"]

RECORD = "sweep-cell.json"
# `cmrp eval` options a sweep decides itself
_EVAL_MANAGED = {"checkpoint": "the cell's run", "out": "<cell>/eval", "tracking_uri": "the sweep's store",
                 "mmrole_tests": None, "answers": None, "images": None, "allow_missing_images": None,
                 "mmrole_limit": None}


@dataclass
class Cell:
    """One run of the table: a row at one seed."""

    row: str
    label: str
    seed: int
    recipe: Path
    overrides: tuple[str, ...]  # the sweep's, the row's and the command line's, in that order
    source_row: str | None  # init_from_cell: the row whose run (same seed) this one starts from
    dir: Path
    eval_args: tuple[str, ...]
    depends: Cell | None = None
    recipe_fingerprint: str = ""
    fingerprint: str = ""  # the recipe's, the starting cell's and the eval options, together
    status: str = "new"  # new | resume | done | changed

    @property
    def name(self) -> str:
        return f"{self.row}/seed{self.seed}"

    @property
    def depth(self) -> int:
        return 0 if self.depends is None else self.depends.depth + 1

    def fit_args(self, tracking_uri: str, experiment: str) -> list[str]:
        """`cmrp fit` arguments: the recipe, its overrides, then what the sweep sets in every cell."""
        managed = {"seed": self.seed, "output_dir": str(self.dir), "tracking.tracking_uri": tracking_uri,
                   "tracking.experiment": experiment, "tracking.run_name": self.name}
        if self.depends is not None:
            managed["init_from"] = str(self.depends.dir)
        return [str(self.recipe), *self.overrides,
                *(f"{k}={render_value(v, f'sweep cell {self.name}: {k}')}" for k, v in managed.items())]


@dataclass
class Plan:
    sweep: Sweep
    out: Path
    tracking_uri: str
    experiment: str
    cells: list[Cell]
    rows: dict[str, str]  # row -> label, in table order

    def waves(self, cells: list[Cell]) -> list[list[Cell]]:
        """`cells` grouped so that every cell comes after the cell it starts from."""
        depth = max((c.depth for c in cells), default=-1)
        return [w for w in ([c for c in cells if c.depth == d] for d in range(depth + 1)) if w]


def eval_arguments(options: dict[str, Any], where: Callable[..., str]) -> list[str]:
    """`cmrp eval` options from a mapping (`{features: sandbox, samples: 8}` -> `--features sandbox
    --samples 8`), checked against `cmrp eval`'s own parser so a bad name or value fails here. `where(*key)`
    names the file, line and key of an option (of the mapping itself without a key)."""
    import argparse

    class _Strict(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            raise ConfigError(f"{where()}: {message}")

    sub = _Strict(prog="cmrp").add_subparsers()
    register(sub)
    parser = sub.choices["eval"]
    actions = {a.dest: a for a in parser._actions if a.option_strings}  # noqa: SLF001 - argparse has no public list
    args: list[str] = []
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        if dest in _EVAL_MANAGED:
            raise ConfigError(f"{where(key)}: not a sweep option (a sweep sets {_EVAL_MANAGED[dest]})"
                              if _EVAL_MANAGED[dest] else f"{where(key)}: MMRole's test files are not swept")
        action = actions.get(dest)
        if action is None:
            import difflib

            close = difflib.get_close_matches(dest, [d for d in actions if d != "help"], n=1)
            raise ConfigError(f"{where(key)}: `cmrp eval` has no option '{key}'"
                              + (f"; did you mean '{close[0]}'?" if close else ""))
        if value is None or value is False:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if value is not True:
                raise ConfigError(f"{where(key)}: a switch: true or false, got {value!r}")
            args.append(flag)
        else:
            args += [flag, str(value)]
    parser.parse_args(["RUN_DIR", *args])  # types and choices, as `cmrp eval` will read them
    return args


def _rows(sweep: Sweep) -> list[tuple[Variant, ...]]:
    return list(itertools.product(*sweep.axes.values())) if sweep.axes else [()]


def _row_name(choice: tuple[Variant, ...], sweep: Sweep) -> str:
    return ",".join(v.name for v in choice) if choice else sweep.recipe.stem


def _source_row(choice: tuple[Variant, ...], sweep: Sweep) -> str | None:
    """The row a row starts from: its variants with `init_from_cell` replaced (one axis at most)."""
    axes = list(sweep.axes)
    sources = [(i, v) for i, v in enumerate(choice) if v.init_from_cell is not None]
    if len(sources) > 1:
        raise ConfigError(f"{sweep.where('axes')}: row {_row_name(choice, sweep)} would start from two cells "
                          f"(init_from_cell on axes {', '.join(axes[i] for i, _ in sources)}); keep one")
    if not sources:
        return None
    i, variant = sources[0]
    by_name = {v.name: v for v in sweep.axes[axes[i]]}
    return _row_name((*choice[:i], by_name[variant.init_from_cell], *choice[i + 1:]), sweep)


def _fingerprint(cell: Cell) -> str:
    parts = [cell.recipe_fingerprint, cell.depends.fingerprint if cell.depends else "", json.dumps(cell.eval_args)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _recorded_fingerprints(run_dir: Path) -> set[str]:
    """The recipe fingerprints an earlier run in this folder recorded (finished run, resume checkpoints)."""
    found = set()
    for path in [run_dir / "metrics.json", *sorted((run_dir / "resume").glob("*/manifest.json"))]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        fp = (data.get("mlflow") or {}).get("fingerprint") if path.name == "metrics.json" else data.get("fingerprint")
        if fp:
            found.add(fp)
    return found


def cell_status(cell: Cell) -> str:
    """new | resume | done | changed (see the module docstring)."""
    try:
        record = json.loads((cell.dir / RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    earlier = _recorded_fingerprints(cell.dir)
    if record:
        source = cell.depends.fingerprint if cell.depends else None
        if record.get("recipe_fingerprint") != cell.recipe_fingerprint or record.get("source_fingerprint") != source:
            return "changed"
    if earlier - {cell.recipe_fingerprint}:
        return "changed"
    if record.get("state") == "done" and record.get("fingerprint") == cell.fingerprint \
            and (cell.dir / "eval" / "eval.json").is_file():
        return "done"
    if record or earlier or (cell.dir / "resume").is_dir():
        return "resume"
    return "new"


def _recipe_fingerprint(recipe: Path, overrides: list[str], where: str) -> str:
    from omegaconf import OmegaConf

    from cmrp.training.checkpointing import recipe_fingerprint

    try:
        cfg = load_recipe(recipe, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return recipe_fingerprint(Redactor.from_environ().mapping(OmegaConf.to_container(cfg, resolve=True)))[0]


def make_plan(sweep: Sweep, out: Path, *, seeds: list[int] | None = None, rows: list[str] | None = None,
              overrides: list[str] = ()) -> Plan:
    """Every cell of the sweep (only `rows` and the rows they start from, and only `seeds`, when given),
    each recipe loaded, validated and fingerprinted, each cell's status read from its folder."""
    override_layers(overrides)  # the command line's KEY=VALUE: well-formed before anything else
    for text in overrides:
        check_managed(text.partition("=")[0].strip(), f"command-line override '{text}'")
    out = out.expanduser().resolve()
    uri = sweep.tracking.get("tracking_uri") or default_tracking_uri(out)
    experiment = str(sweep.tracking.get("experiment") or sweep.name)
    chosen = {}
    for choice in _rows(sweep):
        chosen[_row_name(choice, sweep)] = choice
    labels = {row: " · ".join(v.label or v.name for v in choice) or row for row, choice in chosen.items()}
    wanted = list(chosen) if rows is None else list(rows)
    for row in wanted:
        if row not in chosen:
            import difflib

            close = difflib.get_close_matches(row, list(chosen), n=1)
            raise ConfigError(f"--rows: no row '{row}' in {sweep.path.name}"
                              + (f"; did you mean '{close[0]}'?" if close else f"; rows: {', '.join(chosen)}"))
    keep, todo = set(), list(wanted)
    while todo:  # the rows asked for and every row they start from
        row = todo.pop()
        if row not in keep:
            keep.add(row)
            source = _source_row(chosen[row], sweep)
            if source is not None:
                todo.append(source)
    for name in (sweep.baseline, *(c.row for c in sweep.claims), *(c.against for c in sweep.claims if c.against)):
        if name is not None and name not in chosen:
            import difflib

            close = difflib.get_close_matches(name, list(chosen), n=1)
            raise ConfigError(f"{sweep.where()}: '{name}' (baseline or claim) is not a row"
                              + (f"; did you mean '{close[0]}'?" if close else f"; rows: {', '.join(chosen)}"))
    seeds = list(seeds) if seeds else list(sweep.seeds)
    base_eval = eval_arguments(sweep.evaluate, lambda *key: sweep.where("evaluate", *key))
    cells: dict[tuple[str, int], Cell] = {}

    def make(row: str, seed: int, stack: tuple[str, ...] = ()) -> Cell:
        if (row, seed) in cells:
            return cells[(row, seed)]
        if row in stack:
            raise ConfigError(f"{sweep.where('axes')}: init_from_cell goes round in a circle: {' -> '.join((*stack, row))}")
        choice = chosen[row]
        recipe = next((v.recipe for v in choice if v.recipe is not None), sweep.recipe)
        conflicting = [v.name for v in choice if v.recipe is not None]
        if len(conflicting) > 1:
            raise ConfigError(f"{sweep.where('axes')}: row {row} gets a recipe from two variants ({', '.join(conflicting)})")
        source = _source_row(choice, sweep)
        depends = make(source, seed, (*stack, row)) if source is not None else None
        eval_args = list(base_eval)
        for axis, v in zip(sweep.axes, choice, strict=True):
            if v.evaluate:
                eval_args += eval_arguments(v.evaluate, lambda *key, a=axis, n=v.name: sweep.where("axes", a, n,
                                                                                                   "evaluate", *key))
        cell = Cell(row, labels[row], seed, recipe,
                    (*sweep.overrides, *(o for v in choice for o in v.overrides), *overrides),
                    source, out / row / f"seed{seed}", (str(out / row / f"seed{seed}"), *eval_args), depends)
        cell.recipe_fingerprint = _recipe_fingerprint(recipe, cell.fit_args(uri, experiment)[1:],
                                                      f"{sweep.where()}: cell {cell.name}")
        cell.fingerprint = _fingerprint(cell)
        cell.status = cell_status(cell)
        cells[(row, seed)] = cell
        return cell

    ordered = [make(row, seed) for row in chosen if row in keep for seed in seeds]
    return Plan(sweep, out, uri, experiment, ordered, {row: labels[row] for row in chosen if row in keep})
