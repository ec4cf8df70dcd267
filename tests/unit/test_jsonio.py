"""Strict JSON: every file cmrp writes parses with a strict parser (NaN and ±inf become null)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cmrp.jsonio import dumps, to_strict, write_json

SRC = Path(__file__).resolve().parents[2] / "src" / "cmrp"


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_everywhere_in_the_tree(tmp_path):
    value = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (np.float32("nan"), np.int64(3)),
             "d": {"e": torch.tensor(2.0), "f": torch.tensor([1.0, float("nan")])}, 4: "key", "g": True}
    expected = {"a": None, "b": [1.5, None, None], "c": [None, 3], "d": {"e": 2.0, "f": [1.0, None]}, "4": "key",
                "g": True}
    assert to_strict(value) == expected
    assert _strict_loads(dumps(value)) == expected
    path = write_json(tmp_path / "sub" / "x.json", value)
    assert _strict_loads(path.read_text(encoding="utf-8")) == expected
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # the temporary file is gone


def test_unicode_is_kept_unless_ascii_is_asked(tmp_path):
    assert dumps({"name": "孙悟空"}) == '{"name": "孙悟空"}'
    assert dumps({"name": "孙悟空"}, ensure_ascii=True) == '{"name": "\\u5b59\\u609f\\u7a7a"}'
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_no_writer_bypasses_the_strict_helper():
    """Files are written through cmrp.jsonio; json.dumps elsewhere only builds hashes, request bodies or names."""
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        if file.name == "jsonio.py":
            continue
        text = file.read_text(encoding="utf-8")
        for pattern in (r"json\.dump\(", r"write_text\(\s*json\.dumps", r"\.write\(\s*json\.dumps"):
            for match in re.finditer(pattern, text):
                offenders.append(f"{file.relative_to(SRC)}:{text[:match.start()].count(chr(10)) + 1}")
    assert offenders == []
