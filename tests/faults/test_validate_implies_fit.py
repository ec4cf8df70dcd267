"""Issue 20's property: whatever `cmrp validate` accepts (with no note about this machine), `cmrp fit` with
`trainer.max_steps=1` runs to the end; whatever it rejects, it rejects with one line and exit status 2.

Recipes are generated from the schema (`cmrp.config.schema.Recipe`): every key of every section is drawn,
from a small, cheap range of sensible values (`SANE`, else one by the key's type), and a few keys per recipe
get an edge value instead (negative, zero, huge, NaN, infinite, a wrong name). The backbone is the tiny
card; `tracking` stays local. Two choices are kept consistent on purpose, because they depend on the built
model's module names, which `cmrp validate` never builds: LoRA target sets and GRPO train groups (fit checks
them right after building the model, before any training).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from cmrp.config.schema import Recipe
from tests.faults._helpers import main

# sensible values, cheap to run (a fit of one step must stay seconds); other keys get one by their type
SANE: dict[str, st.SearchStrategy] = {
    "name": st.sampled_from(["prop", "a b", "ünï", "x/y"]),
    "seed": st.integers(0, 2**32 - 1),
    "decoding": st.sampled_from(["chain", "joint", "think"]),
    "stages": st.sampled_from([["sft"], ["grpo"], ["sft", "grpo"]]),
    "resume": st.sampled_from(["never", "auto"]),
    "nonfinite_stop_after": st.integers(0, 5),
    "finetune.mode": st.sampled_from(["lora", "full"]),
    "finetune.r": st.integers(1, 8),
    "finetune.alpha": st.integers(1, 32),
    "finetune.dropout": st.floats(0, 0.5),
    "finetune.gradient_checkpointing": st.sampled_from([None, True, False]),
    "data.path": st.sampled_from(["sandbox://0", "sandbox://7"]),
    "data.format": st.sampled_from(["auto", "native"]),
    "data.batch_size": st.integers(1, 4),
    "data.num_workers": st.just(0),
    "data.max_text_tokens": st.integers(4, 64),
    "data.tasks": st.dictionaries(st.sampled_from(["chat", "thinking", "t2i", "vqa", "knowledge_qa"]),
                                  st.floats(0, 2), min_size=1).filter(lambda d: any(v > 0 for v in d.values())),
    "sft.ce_weight": st.floats(0, 2),
    "sft.mse_weight": st.floats(0, 2),
    "sft.timestep_shift": st.floats(0.1, 5),
    "trainer.accelerator": st.sampled_from(["auto", "cpu"]),
    "trainer.devices": st.sampled_from([1, "auto"]),
    "trainer.num_nodes": st.just(1),
    "trainer.strategy": st.just("auto"),
    "trainer.precision": st.sampled_from(["32-true", "32"]),
    "trainer.log_every_n_steps": st.integers(1, 10),
    "trainer.gradient_clip_val": st.none() | st.floats(0, 2),
    "trainer.accumulate_grad_batches": st.integers(1, 2),
    "checkpoint.every_n_steps": st.integers(0, 2),
    "checkpoint.keep": st.integers(1, 3),
    "eval.grid_prompts": st.integers(0, 2),
    "eval.images_per_prompt": st.integers(1, 2),
    "eval.sample_steps": st.integers(1, 3),
    "eval.max_items": st.integers(0, 4),
    "grpo.max_steps": st.integers(1, 2),
    "grpo.prompts_per_step": st.integers(1, 2),
    "grpo.group_size": st.integers(1, 3),
    "grpo.sample_steps": st.integers(1, 3),
    "grpo.window_size": st.integers(1, 3),
    "grpo.inner_epochs": st.integers(1, 2),
    "grpo.minibatch_size": st.integers(1, 4),
    "grpo.accumulate": st.integers(1, 2),
    "grpo.reward_workers": st.integers(1, 2),
    "grpo.noise_level": st.floats(0.05, 1.5),
    "grpo.sde": st.sampled_from(["sde", "cps"]),
    "grpo.window_range": st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda p: sorted(p)),
    "grpo.cfg_scale": st.floats(1, 5),
    "grpo.cfg_img_scale": st.floats(1, 3),
    "grpo.cfg_interval": st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda p: sorted(p)),
    "grpo.cfg_renorm_type": st.sampled_from(["global", "channel", "text_channel", "none"]),
    "grpo.cfg_renorm_min": st.floats(0, 1),
    "grpo.timestep_shift": st.none() | st.floats(0.2, 4),
    "grpo.clip_range": st.floats(1e-5, 1),
    "grpo.adv_std": st.sampled_from(["group", "global"]),
    "grpo.adv_eps": st.floats(1e-6, 1),
    "grpo.adv_clip": st.floats(0, 10),
    "grpo.kl_beta": st.floats(0, 0.5),
    "grpo.max_grad_norm": st.floats(0, 2),
    "grpo.ema_decay": st.floats(0, 0.99),
    "world.reference_images": st.integers(1, 60),
    "world.first_seed": st.integers(0, 10**6),
    "world.characters": st.integers(1, 300),
    "world.scenes": st.integers(1, 100),
    "world.heldout_characters": st.integers(0, 5),
}
for _section in ("sft", "grpo"):
    SANE[f"{_section}.optimizer.name"] = st.sampled_from(["adamw", "sgd"])
    SANE[f"{_section}.optimizer.lr"] = st.floats(1e-6, 1e-2)
    SANE[f"{_section}.optimizer.betas"] = st.lists(st.floats(0, 0.999), min_size=2, max_size=2)
    SANE[f"{_section}.optimizer.weight_decay"] = st.floats(0, 0.1)
    SANE[f"{_section}.optimizer.scheduler"] = st.sampled_from(["constant", "cosine", "linear"])
    SANE[f"{_section}.optimizer.warmup_steps"] = st.integers(0, 3)

FIXED = {"backbone": "bagel-tiny", "tracking": {"tracking_uri": None, "experiment": "cmrp", "run_name": None},
         "init_from": None, "data.character": None, "output_dir": None}  # output_dir: set per example
MODEL_DEPENDENT = ("finetune.targets", "grpo.train_groups", "grpo.same_noise", "rewards")

EDGE_INT = st.sampled_from([-1, 0, 2**31, 2**32, 10**26])
EDGE_FLOAT = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300])
EDGE_STR = st.sampled_from(["", "bogus", "${nowhere}"])


def _leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> declared type, for every leaf of the schema (sections are walked into)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            out.update(_leaves(inner[0], f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


LEAVES = {k: tp for k, tp in _leaves(Recipe).items()
          if not any(k == f or k.startswith(f"{f}.") for f in (*FIXED, *MODEL_DEPENDENT))}


def _by_type(tp: Any) -> st.SearchStrategy:
    optional = type(None) in typing.get_args(tp)
    inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    base = {int: st.integers(0, 3), float: st.floats(0, 1), bool: st.booleans(),
            str: st.text("abc", min_size=1, max_size=4)}.get(inner, st.just(None))
    return st.none() | base if optional else base


def _edge(tp: Any) -> st.SearchStrategy:
    inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if inner is int:
        return EDGE_INT
    if inner is float:
        return EDGE_FLOAT
    if inner is str:
        return EDGE_STR
    return st.sampled_from([[], [math.nan], "bogus", -1])


def _set(doc: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[last] = value


@st.composite
def recipes(draw) -> dict:
    doc: dict = {}
    edges = set(draw(st.lists(st.sampled_from(sorted(LEAVES)), max_size=2)))
    for key, tp in sorted(LEAVES.items()):
        strategy = _edge(tp) if key in edges else SANE.get(key, _by_type(tp))
        _set(doc, key, draw(strategy))
    for key, value in FIXED.items():
        if value is not None:
            _set(doc, key, value)
    # consistent by construction (see the module docstring): a LoRA target set and the GRPO groups it trains
    group = draw(st.sampled_from(["generation", "understanding"]))
    _set(doc, "finetune.targets", draw(st.sampled_from(["default", group])))
    _set(doc, "grpo.train_groups", draw(st.sampled_from([[group], []])))
    _set(doc, "grpo.same_noise", draw(st.booleans()))
    _set(doc, "rewards", "sandbox" if "grpo" in doc.get("stages", []) or draw(st.booleans()) else None)
    return doc


def _check(doc: dict, capsys) -> None:
    with tempfile.TemporaryDirectory(prefix="cmrp-prop-") as tmp:
        doc = {**doc, "output_dir": str(Path(tmp) / "run")}
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(doc, allow_unicode=True))
        rc, out, err = main(capsys, "validate", str(recipe), "trainer.max_steps=1")
        assert "Traceback" not in err, err
        if rc != 0:
            assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("cmrp validate: error: "), err
            return
        if "note:" in out:  # this machine cannot run it (e.g. a GPU setting): validate said so, fit would stop
            return
        rc, out, err = main(capsys, "fit", str(recipe), "trainer.max_steps=1")
        assert rc == 0, f"validate accepted this recipe, fit failed:\n{yaml.safe_dump(doc)}\n{err[-3000:]}"
        assert (Path(doc["output_dir"]) / "metrics.json").is_file()


_SETTINGS = dict(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.filter_too_much, HealthCheck.data_too_large])


@seed(5)  # reproducible in the default suite: six recipes, two of which validate accepts and fit runs
@settings(max_examples=6, database=None, **_SETTINGS)
@given(doc=recipes())
def test_validate_ok_implies_fit_runs(doc, capsys):
    _check(doc, capsys)


@pytest.mark.slow  # dozens of one-step fits: ~10-20 min on a loaded 2-core machine
@settings(max_examples=60, **_SETTINGS)
@given(doc=recipes())
def test_validate_ok_implies_fit_runs_many(doc, capsys):
    _check(doc, capsys)
