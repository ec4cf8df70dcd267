"""Check raw YAML layers against the schema dataclasses, then build the typed config.

The key check walks each layer on its own (not the merged result) so an unknown key is reported
in the file that wrote it, with the closest valid name. Shapes (section vs list vs scalar) are
checked here too, because omegaconf reports some of those mismatches without a key. Scalar type
errors and interpolation errors come from omegaconf and are re-worded with file and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, OmegaConfBaseException

from cmrp.config.layers import Layer, Provenance, dotted
from cmrp.config.schema import BackboneCard, Recipe, RewardPreset
from cmrp.config.yamlio import KeyPath
from cmrp.errors import ConfigError

__all__ = ["check_layer", "describe", "structure"]

# `Any` fields that hold a whole nested config when given as a mapping.
_INLINE: dict[tuple[type, str], type] = {
    (Recipe, "backbone"): BackboneCard,
    (Recipe, "rewards"): RewardPreset,
}

_SCALAR_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean (true/false)"}


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Any), optional
    return tp, False


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def describe(tp: Any) -> str:
    """A type as a recipe author reads it: `an integer`, `a list of strings`, `a string or null`."""
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if inner is Any:
        text = "any value"
    elif dataclasses.is_dataclass(inner):
        text = "a mapping (a section of keys)"
    elif origin is dict:
        text = f"a mapping of names to {describe(typing.get_args(inner)[1])}"
    elif origin is list:
        item = typing.get_args(inner)[0]
        text = f"a list of {_SCALAR_NAMES[item]}s" if item in _SCALAR_NAMES else "a list"
    else:
        text = _article(_SCALAR_NAMES.get(inner, getattr(inner, "__name__", str(inner))))
    return f"{text} or null" if optional else text


def type_at(cls: type, path: KeyPath) -> Any | None:
    """The declared type at `path` inside `cls`, or None when the path is free-form or unknown."""
    tp: Any = cls
    for part in path:
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(part, str):
            tp = _fields(inner).get(part)  # type: ignore[arg-type]
        elif typing.get_origin(inner) is dict:
            tp = typing.get_args(inner)[1]
        elif typing.get_origin(inner) is list:
            tp = typing.get_args(inner)[0]
        else:
            return None
        if tp is None:
            return None
    return tp


def _schema_paths(cls: type, prefix: KeyPath = ()) -> list[KeyPath]:
    paths = []
    for name, tp in _fields(cls).items():
        paths.append((*prefix, name))
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            paths += _schema_paths(inner, (*prefix, name))  # type: ignore[arg-type]
    return paths


def _suggest(key: str, cls: type, at: KeyPath, root: type, root_prefix: KeyPath) -> str | None:
    """Closest valid key: a sibling first, then the same name elsewhere, then anything close."""
    close = difflib.get_close_matches(key, list(_fields(cls)), n=1)
    if close:
        return dotted((*at, close[0]))
    paths = _schema_paths(root)
    homes = [dotted((*root_prefix, *path)) for path in paths if path[-1] == key]
    if homes:  # the same name in several sections (max_steps: trainer and grpo): name them all
        return "' or '".join(sorted(homes, key=lambda h: (h.count("."), h), reverse=False))
    if "." in key:  # a dotted key written as one YAML key, e.g. `trainer.max_steps: 5`
        written = dotted((*at[len(root_prefix) :], key))
        close = difflib.get_close_matches(written, [dotted(p) for p in paths], n=1)
        if close:
            return dotted((*root_prefix, close[0]))
    leaves = {path[-1]: path for path in reversed(paths)}
    close = difflib.get_close_matches(key, list(leaves), n=1)
    return dotted((*root_prefix, *leaves[close[0]])) if close else None


class _Walker:
    """Walks one layer's raw data along the schema types."""

    def __init__(self, layer: Layer, root: type, prefix: KeyPath):
        self.origin = layer.origin
        self.roots: list[tuple[type, KeyPath]] = [(root, prefix)]

    def fail(self, path: KeyPath, problem: str) -> ConfigError:
        return ConfigError(f"{self.origin.at(path)}: {problem}")

    def walk(self, value: Any, tp: Any, path: KeyPath) -> None:
        inner, _ = _unwrap_optional(tp)
        if value is None or inner is Any or (isinstance(value, str) and "${" in value):
            return  # null-ness and interpolations are judged by omegaconf
        origin = typing.get_origin(inner)
        if dataclasses.is_dataclass(inner):
            self._section(value, inner, path)  # type: ignore[arg-type]
        elif origin is dict:
            if not isinstance(value, dict):
                raise self._shape(path, inner, value)
            for key, item in value.items():
                self.walk(item, typing.get_args(inner)[1], (*path, key))
        elif origin is list:
            if not isinstance(value, list):
                raise self._shape(path, inner, value)
            for index, item in enumerate(value):
                self.walk(item, typing.get_args(inner)[0], (*path, index))
        elif isinstance(value, dict | list):
            raise self._shape(path, tp, value)

    def _section(self, value: Any, cls: type, path: KeyPath, inline: bool = False) -> None:
        if not isinstance(value, dict):
            raise self._shape(path, cls, value)
        fields = _fields(cls)
        for key, item in value.items():
            if inline and key == "base":
                continue  # an inline card/preset that changes a named one (the loader resolves it)
            if key not in fields:
                root, prefix = self.roots[-1]
                hint = _suggest(key, cls, path, root, prefix)
                where = dotted((*path, key))
                if hint:
                    raise self.fail((*path, key), f"unknown key '{where}' — did you mean '{hint}'?")
                valid = ", ".join(fields)
                raise self.fail((*path, key), f"unknown key '{where}'. Valid keys here: {valid}.")
            inline = _INLINE.get((cls, key))
            if inline is not None and isinstance(item, dict):
                self.roots.append((inline, (*path, key)))
                self._section(item, inline, (*path, key), inline=True)
                self.roots.pop()
            else:
                self.walk(item, fields[key], (*path, key))

    def _shape(self, path: KeyPath, tp: Any, value: Any) -> ConfigError:
        got = "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else repr(value)
        return self.fail(path, f"key '{dotted(path)}' must be {describe(tp)}, got {got}")


