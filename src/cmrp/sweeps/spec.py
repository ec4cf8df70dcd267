"""A sweep file: a base recipe, axes of variants, seeds, what to evaluate and how to tabulate it.

```yaml
name: sandbox-ablations            # MLflow experiment of the sweep; default output folder runs/sweeps/<name>
recipe: ../quickstart.yaml         # base recipe: a path (relative to this file) or a shipped name
overrides: {trainer.max_steps: 400}   # optional: recipe keys set in every cell
seeds: [0, 1, 2]
axes:                              # rows = the product of the axes; cells = rows x seeds
  variant:                         # named variants: recipe overrides, plus the reserved keys below
    sft_only: {recipe: ../sandbox/sft.yaml, label: SFT only}
    no_clip: {init_from_cell: sft_only, stages: [grpo], rewards.terms.clip_similarity.weight: 0}
  lr: [{sft.optimizer.lr: 0.001}, {sft.optimizer.lr: 0.003}]   # a list of overrides (rows named lr=0.001, ...)
baseline: sft_only                 # the row paired per-seed deltas are taken against (optional)
evaluate: {features: sandbox, baseline: none, samples: 8}      # `cmrp eval` options (--features sandbox ...)
metrics:                           # the table's columns: eval:<path in eval.json's model numbers> | fit:<path in metrics.json>
  identity: eval:t2i.identity_fidelity
  reward_after: fit:grpo.heldout_reward_after.total
  loss: {from: "fit:loss_last", better: lower}   # which way is better, where the metric's name does not say
claims:                            # statements checked on every seed (optional)
  - {name: GRPO lowers copying, row: sft_grpo, against: sft_only, holds: [max_sim < 0, identity >= -0.05]}
tracking: {tracking_uri: null, experiment: null}   # one store for the whole sweep (default <out>/mlflow.db)
submitit: {cluster: auto, timeout_min: 240, slurm_partition: gpu}   # --launcher submitit's executor parameters
```

Reserved keys of a named variant: `recipe` (another base recipe for this row), `init_from_cell` (start from
the run of that variant's cell — same seed, same values of the other axes — as `init_from`), `label` (the
row's name in tables) and `evaluate` (`cmrp eval` options for this row on top of the sweep's). Every other
key is a recipe key, dotted or nested, exactly as after `cmrp fit RECIPE`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrp import resources
from cmrp.config.assets import SWEEPS, find_asset
from cmrp.config.yamlio import display_path, parse_value, read_yaml
from cmrp.errors import ConfigError

__all__ = ["Claim", "Condition", "Metric", "Sweep", "Variant", "check_managed", "find_sweep", "load_sweep",
           "render_value"]

_KEYS = ("name", "description", "recipe", "overrides", "seeds", "axes", "baseline", "evaluate", "metrics", "claims",
         "tracking", "submitit")
_VARIANT_KEYS = ("recipe", "init_from_cell", "label", "evaluate")
_CLAIM_KEYS = ("name", "row", "against", "holds")
# recipe keys the sweep sets itself in every cell
_MANAGED = {"seed": "list them under `seeds:`", "output_dir": "every cell runs in <out>/<row>/seed<N>",
            "tracking": "set the sweep's `tracking:` instead (one store for the whole sweep)",
            "resume": "the sweep resumes half-finished cells itself"}
_SOURCES = ("eval", "fit")
_OPS = (">=", "<=", ">", "<")
_NAME_OK = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Variant:
    """One value of an axis: a name, its recipe overrides and the reserved keys."""

    name: str
    overrides: tuple[str, ...] = ()
    recipe: Path | None = None
    init_from_cell: str | None = None
    label: str | None = None
    evaluate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A column: where its number is (`eval`: eval.json's model numbers; `fit`: metrics.json), the path,
    and which way is better (`None`: as `cmrp eval`'s report says for that metric name, else higher)."""

    name: str
    source: str
    path: tuple[str, ...]
    better: str | None = None  # higher | lower | neither

    @property
    def spec(self) -> str:
        return f"{self.source}:{'.'.join(self.path)}"

    def direction(self) -> str:
        """higher | lower | neither."""
        if self.better is not None:
            return self.better
        from cmrp.evaluation.report import direction

        return {"↑": "higher", "↓": "lower"}.get(direction(self.path[-1]), "neither")


