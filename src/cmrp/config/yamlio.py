"""Read YAML the way a recipe author expects, and say where a problem is.

PyYAML's safe loader follows YAML 1.1: `1e-3` is a string, `2024-01-01` a date, and a repeated
key silently wins. Here `1e-3` is a float, dates stay strings (omegaconf cannot hold them), a
repeated key is an error, and every error names the file and line. The key -> line table lets
later errors (unknown key, wrong type) point at the line too.

Every YAML cmrp reads goes through here, so the size of what a file can make us build is bounded:
nesting deeper than `MAX_DEPTH` (PyYAML's composer and omegaconf recurse per level), an alias that
refers to the node holding it (a cycle), and aliases that expand to more than `MAX_VALUES` values
(a "billion laughs" bomb: a few hundred bytes that unfold into billions of items) are rejected from
the node graph, before anything is constructed or walked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cmrp.config.params import is_secret_key, remember_secrets
from cmrp.errors import ConfigError

__all__ = ["MAX_DEPTH", "MAX_VALUES", "KeyPath", "check_plain", "display_path", "parse_value", "read_yaml"]

KeyPath = tuple[Any, ...]

MAX_DEPTH = 32  # nested lists/mappings; recipes use fewer than 10, omegaconf fails near 100
MAX_VALUES = 100_000  # values after alias expansion; a recipe has a few hundred

_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _TooLarge(yaml.MarkedYAMLError):
    """The document is nested too deeply, is cyclic or expands too far (see the module docstring)."""


class _Loader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 floats, no timestamps, no duplicate keys, and bounded nesting."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # the composer recurses once per level: stop before Python's recursion limit does
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooLarge(problem=f"nested more than {MAX_DEPTH} levels deep (flatten the structure)",
                                problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_expansion(root: yaml.Node) -> None:
    """Reject cycles and alias expansion beyond MAX_VALUES / MAX_DEPTH, in time linear in the number of
    distinct nodes (each node's expanded size and depth are computed once; no recursion)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[key], depth[key] = 1, 0
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_VALUES:
                raise _TooLarge(problem=f"expands to more than {MAX_VALUES} values through its aliases (*name); "
                                "write the values out or use fewer aliases", problem_mark=node.start_mark)
            if depth[key] > MAX_DEPTH:
                raise _TooLarge(problem=f"nested more than {MAX_DEPTH} levels deep once its aliases (*name) are "
                                "expanded", problem_mark=node.start_mark)
            continue
        if key in size:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise _TooLarge(problem="an alias (*name) refers to the list or mapping that contains it (a cycle)",
                                problem_mark=child.start_mark)
            if id(child) not in size:
                stack.append((child, False))


def _line_table(node: yaml.Node | None, prefix: KeyPath, out: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = (*prefix, key_node.value)
                out[path] = key_node.start_mark.line + 1
                _line_table(value_node, path, out)


def check_plain(value: Any, where: str, path: str = "") -> None:
    """Only what omegaconf can hold: str keys; str, int, float, bool, null, lists and mappings."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                inside = f" in '{path}'" if path else ""
                raise ConfigError(f"{where}: key {key!r}{inside} must be a string (quote it)")
            check_plain(item, where, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_plain(item, where, f"{path}[{index}]")
    elif value is not None and not isinstance(value, str | int | float | bool):
        key = f"key '{path}' has " if path else ""
        shown = "" if any(is_secret_key(part) for part in path.replace("[", ".").split(".")) else f" {value!r}"
        raise ConfigError(f"{where}: {key}an unsupported value{shown} of type {type(value).__name__}")


def _load(text: str, where: str) -> tuple[Any, dict[KeyPath, int]]:
    try:
        loader = _Loader(text)  # rejects unprintable characters already
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_expansion(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _TooLarge as err:
        line = f":{err.problem_mark.line + 1}" if err.problem_mark is not None else ""
        raise ConfigError(f"{where}{line}: {err.problem}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = err.problem or err.context or "invalid YAML"
        raise ConfigError(f"{where}{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
    remember_secrets(data)  # an error that quotes a value later must not show a secret's
    check_plain(data, where)
    lines: dict[KeyPath, int] = {}
    _line_table(node, (), lines)
    return data, lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse a YAML file whose top level is a mapping (an empty file is `{}`); also return key lines."""
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot read: {err.strerror or err}") from None
    data, lines = _load(text, where)
    if data is None:
        return {}, lines
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, not a {type(data).__name__}")
    return data, lines


def parse_value(text: str, where: str) -> Any:
    """A command-line value with YAML semantics: `50`, `1e-3`, `true`, `null`, `[a,b]`, `{k: v}`."""
    data, _ = _load(text, where)
    return data
