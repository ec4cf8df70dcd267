"""Shared by the readers' fuzz tests: mutate one JSON file of a copied data set the way hypothesis says."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

__all__ = ["json_paths", "mutate_json_file"]


def json_paths(value, prefix=()):
    """Every key path in a JSON document, the root (()) first."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*prefix, i))


def mutate_json_file(data, path: Path, values) -> None:
    """Replace or delete one value, replace the whole document, or write random bytes."""
    doc = json.loads(path.read_text())
    mode = data.draw(st.sampled_from(["replace", "delete", "whole", "bytes"]))
    if mode == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=40)))
        return
    if mode == "whole":
        path.write_text(json.dumps(data.draw(values)))
        return
    target = data.draw(st.sampled_from(list(json_paths(doc))[1:] or [()]))
    if target:
        parent = doc
        for key in target[:-1]:
            parent = parent[key]
        if mode == "delete":
            del parent[target[-1]]
        else:
            parent[target[-1]] = data.draw(values)
    path.write_text(json.dumps(doc))