def check_layer(layer: Layer, cls: type, prefix: KeyPath = ()) -> None:
    """Raise ConfigError for the first unknown key or misplaced section in one layer."""
    _Walker(layer, cls, prefix)._section(layer.data, cls, prefix)


def _clear_typed_dicts(node: DictConfig, cls: type, raw: dict[str, Any]) -> None:
    """A mapping given for a typed dict field (e.g. `data.tasks`) replaces the schema default
    instead of merging into it; between files it still deep-merges."""
    for key, tp in _fields(cls).items():
        value = raw.get(key)
        if not isinstance(value, dict):
            continue
        inner, _ = _unwrap_optional(tp)
        if typing.get_origin(inner) is dict:
            node[key] = {}
        elif dataclasses.is_dataclass(inner) and isinstance(node[key], DictConfig):
            _clear_typed_dicts(node[key], inner, value)  # type: ignore[arg-type]


def _parse_key(key: str) -> KeyPath:
    path: list[Any] = []
    for part in key.replace("[", ".[").split("."):
        if part.startswith("[") and part.endswith("]") and part[1:-1].isdigit():
            path.append(int(part[1:-1]))
        elif part:
            path.append(part)
    return tuple(path)


def _value_at(raw: Any, path: KeyPath) -> tuple[bool, Any]:
    for part in path:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return False, None
    return True, raw


def _converted(err: OmegaConfBaseException, cls: type, raw: dict[str, Any], prov: Provenance) -> ConfigError:
    path = _parse_key(str(getattr(err, "full_key", None) or ""))
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    found, value = _value_at(raw, path)
    if not path:
        return ConfigError(f"{prov.fallback.label}: {detail}")
    if isinstance(err, InterpolationResolutionError | GrammarParseError):
        shown = f" {value!r}" if found else ""
        return prov.error(path, f"has a bad interpolation{shown}: {detail}")
    tp = type_at(cls, path)
    if found and tp is not None:
        return prov.error(path, f"must be {describe(tp)}, got {value!r}")
    return prov.error(path, f"is invalid: {detail}")


def structure(
    cls: type, raw: dict[str, Any], prov: Provenance, files_raw: dict[str, Any] | None = None
) -> DictConfig:
    """Merge `raw` onto the schema `cls`, resolve interpolations, and require `???` keys.

    `files_raw` (default `raw`) is what the files alone set: a typed dict they give replaces the
    schema default, while a dotted override such as `data.tasks.chat=2` only changes one entry.
    """
    try:
        schema = OmegaConf.structured(cls)
        _clear_typed_dicts(schema, cls, raw if files_raw is None else files_raw)
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _converted(err, cls, raw, prov) from None
    assert isinstance(cfg, DictConfig)
    for key in sorted(OmegaConf.missing_keys(cfg)):
        path = _parse_key(key)
        raise prov.error(path, f"is required ({describe(type_at(cls, path))})")
    return cfg