@dataclass(frozen=True)
class Condition:
    """`column op number` or `column op column`, read from text such as `identity >= -0.05`."""

    left: str
    op: str
    right: str | float

    def __str__(self) -> str:
        right = self.right if isinstance(self.right, str) else f"{self.right:g}"
        return f"{self.left} {self.op} {right}"


@dataclass(frozen=True)
class Claim:
    """A statement checked seed by seed: on the row's numbers, or on its paired deltas `row - against`."""

    name: str
    row: str
    against: str | None
    holds: tuple[Condition, ...]


@dataclass
class Sweep:
    path: Path
    name: str
    description: str
    recipe: Path
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    axes: dict[str, list[Variant]]
    baseline: str | None
    evaluate: dict[str, Any]
    metrics: dict[str, Metric]
    claims: list[Claim]
    tracking: dict[str, Any]
    submitit: dict[str, Any]
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    def where(self, *key: Any) -> str:
        """`file:line: key 'a.b'` for error messages."""
        return _where(self.path, self.lines, key)


def check_managed(key: str, where: str) -> None:
    """A recipe key the sweep sets itself in every cell cannot be overridden."""
    top = str(key).split(".")[0]
    if top in _MANAGED:
        raise ConfigError(f"{where}: the sweep sets `{top}` in every cell — {_MANAGED[top]}")


def _where(path: Path, lines: dict[tuple, int], key: tuple) -> str:
    line = lines.get(tuple(key))
    at = f"{display_path(path)}:{line}" if line else display_path(path)
    return f"{at}: key '{'.'.join(str(k) for k in key)}'" if key else at


def find_sweep(ref: str) -> Path:
    """A sweep file from a path, or a shipped name (`sandbox` -> recipes/sweeps/sandbox.yaml)."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = resources.asset_dir("recipes") / SWEEPS
    names = sorted(p.stem for p in shipped.glob("*.yaml"))
    name = ref.removeprefix(f"{SWEEPS}/")
    if not ref.endswith((".yaml", ".yml")) and (shipped / f"{name}.yaml").is_file():
        return (shipped / f"{name}.yaml").resolve()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    raise ConfigError(f"sweep file '{ref}' not found{hint} Shipped sweeps: {', '.join(names) or 'none'} "
                      "(recipes/sweeps/); or give a path to a YAML file")


def _flow(value: Any, where: str, inside: bool) -> str:
    """YAML flow text of a value (`[grpo]`, `{mode: lora, r: 32}`, `0.001`, `null`)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(k, where, True)}: {_flow(v, where, True)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v, where, True) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    try:
        plain = text == text.strip() and text != "" and parse_value(text, where) == text
    except ConfigError:
        plain = False
    if plain and not (inside and any(c in text for c in ",[]{}:#")):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_value(value: Any, where: str) -> str:
    """A YAML value as the text after `key=` on the command line, read back to the same value."""
    text = _flow(value, where, inside=False)
    back = parse_value(text, where)
    same = back == value or (isinstance(value, float) and math.isnan(value) and math.isnan(back))
    if not same:  # pragma: no cover - a value YAML cannot write on one line
        raise ConfigError(f"{where}: the value {value!r} cannot be passed as an override; write it differently")
    return text


def _closest(word: str, options: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(options)}"


