"""Issue 20, item 3: YAML that would hang or crash the loader (alias bombs, self-referencing aliases, deep
nesting) is rejected at once with one line naming the file, wherever cmrp reads YAML: recipes, overrides,
backbone cards, reward presets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cmrp.config.yamlio import MAX_DEPTH, read_yaml
from cmrp.errors import ConfigError
from tests.faults._helpers import assert_one_line_error, main, run_cli


def alias_bomb() -> str:
    """~350 bytes that expand to 9**9 (387 million) strings: the "billion laughs"."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


BAD = {
    "alias_bomb": (alias_bomb(), "expands to more than"),
    "self_alias": ("name: x\nseed: &x [*x]\n", "refers to the list or mapping that contains it"),
    "deep_lists": ("name: " + "[" * 5000 + "]" * 5000 + "\n", f"nested more than {MAX_DEPTH} levels"),
    "deep_maps": ("name: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", f"nested more than {MAX_DEPTH} levels"),
    "deep_by_aliases": ("a: &a [[[[[[[[[[1]]]]]]]]]]\nb: &b [[[[[[[[[[*a]]]]]]]]]]\nc: &c [[[[[[[[[[*b]]]]]]]]]]\n"
                        "d: [[[[[[[[[[*c]]]]]]]]]]\n", "once its aliases"),
}


def test_the_alias_bomb_is_rejected_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml:\d+: expands to more than 100000 values"):
        read_yaml(path)
    assert time.perf_counter() - start < 5  # generous: well under a second unloaded (it used to hang)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_yaml_gives_one_line(tmp_path, capsys, case):
    text, problem = BAD[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(text)
    for command in ("validate", "fit"):
        rc, out, err = main(capsys, command, str(recipe), f"output_dir={tmp_path / 'run'}")
        assert_one_line_error(rc, err, command, f"{case}.yaml:", problem)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kind", "key"), [("backbone", "backbone"), ("rewards", "rewards")])
def test_bad_card_and_preset_yaml_gives_one_line(tmp_path, capsys, kind, key):
    (tmp_path / "part.yaml").write_text(alias_bomb())
    rc, out, err = main(capsys, "validate", "quickstart", f"{key}={tmp_path / 'part.yaml'}")
    assert_one_line_error(rc, err, "validate", "part.yaml:", "expands to more than")


def test_bad_override_value_gives_one_line(capsys):
    rc, out, err = main(capsys, "validate", "quickstart", "data.tasks={chat: &x [*x]}")
    assert_one_line_error(rc, err, "validate", "command-line override", "(a cycle)")


def test_through_the_console_script(tmp_path):
    """The real entry point, in its own process: no traceback, one line, exit status 2."""
    (tmp_path / "bomb.yaml").write_text(alias_bomb())
    proc = run_cli("validate", str(tmp_path / "bomb.yaml"), timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "validate", "bomb.yaml:", "expands to more than")


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base_opt: &opt {name: adamw, lr: 0.001}\nsft: {optimizer: {<<: *opt, lr: 0.01}}\n"
                    "tags: &t [a, b]\nmore: [*t, *t]\n")
    data, _ = read_yaml(Path(path))
    assert data["sft"]["optimizer"] == {"name": "adamw", "lr": 0.01}
    assert data["more"] == [["a", "b"], ["a", "b"]]
