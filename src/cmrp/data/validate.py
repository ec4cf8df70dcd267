"""Finds a character directory's format, checks it, and loads it.

Every reader reports `Problem`s instead of stopping at the first one, so a user fixes a dataset in
one pass. A new format plugs in with one detector (does this directory look like mine?) and one
inspector (parse it, return the character and every problem found); both registries are below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmrp.data.character import Character
from cmrp.errors import DataError

__all__ = [
    "FORMAT_DESCRIPTIONS",
    "FORMAT_DETECTORS",
    "FORMAT_INSPECTORS",
    "Problem",
    "detect_format",
    "errors_of",
    "inspect_character_dir",
    "load_character",
    "problems_error",
    "validate_character_dir",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with character data: which file, which field (a JSON path), what and how to fix."""

    file: str
    field: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


Inspector = Callable[[Path, str | None], tuple[Character | None, list[Problem]]]


def errors_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def problems_error(root: Path, problems: list[Problem]) -> DataError:
    """A DataError listing every problem, errors first; one line when there is one error (the warnings are
    then counted, and `cmrp data validate` lists them)."""
    errors = errors_of(problems)
    warnings = [p for p in problems if p.severity == "warning"]
    if len(errors) == 1:
        more = f" ({len(warnings)} warning(s) too: `cmrp data validate {root}` lists them)" if warnings else ""
        return DataError(f"{root}/{errors[0]}{more}")
    lines = [f"{root}: {len(errors)} error(s) in the character data "
             f"(fix them; `cmrp data validate {root}` re-checks):"]
    lines += [f"  {p}" for p in errors]
    lines += [f"  warning: {p}" for p in warnings]
    return DataError("\n".join(lines))


def _native_dir(path: Path, character: str | None) -> Path:
    """A native directory holds one character; `character` may name a sub-directory holding it."""
    if character and (path / character / "character.json").is_file():
        return path / character
    return path


def _is_native(path: Path) -> bool:
    return (path / "character.json").is_file()


def _inspect_native(path: Path, character: str | None) -> tuple[Character | None, list[Problem]]:
    from cmrp.data.native import inspect_native

    return inspect_native(_native_dir(path, character))


def _is_rolescape(path: Path) -> bool:
    from cmrp.data.rolescape import is_rolescape

    return is_rolescape(path)


def _inspect_rolescape(path: Path, character: str | None) -> tuple[Character | None, list[Problem]]:
    from cmrp.data.rolescape import inspect_rolescape

    return inspect_rolescape(path, character)


def _is_mmrole(path: Path) -> bool:
    from cmrp.data.mmrole import is_mmrole

    return is_mmrole(path)


def _inspect_mmrole(path: Path, character: str | None) -> tuple[Character | None, list[Problem]]:
    from cmrp.data.mmrole import inspect_mmrole

    return inspect_mmrole(path, character)


# format name -> does this directory look like that format? (tried in order for format="auto")
FORMAT_DETECTORS: dict[str, Callable[[Path], bool]] = {
    "native": _is_native,
    "rolescape20": _is_rolescape,
    "mmrole": _is_mmrole,
}
# format name -> parse a directory into (character or None when there are errors, problems)
FORMAT_INSPECTORS: dict[str, Inspector] = {
    "native": _inspect_native,
    "rolescape20": _inspect_rolescape,
    "mmrole": _inspect_mmrole,
}
FORMAT_DESCRIPTIONS: dict[str, str] = {
    "native": "character.json with train/data.json and test/data.json (written by `cmrp sandbox make`)",
    "rolescape20": "the RoleScape-20 release: <root>/train/<Name>/ and <root>/test/<Name>/ (pick one with --character)",
    "mmrole": "MMRole-Data: profiles/, data/train|test/*.json and/or dialogues/, images/ (pick one with --character)",
}


def _supported() -> str:
    return "; ".join(f"{name}: {FORMAT_DESCRIPTIONS.get(name, '')}" for name in FORMAT_INSPECTORS)


def detect_format(path: Path | str, format: str = "auto") -> str:
    """The format to read `path` with: `format` itself when given, otherwise the first detector that matches."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such directory (give the path of a character directory)")
    if not path.is_dir():
        raise DataError(f"{path}: is a file, not a character directory")
    if format != "auto":
        if format not in FORMAT_INSPECTORS:
            raise DataError(f"format {format!r} is not supported by this version of cmrp. Supported: {_supported()}")
        return format
    for name, detect in FORMAT_DETECTORS.items():
        if detect(path):
            return name
    raise DataError(f"{path}: not a character directory in any supported format. Supported: {_supported()}")


def inspect_character_dir(
    path: Path | str, format: str = "auto", character: str | None = None
) -> tuple[Character | None, list[Problem]]:
    """Parse a character directory: the character (None when there are errors) and every problem found."""
    path = Path(path).expanduser()
    name = detect_format(path, format)
    return FORMAT_INSPECTORS[name](path, character)


def validate_character_dir(path: Path | str, format: str = "auto", character: str | None = None) -> list[Problem]:
    """Every problem in a character directory (errors and warnings); empty when it is clean."""
    return inspect_character_dir(path, format, character)[1]


def load_character(path: Path | str, format: str = "auto", character: str | None = None) -> Character:
    """Read a character directory; raises DataError listing every error when it is not valid."""
    loaded, problems = inspect_character_dir(path, format, character)
    if loaded is None or errors_of(problems):
        raise problems_error(Path(path), problems)
    return loaded
