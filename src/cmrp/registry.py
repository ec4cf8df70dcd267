"""One generic name -> object registry for every ablation axis.

In-tree objects register with a decorator (`@BACKBONES.register("bagel")`); a registry finds its built-in
modules by name or, like open_clip, by walking a package (every `cmrp.backbones` subpackage whose source
registers an adapter is a built-in: adding one is adding a folder). Plugins from other
distributions register through entry points (groups `cmrp.backbones`, `cmrp.rewards`, ...), loaded
lazily the first time a name is looked up. Registry names, not class paths, appear in recipes so they
read well as MLflow params.

Listing names and the keyword arguments a registered class accepts does not import anything: the
built-in modules' source is read (the `@REWARDS.register("name")` decorators and the constructor's
parameters), and plugins are known by their entry-point names. So `cmrp validate` and `cmrp ls` check a
recipe without importing torch; `get(name)` imports for real.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from cmrp.errors import ConfigError

__all__ = ["BACKBONES", "DECODING", "FEATURE_MODELS", "FORMATS", "REWARDS", "Registry", "kwarg_hints", "source_names"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. `builtin_modules` are imported on first use so registration by
    decorator happens without importing heavy modules at `import cmrp` time."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtin_modules: tuple[str, ...] = (),
                 symbol: str = "", builtin_packages: tuple[str, ...] = ()):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._listed_modules = builtin_modules
        self._builtin_packages = builtin_packages  # their subpackages that register through `symbol` are built-ins
        self._symbol = symbol  # the name modules register through, e.g. REWARDS (for reading their source)
        self._items: dict[str, T] = {}
        self._loaded = False

    @property
    def _builtin_modules(self) -> tuple[str, ...]:
        found = [sub for package in self._builtin_packages for sub in _subpackages(package)
                 if _source_registrations(sub, self._symbol)]
        return (*self._listed_modules, *found)

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

    def _unknown(self, name: str, where: str) -> ConfigError:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        place = f" ({where})" if where else ""
        return ConfigError(f"unknown {self.kind} {name!r}{place}.{hint} Known: {', '.join(names) or 'none'}.")

    def get(self, name: str, *, where: str = "") -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise self._unknown(name, where) from None

    def require(self, name: str, *, where: str = "") -> None:
        """The error `get` would raise for an unknown name, without importing anything."""
        if name not in self.names():
            raise self._unknown(name, where)

    def _plugin_names(self) -> frozenset[str]:
        return _entry_point_names(self.entry_point_group) if self.entry_point_group else frozenset()

    def _declared(self) -> dict[str, tuple[str, ...] | None]:
        """Built-in name -> constructor parameters, read from the built-in modules' source."""
        found: dict[str, tuple[str, ...] | None] = {}
        for module in self._builtin_modules:
            found.update(_source_registrations(module, self._symbol))
        return found

    def names(self) -> list[str]:
        """Every registered name, without importing the objects."""
        if self._loaded:
            return sorted(self._items)
        return sorted(set(self._items) | set(self._declared()) | self._plugin_names())

    def parameters(self, name: str) -> list[str] | None:
        """The keyword arguments `name`'s constructor accepts, or None when any are (`**kwargs`) or it cannot
        be told. Built-ins are read from their source, plugins are imported."""
        declared = self._declared()
        if name in declared and not self._loaded:
            params = declared[name]
            return list(params) if params is not None else None
        import inspect

        try:
            signature = inspect.signature(self.get(name))
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return None
        return [p for p in signature.parameters if p != "self"]

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@functools.cache
def _entry_point_names(group: str) -> frozenset[str]:
    """Plugin names of one entry-point group (read once per process: scanning the installed
    distributions is slow)."""
    from importlib.metadata import entry_points

    return frozenset(ep.name for ep in entry_points(group=group))