def _mapping(value: Any, where: str, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of {what}, got {type(value).__name__}")
    return value


def _recipe_ref(ref: Any, base_dir: Path, where: str) -> Path:
    if not isinstance(ref, str):
        raise ConfigError(f"{where} must be a recipe path or shipped recipe name, got {ref!r}")
    return find_asset("recipes", ref, relative_to=base_dir, where=where)


class _Reader:
    """Reads one sweep file, naming file, line and key in every error."""

    def __init__(self, path: Path):
        self.path = path
        self.data, self.lines = read_yaml(path)

    def where(self, *key: Any) -> str:
        return _where(self.path, self.lines, key)

    def overrides(self, data: dict[str, Any], *key: Any) -> tuple[str, ...]:
        out = []
        for name, value in data.items():
            check_managed(name, self.where(*key, name))
            out.append(f"{name}={render_value(value, self.where(*key, name))}")
        return tuple(out)

    def variant(self, axis: str, name: str, data: Any) -> Variant:
        key = ("axes", axis, name)
        data = _mapping(data, self.where(*key), "recipe overrides and reserved keys")
        reserved = {k: data[k] for k in _VARIANT_KEYS if k in data}
        recipe = _recipe_ref(reserved["recipe"], self.path.parent, self.where(*key, "recipe")) \
            if "recipe" in reserved else None
        source = reserved.get("init_from_cell")
        if source is not None and not isinstance(source, str):
            raise ConfigError(f"{self.where(*key, 'init_from_cell')} must name another variant of axis '{axis}'")
        label = reserved.get("label")
        evaluate = _mapping(reserved.get("evaluate"), self.where(*key, "evaluate"), "`cmrp eval` options")
        rest = {k: v for k, v in data.items() if k not in _VARIANT_KEYS}
        return Variant(_safe_name(name), self.overrides(rest, *key), recipe, source,
                       str(label) if label is not None else None, evaluate)

    def axis(self, axis: str, data: Any) -> list[Variant]:
        where = self.where("axes", axis)
        if isinstance(data, dict):
            if not data:
                raise ConfigError(f"{where}: an axis needs at least one variant")
            variants = [self.variant(axis, str(name), value) for name, value in data.items()]
        elif isinstance(data, list) and data:
            variants = []
            for i, item in enumerate(data):
                if not isinstance(item, dict) or not item:
                    raise ConfigError(f"{where}[{i}] must be a mapping of recipe overrides, e.g. {{sft.optimizer.lr: 0.001}}")
                overrides = self.overrides(item, "axes", axis)
                name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in (o.split("=", 1) for o in overrides))
                variants.append(Variant(_safe_name(name), overrides))
        else:
            raise ConfigError(f"{where} must be a mapping of named variants or a non-empty list of override mappings")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: two variants have the same name {sorted({n for n in names if names.count(n) > 1})}")
        for v in variants:
            if v.init_from_cell is not None and v.init_from_cell not in names:
                raise ConfigError(f"{self.where('axes', axis, v.name, 'init_from_cell')}: '{v.init_from_cell}' is "
                                  f"not a variant of axis '{axis}'{_closest(v.init_from_cell, names)}")
        return variants

    def metrics(self) -> dict[str, Metric]:
        data = self.data.get("metrics")
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"{self.where('metrics')}: name the table's columns, e.g. "
                              "`metrics: {identity: eval:t2i.identity_fidelity, reward: fit:grpo.heldout_reward_after.total}`")
        out = {}
        for name, spec in data.items():
            better = None
            if isinstance(spec, dict):
                unknown = [k for k in spec if k not in ("from", "better")]
                better = spec.get("better")
                if unknown or "from" not in spec or better not in (None, "higher", "lower", "neither"):
                    raise ConfigError(f"{self.where('metrics', name)}: a column is `eval:...`/`fit:...`, or "
                                      "{from: eval:..., better: higher|lower|neither}")
                spec = spec["from"]
            source, sep, path = str(spec).partition(":")
            if not sep or source not in _SOURCES or not path or not all(path.split(".")):
                raise ConfigError(f"{self.where('metrics', name)}: '{spec}' must be eval:<task>.<metric> (a number "
                                  "in eval.json's model numbers) or fit:<path> (a number in the run's metrics.json)")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
                raise ConfigError(f"{self.where('metrics', name)}: a column name is letters, digits and _ "
                                  "(claims refer to it)")
            out[str(name)] = Metric(str(name), source, tuple(path.split(".")), better)
        return out

    def condition(self, text: Any, where: str, columns: dict[str, Metric]) -> Condition:
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(>=|<=|>|<)\s*(\S+)\s*", str(text))
        if not match:
            raise ConfigError(f"{where}: '{text}' must read `column op value`, e.g. `identity >= -0.05` or "
                              "`reward_after > reward_before` (op: > < >= <=)")
        left, op, right = match.groups()
        value: str | float
        try:
            value = float(right)
        except ValueError:
            value = right
        for name in (left, *([value] if isinstance(value, str) else [])):
            if name not in columns:
                raise ConfigError(f"{where}: '{name}' is not a column under `metrics`{_closest(name, list(columns))}")
        return Condition(left, op, value)

    def claims(self, columns: dict[str, Metric]) -> list[Claim]:
        data = self.data.get("claims") or []
        if not isinstance(data, list):
            raise ConfigError(f"{self.where('claims')} must be a list of claims")
        out = []
        for i, item in enumerate(data):
            where = f"{self.where('claims')}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{where} must be a mapping with name, row, holds (and optionally against)")
            for key in item:
                if key not in _CLAIM_KEYS:
                    raise ConfigError(f"{where}: unknown key '{key}'{_closest(key, _CLAIM_KEYS)}")
            holds = item.get("holds")
            if not item.get("name") or not item.get("row") or not isinstance(holds, list) or not holds:
                raise ConfigError(f"{where}: a claim needs `name`, `row` and a non-empty list `holds`")
            conditions = tuple(self.condition(c, f"{where}.holds", columns) for c in holds)
            against = item.get("against")
            out.append(Claim(str(item["name"]), str(item["row"]), str(against) if against is not None else None,
                             conditions))
        return out


