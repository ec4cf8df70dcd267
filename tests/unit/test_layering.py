"""Who may import whom in `src/cmrp`, read from the source (an AST walk; nothing is imported).

The layers, lowest first; a module may import its own layer and the layers below it, never above:

1. base: `cmrp` (the package), `errors`, `registry`, `jsonio`, `resources`, `progress` — no cmrp imports
   beyond each other;
2. config: recipes, cards, presets and their checks (validation reads the registries and the code's lists
   from source, so it needs nothing above);
3. sampling: the sampler maths (flow, tokens, guidance, rollouts) and the decoding strategies — data's
   example construction reads the strategies, so sampling sits below data;
4. data: characters, formats, tasks, and the sandbox *world* (`sandbox` package, persona, renderer,
   templates, dialogue, qa, world, writer): `data.path: sandbox://SEED` generates a character;
5. backbones: the adapters, their kit, checkpoint files (`cmrp.checkpoint`) and checkpoint loading
   (`backbones.loading`); an adapter never reaches a trainer, an evaluator or the CLI;
6. rewards, evaluation, tracking and the sandbox's feature nets (nets, clip, probe, features: what reward
   terms and the oracle use);
7. training: trainer setup, the SFT and GRPO stages, the run's orchestration;
8. applications: chat, sweeps, perf (`cmrp plan`), the CLI, sandbox pretraining (an application of
   training) and every package's `commands` module (its sub-commands).

Also checked: `cmrp.rewards` stays importable by other projects (torch, numpy and the standard library at
module level; its optional libraries inside the functions that need them), and no import cycle exists
among modules (module-level imports).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("cmrp", "cmrp.errors", "cmrp.registry", "cmrp.jsonio", "cmrp.resources", "cmrp.progress")),
    ("config", ("cmrp.config",)),
    ("sampling", ("cmrp.sampling",)),
    ("data", ("cmrp.data", "cmrp.sandbox", "cmrp.sandbox.persona", "cmrp.sandbox.renderer", "cmrp.sandbox.templates",
              "cmrp.sandbox.dialogue", "cmrp.sandbox.qa", "cmrp.sandbox.world", "cmrp.sandbox.writer")),
    ("backbones", ("cmrp.backbones", "cmrp.checkpoint")),
    ("rewards/evaluation", ("cmrp.rewards", "cmrp.evaluation", "cmrp.tracking", "cmrp.sandbox.nets",
                            "cmrp.sandbox.clip", "cmrp.sandbox.probe", "cmrp.sandbox.features")),
    ("training", ("cmrp.training",)),
    ("applications", ("cmrp.chat", "cmrp.sweeps", "cmrp.perf", "cmrp.cli", "cmrp.sandbox.pretrain",
                      "cmrp.sandbox.commands")),
]
APPLICATIONS = len(LAYERS) - 1
REWARDS_MAY_IMPORT = {"torch", "numpy"}  # at module level, besides the standard library
REWARDS_MAY_IMPORT_CMRP = ("cmrp.errors", "cmrp.registry", "cmrp.jsonio", "cmrp.rewards")  # at module level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "cmrp").rglob("*.py"))}


def layer(module: str) -> int:
    """The layer of a module: a package's `commands` module is an application; otherwise the longest
    listed prefix decides (`cmrp` itself matches only the package)."""
    if module.rsplit(".", 1)[-1] == "commands":
        return APPLICATIONS
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            hit = module == prefix or (prefix != "cmrp" and module.startswith(prefix + "."))
            if hit and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS (and to the docstring)"
    return found


def _target(module: str, node: ast.ImportFrom, alias: ast.alias) -> str:
    """The module an import reaches: `from pkg import sub` is the submodule when there is one."""
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([node.module] if node.module else [])])
    full = f"{base}.{alias.name}"
    return full if full in MODULES else base


def imports(module: str, *, module_level_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in a module's source."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((_target(module, child, alias), child.lineno, top) for alias in child.names)
            inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            typing_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            walk(child, top and not inner and not typing_only)

    walk(tree, True)
    return [item for item in found if item[2] or not module_level_only]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for module in MODULES:
        own = layer(module)
        for target, line, _ in imports(module):
            if target.split(".")[0] == "cmrp" and layer(target) > own:
                wrong.append(f"{MODULES[module].relative_to(SRC)}:{line}: {module} ({LAYERS[own][0]}) imports "
                             f"{target} ({LAYERS[layer(target)][0]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_rewards_import_only_torch_numpy_and_the_standard_library_at_module_level():
    """Other projects import `cmrp.rewards` for its terms: at import it needs torch, numpy, and of cmrp only
    the base (what a term reads from data or the sandbox is imported when a term needs it)."""
    wrong = []
    for module in (m for m in MODULES if m == "cmrp.rewards" or m.startswith("cmrp.rewards.")):
        for target, line, top in imports(module):
            root = target.split(".")[0]
            own = root != "cmrp" or target.startswith(tuple(p + "." for p in REWARDS_MAY_IMPORT_CMRP)) or (
                target in REWARDS_MAY_IMPORT_CMRP)
            if top and (not own or (root not in sys.stdlib_module_names and root not in REWARDS_MAY_IMPORT | {"cmrp"})):
                wrong.append(f"{MODULES[module].relative_to(SRC)}:{line}: {target}")
    assert not wrong, "import these inside the functions that need them:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycle_among_modules():
    graph = {m: {t for t, _, _ in imports(m, module_level_only=True) if t in MODULES and t != m} for m in MODULES}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
