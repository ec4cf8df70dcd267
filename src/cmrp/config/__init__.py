"""Recipe loading: `base:` inheritance, dotted overrides, a structured schema, clear errors.

Names are imported lazily so `import cmrp.config.schema` (and `cmrp --help`) stay cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmrp.config.loader import (
        find_recipe,
        load_backbone_card,
        load_recipe,
        load_reward_preset,
        resolve_recipe_parts,
    )
    from cmrp.config.params import Redactor, flatten, redact_secrets

__all__ = [
    "Redactor",
    "find_recipe",
    "flatten",
    "load_backbone_card",
    "load_recipe",
    "load_reward_preset",
    "redact_secrets",
    "resolve_recipe_parts",
]

_HOMES = {
    "find_recipe": "cmrp.config.loader",
    "load_backbone_card": "cmrp.config.loader",
    "load_recipe": "cmrp.config.loader",
    "load_reward_preset": "cmrp.config.loader",
    "resolve_recipe_parts": "cmrp.config.loader",
    "Redactor": "cmrp.config.params",
    "flatten": "cmrp.config.params",
    "redact_secrets": "cmrp.config.params",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cmrp.config' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
