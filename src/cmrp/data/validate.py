"""Finds a character directory's format, checks it, and loads it.

Every reader reports `Problem`s instead of stopping at the first one, so a user fixes a dataset in
one pass. A format is a `DataFormat` (a detector: does this directory look like mine? and an inspector:
parse it, return the character and every problem found) registered in `cmrp.registry.FORMATS` by the
module that reads it (`data/native.py`, `data/rolescape.py`, `data/mmrole.py`) or by a plugin.
"""

from __future__ import annotations

from pathlib import Path

from cmrp.data.character import Character
from cmrp.data.problems import DataFormat, Problem, errors_of, problems_error
from cmrp.errors import DataError
from cmrp.registry import FORMATS

__all__ = [
    "Problem",
    "detect_format",
    "errors_of",
    "formats",
    "inspect_character_dir",
    "load_character",
    "problems_error",
    "validate_character_dir",
]


def formats() -> list[DataFormat]:
    """Every registered format (built-ins and plugins), in the order `format: auto` tries them."""
    return sorted((FORMATS.get(name) for name in FORMATS.names()), key=lambda f: (f.order, f.name))


def _supported() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in formats())


def detect_format(path: Path | str, format: str = "auto") -> str:
    """The format to read `path` with: `format` itself when given, otherwise the first detector that matches."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such directory (give the path of a character directory)")
    if not path.is_dir():
        raise DataError(f"{path}: is a file, not a character directory")
    if format != "auto":
        if format not in FORMATS.names():
            raise DataError(f"format {format!r} is not supported by this version of cmrp. Supported: {_supported()}")
        return format
    for candidate in formats():
        if candidate.detect(path):
            return candidate.name
    raise DataError(f"{path}: not a character directory in any supported format. Supported: {_supported()}")


def inspect_character_dir(
    path: Path | str, format: str = "auto", character: str | None = None
) -> tuple[Character | None, list[Problem]]:
    """Parse a character directory: the character (None when there are errors) and every problem found."""
    path = Path(path).expanduser()
    name = detect_format(path, format)
    return FORMATS.get(name).inspect(path, character)


def validate_character_dir(path: Path | str, format: str = "auto", character: str | None = None) -> list[Problem]:
    """Every problem in a character directory (errors and warnings); empty when it is clean."""
    return inspect_character_dir(path, format, character)[1]


def load_character(path: Path | str, format: str = "auto", character: str | None = None) -> Character:
    """Read a character directory; raises DataError listing every error when it is not valid."""
    loaded, problems = inspect_character_dir(path, format, character)
    if loaded is None or errors_of(problems):
        raise problems_error(Path(path), problems)
    return loaded