def _safe_name(name: str) -> str:
    """A row part usable as a folder and MLflow run name: other characters become `_`."""
    return _NAME_OK.sub("_", name).strip("_") or "_"


def load_sweep(ref: str | Path) -> Sweep:
    """Read and check a sweep file (not its cells' recipes: `plan` loads those)."""
    path = find_sweep(str(ref))
    r = _Reader(path)
    data = r.data
    for key in data:
        if key not in _KEYS:
            raise ConfigError(f"{r.where(key)}: unknown key{_closest(key, _KEYS)}")
    if "recipe" not in data:
        raise ConfigError(f"{display_path(path)}: a sweep names its base recipe, e.g. `recipe: ../quickstart.yaml`")
    recipe = _recipe_ref(data["recipe"], path.parent, r.where("recipe"))
    seeds = data.get("seeds")
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{r.where('seeds')} must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    axes_data = _mapping(data.get("axes"), r.where("axes"), "axes")
    axes = {str(name): r.axis(str(name), value) for name, value in axes_data.items()}
    metrics = r.metrics()
    tracking = _mapping(data.get("tracking"), r.where("tracking"), "tracking settings")
    for key in tracking:
        if key not in ("tracking_uri", "experiment"):
            raise ConfigError(f"{r.where('tracking', key)}: unknown key{_closest(key, ('tracking_uri', 'experiment'))}")
    name = _safe_name(str(data.get("name") or path.stem))
    return Sweep(
        path=path, name=name, description=str(data.get("description") or ""), recipe=recipe,
        overrides=r.overrides(_mapping(data.get("overrides"), r.where("overrides"), "recipe overrides"), "overrides"),
        seeds=tuple(seeds), axes=axes,
        baseline=str(data["baseline"]) if data.get("baseline") is not None else None,
        evaluate=_mapping(data.get("evaluate"), r.where("evaluate"), "`cmrp eval` options"),
        metrics=metrics, claims=r.claims(metrics), tracking=tracking,
        submitit=_mapping(data.get("submitit"), r.where("submitit"), "submitit executor parameters"),
        lines=r.lines,
    )
