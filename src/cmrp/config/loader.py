"""Load a recipe, a backbone card or a reward preset into a validated, typed config.

A recipe is read with its `base:` files and command-line overrides, checked key by key against
`cmrp.config.schema`, merged onto the schema through omegaconf (types, interpolations), checked
for allowed values, and its backbone card and reward preset are loaded once so a bad reference
fails here rather than halfway through a run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmrp.config.assets import KIND_LABELS, find_asset, is_path_ref, is_shipped
from cmrp.config.checks import check_card, check_preset, check_recipe
from cmrp.config.layers import Layer, Origin, Provenance, file_layers, merge_layers, override_layers
from cmrp.config.schema import BackboneCard, Recipe, RewardPreset
from cmrp.config.validate import check_layer, structure
from cmrp.config.yamlio import check_plain, display_path
from cmrp.errors import ConfigError

__all__ = ["find_recipe", "load_backbone_card", "load_recipe", "load_reward_preset", "resolve_recipe_parts"]

Ref = str | Path | Mapping[str, Any] | DictConfig


def find_recipe(source: str | Path) -> Path:
    """The recipe file for a path, or for a shipped name such as `quickstart` or `bagel/sft`."""
    if isinstance(source, Path) and source.is_file():
        return source.resolve()
    return find_asset("recipes", str(source))


def _typed(cls: type, layers: list[Layer], prov: Provenance | None = None) -> tuple[DictConfig, Provenance]:
    for layer in layers:
        check_layer(layer, cls, prov.prefix if prov else ())
    raw, merged_prov = merge_layers(layers, layers[-1].origin)
    prov = prov or merged_prov
    return structure(cls, raw, prov), prov


def _file_layers(kind: str, path: Path) -> list[Layer]:
    """A card or preset file's layers, with its file name as the default `name`."""
    default = Layer({"name": path.stem}, Origin(f"{display_path(path)} (name from the file name)"))
    return [default, *file_layers(kind, path)]


def _inline_layer(kind: str, ref: Mapping[str, Any] | DictConfig, label: str) -> Layer:
    if isinstance(ref, DictConfig):
        data = OmegaConf.to_container(ref, resolve=True)
    else:
        data = copy.deepcopy(dict(ref))
    check_plain(data, label)
    assert isinstance(data, dict)
    return Layer(data, Origin(label))


def _load(
    kind: str, cls: type, ref: Ref, inline_prov: Provenance | None = None
) -> tuple[DictConfig, Provenance]:
    if isinstance(ref, Mapping | DictConfig):
        label = f"inline {KIND_LABELS[kind]}"
        return _typed(cls, [_inline_layer(kind, ref, label)], inline_prov)
    if isinstance(ref, Path) and ref.is_file():
        path = ref.resolve()
    elif isinstance(ref, str | Path):
        path = find_asset(kind, str(ref))
    else:
        raise ConfigError(f"a {KIND_LABELS[kind]} reference must be a name, a path or a mapping, got {ref!r}")
    return _typed(cls, _file_layers(kind, path))


def _card(ref: Ref, inline_prov: Provenance | None = None) -> DictConfig:
    card, prov = _load("backbones", BackboneCard, ref, inline_prov)
    check_card(card, prov)
    return card


def _preset(ref: Ref, inline_prov: Provenance | None = None) -> dict[str, Any]:
    from cmrp.registry import REWARDS

    preset, prov = _load("rewards", RewardPreset, ref, inline_prov)
    check_preset(preset, prov, REWARDS.names())
    container = OmegaConf.to_container(preset, resolve=True)
    assert isinstance(container, dict)
    return container


def load_backbone_card(ref: Ref) -> DictConfig:
    """A backbone card by name (`backbones/<name>.yaml`), path, or inline mapping; typed by BackboneCard."""
    return _card(ref)


def load_reward_preset(ref: Ref) -> dict[str, Any]:
    """A reward preset by name (`rewards/<name>.yaml`), path, or inline mapping, as a plain dict
    `{name, description, terms: {term: {weight, kwargs}}}`. Term names are checked against the
    reward registry once it has entries."""
    return _preset(ref)


def _check_part(cfg: DictConfig, prov: Provenance, key: str, kind: str) -> None:
    """Load the card/preset `cfg[key]` refers to; a relative path becomes absolute so the config
    can be resolved later from anywhere (names stay names)."""
    ref = cfg[key]
    if isinstance(ref, DictConfig):
        if kind == "backbones":
            _card(ref, prov.nested(key))
        else:
            _preset(ref, prov.nested(key))
        return
    if not isinstance(ref, str):
        label = KIND_LABELS[kind]
        raise prov.error((key,), f"must be a {label} name, a path to a YAML file, or a mapping; got {ref!r}")
    origin = prov.origin((key,))
    where = f"{origin.at((key,))}: key '{key}'"
    path = find_asset(kind, ref, relative_to=origin.directory, where=where)
    if is_path_ref(ref) or not is_shipped(kind, path):
        cfg[key] = str(path)
    if kind == "backbones":
        _card(path)
    else:
        _preset(path)


def load_recipe(source: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load, merge, type-check and validate a recipe; interpolations are resolved in the result.

    `source` is a YAML path or a shipped recipe name; `overrides` are dotted `key=value` strings
    with YAML values. Raises ConfigError naming the file (and line), key and fix.
    """
    path = find_recipe(source)
    files = file_layers("recipes", path)
    layers = files + override_layers(overrides)
    for layer in layers:
        check_layer(layer, Recipe)
    top = files[-1].origin
    raw, prov = merge_layers(layers, top)
    files_raw, _ = merge_layers(files, top)
    cfg = structure(Recipe, raw, prov, files_raw)
    check_recipe(cfg, prov)
    _check_part(cfg, prov, "backbone", "backbones")
    if cfg.rewards is not None:
        _check_part(cfg, prov, "rewards", "rewards")
    return cfg


def resolve_recipe_parts(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any] | None]:
    """The backbone card and (when `rewards` is set) the reward preset a loaded recipe names."""
    card = load_backbone_card(cfg.backbone)
    preset = None if cfg.rewards is None else load_reward_preset(cfg.rewards)
    return card, preset
