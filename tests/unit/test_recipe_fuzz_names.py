"""Fuzzing a valid recipe one key at a time: it loads, or the one error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmrp.config import load_recipe
from cmrp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VALID = {
    "name": "fz", "seed": 1, "backbone": "bagel-tiny", "stages": ["sft", "grpo"], "rewards": "sandbox",
    "finetune": {"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "data": {"path": "sandbox://3", "batch_size": 2, "tasks": {"chat": 1.0, "t2i": 1.0}},
    "sft": {"optimizer": {"name": "adamw", "lr": 0.001, "scheduler": "cosine", "warmup_steps": 2}},
    "grpo": {"max_steps": 2, "group_size": 2, "window_range": [0.0, 0.5], "ema_decay": 0.0},
    "trainer": {"max_steps": 3, "accumulate_grad_batches": 1},
    "resume": "never", "checkpoint": {"every_n_steps": 5, "keep": 2}, "nonfinite_stop_after": 3,
}


def _paths(value, prefix=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))


PATHS = list(_paths(VALID))
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["auto", "never", "full", "sgd", "${name}", "${nope}", "grpo"]),
    st.lists(st.integers(-1, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "lr", "mode"]), st.integers(),
                                                              max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=_values, delete=st.booleans())
def test_a_mutated_recipe_loads_or_its_error_names_file_and_key(tmp_path, path, value, delete):
    import copy

    doc = copy.deepcopy(VALID)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    file = tmp_path / "fuzzed_recipe.yaml"
    file.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(str(file))
    except ConfigError as err:
        message = str(err)
        assert "fuzzed_recipe.yaml" in message, message
        assert "key '" in message or "'" in message, message  # the key, quoted
        named = [".".join(map(str, path[: i + 1])) for i in range(len(path))]
        related = {"rewards", "stages", "data.tasks", "name", "output_dir", "finetune.r", "finetune.alpha"}
        assert any(k in message for k in named) or any(k in message for k in related), message


@pytest.mark.parametrize(("override", "key"), [
    ("resume=sometimes", "resume"), ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps"),
    ("checkpoint.keep=0", "checkpoint.keep"), ("nonfinite_stop_after=-2", "nonfinite_stop_after"),
])
def test_resume_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_recipe(str(ROOT / "recipes" / "quickstart.yaml"), [override])


def test_resume_keys_default():
    cfg = load_recipe(str(ROOT / "recipes" / "quickstart.yaml"))
    assert (cfg.resume, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep, cfg.nonfinite_stop_after) == (
        "never", 50, 2, 10)


@pytest.mark.parametrize("value", ["${name}", 3, [1, 2], "quickstart"])
def test_a_section_given_a_scalar_names_the_section(tmp_path, value):
    """omegaconf reports `grpo: ${name}` with no key (the interpolation resolves to a string first); the
    error must still name the section."""
    doc = dict(VALID, grpo=value)
    file = tmp_path / "fuzzed_recipe.yaml"
    file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"fuzzed_recipe\.yaml:\d+: key 'grpo' must be a mapping"):
        load_recipe(str(file))
