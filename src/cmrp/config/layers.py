"""Layers of configuration and where each key came from.

A loaded config is a stack of layers — the `base:` files (deepest first), the file itself, then
command-line overrides — deep-merged in that order. Each layer remembers its origin (file and
key lines, or the override text), so any later error can name the file and line that set the key.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrp.config.assets import find_asset
from cmrp.config.params import REDACTED, is_secret_key, remember_secrets
from cmrp.config.yamlio import KeyPath, display_path, parse_value, read_yaml
from cmrp.errors import ConfigError

__all__ = ["Layer", "Origin", "Provenance", "dotted", "file_layers", "merge_layers", "override_layers"]


def dotted(path: Iterable[Any]) -> str:
    """`('data', 'tasks', 'chat')` -> `data.tasks.chat`; list indices as `[i]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True)
class Origin:
    """Where a layer came from. `directory` anchors relative references made inside it."""

    label: str
    directory: Path | None = None
    lines: Mapping[KeyPath, int] = field(default_factory=dict)

    def at(self, path: KeyPath) -> str:
        """`file:line` of the nearest key on `path` whose line is known, else just `file`."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return f"{self.label}:{line}"
        return self.label


@dataclass(frozen=True)
class Layer:
    data: dict[str, Any]
    origin: Origin


@dataclass
class Provenance:
    """The origin of every key of a merged config; `prefix` places a nested config (an inline
    backbone card inside a recipe) at its key in the file that holds it."""

    origins: dict[KeyPath, Origin]
    fallback: Origin
    prefix: KeyPath = ()

    def origin(self, path: KeyPath) -> Origin:
        full = (*self.prefix, *path)
        for end in range(len(full), 0, -1):
            found = self.origins.get(full[:end])
            if found is not None:
                return found
        return self.fallback

    def key(self, path: KeyPath) -> str:
        return dotted((*self.prefix, *path))

    def error(self, path: KeyPath, problem: str) -> ConfigError:
        """`file:line: key 'a.b': problem`."""
        where = self.origin(path).at((*self.prefix, *path))
        return ConfigError(f"{where}: key '{self.key(path)}' {problem}")

    def nested(self, key: str) -> Provenance:
        return Provenance(self.origins, self.fallback, (*self.prefix, key))


def _base_refs(data: dict[str, Any], origin: Origin) -> list[str]:
    refs = data.pop("base", None)
    if refs is None:
        return []
    if isinstance(refs, str):
        return [refs]
    if isinstance(refs, list) and all(isinstance(ref, str) for ref in refs):
        return refs
    raise ConfigError(f"{origin.at(('base',))}: key 'base' must be a file or name, or a list of them")


def file_layers(kind: str, path: Path, _chain: tuple[Path, ...] = ()) -> list[Layer]:
    """The layers of one file: its `base:` files' layers (in the order listed), then its own."""
    path = path.resolve()
    if path in _chain:
        start = _chain[0].parent  # shown relative to the first file, which the user named
        cycle = " -> ".join(os.path.relpath(p, start) for p in (*_chain, path))
        raise ConfigError(f"{display_path(_chain[0])}: `base:` inheritance cycle: {cycle}")
    data, lines = read_yaml(path)
    origin = Origin(display_path(path), path.parent, lines)
    layers: list[Layer] = []
    for ref in _base_refs(data, origin):
        where = f"{origin.at(('base',))}: key 'base'"
        base = find_asset(kind, ref, relative_to=path.parent, where=where)
        layers += file_layers(kind, base, (*_chain, path))
    layers.append(Layer(data, origin))
    return layers


def override_layers(overrides: Iterable[str]) -> list[Layer]:
    """`trainer.max_steps=50` -> a layer `{trainer: {max_steps: 50}}`; values read as YAML."""
    layers = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        label = f"command-line override '{_shown_override(text, key, raw)}'"
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{label}: expected KEY=VALUE with a dotted key, e.g. trainer.max_steps=50")
        value: Any = parse_value(raw, label)
        for part in reversed(parts):
            value = {part: value}
        layers.append(Layer(value, Origin(label, Path.cwd())))
    return layers


def _shown_override(text: str, key: str, raw: str) -> str:
    """The override as error messages show it: the value hidden when the key, or a key inside the value
    (`kwargs={api_key: ...}`), is secret-named (the value is also remembered, for any other message)."""
    if any(is_secret_key(part) for part in key.split(".")):
        remember_secrets({"secret": raw.strip()})
        return f"{key}={REDACTED}"
    if any(is_secret_key(word) for word in re.findall(r"[A-Za-z_][A-Za-z0-9_-]*", raw)):
        return f"{key}=<value hidden: it names a secret key>"
    return text


def _merge_into(
    dst: dict[str, Any], src: dict[str, Any], prefix: KeyPath, origin: Origin, origins: dict[KeyPath, Origin]
) -> None:
    for key, value in src.items():
        path = (*prefix, key)
        origins[path] = origin
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value, path, origin, origins)
        else:
            dst[key] = copy.deepcopy(value)
            _record(value, path, origin, origins)


def _record(value: Any, path: KeyPath, origin: Origin, origins: dict[KeyPath, Origin]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            origins[(*path, key)] = origin
            _record(item, (*path, key), origin, origins)


def merge_layers(layers: list[Layer], fallback: Origin) -> tuple[dict[str, Any], Provenance]:
    """Deep-merge in order: mappings merge key by key, anything else (lists too) is replaced.
    `fallback` is named for keys no layer set (schema defaults)."""
    merged: dict[str, Any] = {}
    origins: dict[KeyPath, Origin] = {}
    for layer in layers:
        _merge_into(merged, layer.data, (), layer.origin, origins)
    return merged, Provenance(origins, fallback)
