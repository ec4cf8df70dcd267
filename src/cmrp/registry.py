"""One generic name -> object registry for every ablation axis.

In-tree objects register with a decorator (`@BACKBONES.register("bagel")`). Plugins from other
distributions register through entry points (groups `cmrp.backbones`, `cmrp.rewards`, ...), loaded
lazily the first time a name is looked up or listed. Registry names, not class paths, appear in
recipes so they read well as MLflow params.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cmrp.errors import ConfigError

__all__ = ["BACKBONES", "DECODING", "FEATURE_MODELS", "REWARDS", "Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. `builtin_modules` are imported on first use so registration by
    decorator happens without importing heavy modules at `import cmrp` time."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtin_modules = builtin_modules
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {existing!r}")
            self._items[name] = obj
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        if self.entry_point_group:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self.entry_point_group):
                if ep.name not in self._items:
                    self._items[ep.name] = ep.load()

    def get(self, name: str, *, where: str = "") -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            place = f" ({where})" if where else ""
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}{place}.{hint} Known: {known}.") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


BACKBONES: Registry = Registry("backbone adapter", "cmrp.backbones",
                               ("cmrp.backbones.bagel", "cmrp.backbones.janus", "cmrp.backbones.showo"))
REWARDS: Registry = Registry("reward", "cmrp.rewards", ("cmrp.rewards.terms",))
DECODING: Registry = Registry("decoding strategy", "cmrp.decoding", ("cmrp.sampling.decoding",))
# name -> zero-argument loader of a feature net that reward terms accept by name (`encoder: sandbox-clip`)
FEATURE_MODELS: Registry = Registry("feature model", "cmrp.feature_models", ("cmrp.sandbox.features",))
