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
from cmrp.registry import REWARDS

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
        layer = _inline_layer(kind, ref, label)
        if "base" in layer.data:
            return _refined(kind, cls, layer, inline_prov)
        return _typed(cls, [layer], inline_prov)
    if isinstance(ref, Path) and ref.is_file():
        path = ref.resolve()
    elif isinstance(ref, str | Path):
        path = find_asset(kind, str(ref))
    else:
        raise ConfigError(f"a {KIND_LABELS[kind]} reference must be a name, a path or a mapping, got {ref!r}")
    return _typed(cls, _file_layers(kind, path))


def _refined(kind: str, cls: type, layer: Layer, inline_prov: Provenance | None) -> tuple[DictConfig, Provenance]:
    """An inline mapping with `base: NAME_OR_PATH`: the named card/preset with the mapping's keys on top
    (`rewards: {base: sandbox, terms: {clip_similarity: {weight: 0.9}}}`). Errors name the recipe line or
    override for the keys it set, the preset file for the others."""
    data = dict(layer.data)
    base = data.pop("base")
    at = inline_prov or Provenance({}, layer.origin)
    origin = at.origin(("base",))
    where = f"{origin.at((*at.prefix, 'base'))}: key '{at.key(('base',))}'"
    if not isinstance(base, str):
        raise ConfigError(f"{where} must be a {KIND_LABELS[kind]} name or path, got {base!r}")
    path = find_asset(kind, base, relative_to=origin.directory, where=where)
    layers = [*_file_layers(kind, path), Layer(data, layer.origin)]
    for part in layers:
        check_layer(part, cls, inline_prov.prefix if inline_prov else ())
    raw, merged = merge_layers(layers, layers[-1].origin)
    if inline_prov is None:
        return structure(cls, raw, merged), merged
    prefix = inline_prov.prefix
    origins = {(*prefix, *key): found for key, found in merged.origins.items() if found is not layer.origin}
    origins.update({key: found for key, found in inline_prov.origins.items() if key[:len(prefix)] == prefix})
    prov = Provenance(origins, inline_prov.fallback, prefix)
    return structure(cls, raw, prov), prov


def _card(ref: Ref, inline_prov: Provenance | None = None) -> DictConfig:
    card, prov = _load("backbones", BackboneCard, ref, inline_prov)
    check_card(card, prov)
    return card


def _preset(ref: Ref, inline_prov: Provenance | None = None) -> dict[str, Any]:
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
    """Load the card/preset `cfg[key]` refers to. A reward preset is then written into the recipe in full
    (every term, weight and kwargs: what MLflow params and recipe.yaml show), and so is an inline card; a
    card named by name stays a name, a relative path becomes absolute so the config can be resolved later
    from anywhere."""
    ref = cfg[key]
    if isinstance(ref, DictConfig):
        if kind == "backbones":
            cfg[key] = OmegaConf.to_container(_card(ref, prov.nested(key)), resolve=True)
        else:
            cfg[key] = _preset(ref, prov.nested(key))
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
        cfg[key] = _preset(path)


_NAMED_PARTS = {"backbone": "backbones", "rewards": "rewards"}


def _refine_named_parts(layers: list[Layer]) -> list[Layer]:
    """A layer giving a mapping for `rewards` (or `backbone`) where an earlier layer named a preset (card)
    changes that one: `rewards=sandbox` then `rewards.terms.clip_similarity.weight=0.9` is
    `rewards: {base: sandbox, terms: {clip_similarity: {weight: 0.9}}}`. A path is made absolute, relative
    to the file that wrote it."""
    named: dict[str, tuple[Any, Origin]] = {}
    out = []
    for layer in layers:
        data = layer.data
        for key, kind in _NAMED_PARTS.items():
            if key not in data:
                continue
            value = data[key]
            earlier, origin = named.get(key, (None, layer.origin))
            if isinstance(value, dict) and "base" not in value and isinstance(earlier, str):
                ref = earlier
                if is_path_ref(ref):
                    ref = str(find_asset(kind, ref, relative_to=origin.directory,
                                         where=f"{origin.at((key,))}: key '{key}'"))
                data = {**data, key: {"base": ref, **value}}
            elif isinstance(value, dict) and isinstance(earlier, dict):
                continue  # merged into the earlier mapping: still a mapping
            named[key] = (data[key], layer.origin)
        out.append(layer if data is layer.data else Layer(data, layer.origin))
    return out


def load_recipe(source: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load, merge, type-check and validate a recipe; interpolations are resolved in the result.

    `source` is a YAML path or a shipped recipe name; `overrides` are dotted `key=value` strings
    with YAML values. Raises ConfigError naming the file (and line), key and fix.
    """
    path = find_recipe(source)
    files = file_layers("recipes", path)
    layers = _refine_named_parts(files + override_layers(overrides))
    files = layers[:len(files)]
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
