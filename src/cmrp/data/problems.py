"""What is wrong with character data, as values: every reader collects `Problem`s instead of stopping at
the first, so a user fixes a dataset in one pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmrp.data.character import Character
from cmrp.errors import DataError

__all__ = ["DataFormat", "Inspector", "Problem", "errors_of", "problems_error"]

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


@dataclass(frozen=True)
class DataFormat:
    """A character-data format: registered in `cmrp.registry.FORMATS` (a recipe's `data.format`, `cmrp data
    validate --format`), in-tree by `FORMATS.register(name)(DataFormat(...))`, from another distribution through
    the `cmrp.data_formats` entry point. `format: auto` tries the detectors by ascending `order`."""

    name: str
    detect: Callable[[Path], bool]  # does this directory look like this format?
    inspect: Inspector  # parse it: (the character, or None when there are errors; every problem found)
    description: str  # the layout, in one line: what `cmrp data validate` says is supported
    order: int = 100
