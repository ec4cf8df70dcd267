"""Strict JSON for every file cmrp writes: NaN and ±inf become null.

Python's `json` writes a bare `NaN` / `Infinity` by default, which strict parsers (JavaScript's
`JSON.parse`, `jq`, Go, Rust's serde) reject. A measure that is undefined (no VQA items in a test split,
no scored item) is written as `null` instead. Array-likes (NumPy values, torch tensors) become plain
numbers or lists through their `tolist()`, so callers need not convert them first. Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["dumps", "to_strict", "write_json"]


def to_strict(value: Any) -> Any:
    """A copy of `value` that strict JSON can hold: non-finite floats -> None, tuples -> lists, keys -> str,
    array-likes (anything with `tolist()`: NumPy, torch) -> their Python values."""
    if isinstance(value, dict):
        return {str(k): to_strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_strict(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | int | bool) or value is None:
        return value
    if hasattr(value, "tolist"):
        return to_strict(value.tolist())
    return value  # anything else is json's business (it raises TypeError for what it cannot write)


def dumps(value: Any, *, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """`json.dumps` of `to_strict(value)`; never writes NaN or Infinity."""
    return json.dumps(to_strict(value), indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      allow_nan=False)


def write_json(path: str | Path, value: Any, *, indent: int | None = 2, ensure_ascii: bool = False) -> Path:
    """Write `value` as strict JSON (UTF-8, trailing newline), atomically: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(value, indent=indent, ensure_ascii=ensure_ascii) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
