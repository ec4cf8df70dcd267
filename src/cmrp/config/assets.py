"""Turn a reference to a recipe, backbone card or reward preset into a file.

A reference ending in `.yaml`/`.yml` (or an absolute path) is a path, relative to the file that
mentions it and then to the working directory; anything else is a shipped name, e.g. `quickstart`
or `bagel/sft` -> `recipes/bagel/sft.yaml`. A miss lists what exists, so a typo is one glance away.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from cmrp import resources
from cmrp.errors import ConfigError

__all__ = ["KIND_LABELS", "SWEEPS", "asset_names", "find_asset", "is_path_ref", "is_shipped"]

_SUFFIXES = (".yaml", ".yml")
KIND_LABELS = {"recipes": "recipe", "backbones": "backbone card", "rewards": "reward preset"}
SWEEPS = "sweeps"  # recipes/sweeps/: sweep files (`cmrp sweep`), shipped beside the recipes but not recipes


def is_path_ref(ref: str) -> bool:
    """True when `ref` names a file rather than a shipped asset."""
    return ref.endswith(_SUFFIXES) or Path(ref).is_absolute()


def asset_names(kind: str) -> list[str]:
    """Shipped names of one kind: paths under its folder, `/`-separated, without the suffix."""
    root = resources.asset_dir(kind)
    if not root.is_dir():
        return []
    names = {
        path.relative_to(root).with_suffix("").as_posix()
        for path in root.rglob("*")
        if path.suffix in _SUFFIXES and path.is_file()
    }
    if kind == "recipes":
        names = {name for name in names if not name.startswith(f"{SWEEPS}/")}
    return sorted(names)


def _not_found(kind: str, ref: str, where: str) -> ConfigError:
    label = KIND_LABELS[kind]
    names = asset_names(kind)
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    available = ", ".join(names) or "none"
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}{label} '{ref}' not found{hint} Available {label}s: {available}.")


def find_asset(kind: str, ref: str, *, relative_to: Path | None = None, where: str = "") -> Path:
    """The file `ref` points to; `where` prefixes the error (file and key that held the reference)."""
    if not ref.strip():
        raise ConfigError(f"{where + ': ' if where else ''}empty {KIND_LABELS[kind]} reference")
    candidates: list[Path] = []
    if is_path_ref(ref):
        given = Path(ref).expanduser()
        if given.is_absolute():
            candidates.append(given)
        else:
            if relative_to is not None:
                candidates.append(relative_to / given)
            candidates.append(Path.cwd() / given)
    else:
        candidates += [resources.asset_dir(kind) / f"{ref}{suffix}" for suffix in _SUFFIXES]
        if relative_to is not None:
            candidates.append(relative_to / ref)
        candidates.append(Path.cwd() / ref)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise _not_found(kind, ref, where)


def is_shipped(kind: str, path: Path) -> bool:
    """Whether `path` is one of the shipped files of `kind` (so its name can stand for it)."""
    return path.resolve().is_relative_to(resources.asset_dir(kind).resolve())