def kwarg_hints(kwargs, accepted: list[str] | None) -> list[str]:
    """The kwargs a constructor accepting `accepted` (None: anything) does not take, each with a close name."""
    if accepted is None:
        return []
    hints = []
    for key in sorted(set(kwargs) - set(accepted)):
        close = difflib.get_close_matches(key, accepted, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return hints


@functools.cache
def source_names(module: str, name: str) -> tuple[str, ...]:
    """The strings of a module-level constant, read from source without importing the module: a tuple or list
    literal (`TASKS = ("chat", ...)`) or a `Literal[...]` alias (`ImageHead = Literal["flow", "tokens"]`). How
    validation reads lists whose home is a higher layer (one source of truth, no torch at `cmrp validate`)."""
    path = _module_file(module)
    if path is None:
        raise ValueError(f"no source for module {module!r}")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Subscript):  # Literal["a", "b"]
                value = value.slice
            found = ast.literal_eval(value)
            return (found,) if isinstance(found, str) else tuple(found)
    raise ValueError(f"{module} defines no constant {name!r}")


def _module_file(module: str) -> Path | None:
    """The source file of a module, found without importing its packages."""
    parts = module.split(".")
    if parts[0] == "cmrp":
        root = Path(__file__).resolve().parent
    else:  # another top-level package (a test's); finding it imports nothing
        spec = importlib.util.find_spec(parts[0])
        if spec is None or not spec.submodule_search_locations or not spec.origin:
            return None
        root = Path(spec.origin).parent
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _subpackages(package: str) -> tuple[str, ...]:
    """The in-tree subpackages (folders with an `__init__.py`) directly under `package`, sorted, found
    without importing anything."""
    init = _module_file(package)
    if init is None or init.name != "__init__.py":
        return ()
    return tuple(f"{package}.{d.name}" for d in sorted(init.parent.iterdir()) if (d / "__init__.py").is_file())


def _registered_name(node: ast.expr, symbol: str) -> str | None:
    """`SYMBOL.register("name")` -> "name"."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == symbol and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def _parameters(node: ast.AST) -> tuple[str, ...] | None:
    """Keyword-usable parameters of a function, or of a class's own `__init__` (None: `**kwargs`, or none
    written in the class itself)."""
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return None
        node = init
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.args.kwarg is not None:
        return None
    args = [a.arg for a in (*node.args.args, *node.args.kwonlyargs)]
    return tuple(a for a in args if a not in ("self", "cls"))


@functools.cache
def _source_registrations(module: str, symbol: str, follow: bool = True) -> dict[str, tuple[str, ...] | None]:
    """`@SYMBOL.register(name)` classes/functions and `SYMBOL.register(name)(obj)` calls in a module's source,
    and in the modules of its own top-level package it imports (a built-in list such as `cmrp.rewards.terms`, a
    package's `__init__` importing its adapter)."""
    path = _module_file(module)
    if path is None or not symbol:
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: dict[str, tuple[str, ...] | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            for decorator in node.decorator_list:
                name = _registered_name(decorator, symbol)
                if name is not None:
                    found[name] = _parameters(node)
        elif isinstance(node, ast.Call):
            name = _registered_name(node.func, symbol)
            if name is not None:
                found[name] = None
        elif (follow and isinstance(node, ast.ImportFrom) and not node.level
              and (node.module or "").split(".")[0] == module.split(".")[0]):  # an import from the same package
            found.update(_source_registrations(node.module, symbol, follow=False))
    return found


BACKBONES: Registry = Registry("backbone adapter", "cmrp.backbones", symbol="BACKBONES",
                               builtin_packages=("cmrp.backbones",))
REWARDS: Registry = Registry("reward", "cmrp.rewards", ("cmrp.rewards.terms",), symbol="REWARDS")
DECODING: Registry = Registry("decoding strategy", "cmrp.decoding", ("cmrp.sampling.decoding",), symbol="DECODING")
# name -> cmrp.data.problems.DataFormat: how a character directory is detected and read (`data.format`)
FORMATS: Registry = Registry("data format", "cmrp.data_formats",
                             ("cmrp.data.native", "cmrp.data.rolescape", "cmrp.data.mmrole"), symbol="FORMATS")
# name -> zero-argument loader of a feature net that reward terms accept by name (`encoder: sandbox-clip`)
FEATURE_MODELS: Registry = Registry("feature model", "cmrp.feature_models", ("cmrp.sandbox.features",),
                                    symbol="FEATURE_MODELS")
