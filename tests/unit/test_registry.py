"""The generic name -> object registry behind every ablation axis."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from cmrp.errors import ConfigError
from cmrp.registry import BACKBONES, DECODING, REWARDS, Registry
from tests.plugins import make_plugin, run_with_plugins


def test_register_and_get():
    reg: Registry = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        pass

    assert reg.get("alpha") is Alpha
    assert "alpha" in reg and "beta" not in reg
    assert reg.names() == ["alpha"] and list(reg) == ["alpha"]


def test_names_are_sorted():
    reg: Registry = Registry("widget")
    for name in ("zeta", "alpha", "mu"):
        reg.register(name)(object())
    assert reg.names() == ["alpha", "mu", "zeta"]


def test_unknown_name_suggests_and_lists_known():
    reg: Registry = Registry("widget")
    reg.register("cosine")(object())
    reg.register("linear")(object())
    with pytest.raises(ConfigError) as info:
        reg.get("cosin", where="recipe key `sched`")
    message = str(info.value)
    assert "unknown widget 'cosin'" in message and "recipe key `sched`" in message
    assert "Did you mean 'cosine'?" in message and "Known: cosine, linear." in message


def test_empty_registry_says_none_known():
    with pytest.raises(ConfigError, match="Known: none"):
        Registry("widget").get("anything")


def test_registering_twice_is_only_allowed_for_the_same_object():
    reg: Registry = Registry("widget")
    obj = object()
    reg.register("x")(obj)
    assert reg.register("x")(obj) is obj  # re-import of the same module is harmless
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(object())


def test_without_an_entry_point_group_no_entry_points_are_read(monkeypatch):
    def forbidden(**_kwargs):
        raise AssertionError("entry points were read")

    monkeypatch.setattr(importlib.metadata, "entry_points", forbidden)
    reg: Registry = Registry("widget")
    reg.register("a")(1)
    assert reg.names() == ["a"]


def test_group_without_plugins_is_fine():
    reg: Registry = Registry("widget", "cmrp.tests-no-such-group")
    assert reg.names() == []


class _FakeEntryPoint:
    def __init__(self, name: str, obj: object):
        self.name = name
        self._obj = obj

    def load(self) -> object:
        return self._obj


def test_entry_points_are_loaded_lazily_and_in_tree_names_win(monkeypatch):
    calls = []
    plugin, builtin = object(), object()

    def fake_entry_points(*, group: str):
        calls.append(group)
        return [_FakeEntryPoint("plugin", plugin), _FakeEntryPoint("builtin", object())]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    reg: Registry = Registry("widget", "cmrp.widgets")
    reg.register("builtin")(builtin)
    assert calls == []  # nothing read before first use
    assert reg.get("plugin") is plugin and reg.get("builtin") is builtin
    reg.names()
    assert calls == ["cmrp.widgets"]  # read once


def test_builtin_modules_are_imported_on_first_use(tmp_path: Path, monkeypatch):
    (tmp_path / "probe_registry.py").write_text(
        "from cmrp.registry import Registry\nREG = Registry('probe', None, ('probe_members',))\n"
    )
    (tmp_path / "probe_members.py").write_text(
        "import probe_registry\nprobe_registry.REG.register('member')(42)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("probe_registry", "probe_members"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import probe_registry

    try:
        assert "probe_members" not in sys.modules
        assert probe_registry.REG.get("member") == 42
        assert "probe_members" in sys.modules
    finally:
        sys.modules.pop("probe_registry", None)
        sys.modules.pop("probe_members", None)


def test_shipped_registries_use_the_documented_entry_point_groups():
    assert (BACKBONES.entry_point_group, REWARDS.entry_point_group) == ("cmrp.backbones", "cmrp.rewards")
    assert DECODING.entry_point_group == "cmrp.decoding"


PLUGIN = '''
from cmrp.sampling.decoding import DecodingStrategy

# the image sees the reply, as chain does, under another name: what a third-party package would register
REPLY_FIRST = DecodingStrategy("reply_first", True, "a plugin's strategy: the image after the reply")
'''


def test_a_plugin_decoding_strategy_validates_and_builds_training_data(tmp_path):
    """A strategy installed by another distribution (entry point group `cmrp.decoding`) is accepted wherever
    the built-ins are: recipe validation, training-data construction and `cmrp chat --decoding`."""
    make_plugin(tmp_path, "cmrp_reply_first", PLUGIN, "cmrp.decoding", "reply_first = cmrp_reply_first:REPLY_FIRST")
    code = (
        "import contextlib, io\n"
        "from cmrp.cli import main\n"
        "from cmrp.config import load_recipe\n"
        "from cmrp.data.sources import load_recipe_character\n"
        "from cmrp.data.tasks import build_examples\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    assert main(['validate', 'sandbox/sft', 'decoding=reply_first']) == 0\n"
        "assert 'OK:' in out.getvalue(), out.getvalue()\n"
        "cfg = load_recipe('sandbox/sft', ['decoding=reply_first'])\n"
        f"character = load_recipe_character(cfg.data, __import__('pathlib').Path({str(tmp_path)!r}))\n"
        "plugin = build_examples(character, {'t2i': 1.0}, decoding='reply_first')['t2i']\n"
        "chain = build_examples(character, {'t2i': 1.0}, decoding='chain')['t2i']\n"
        "joint = build_examples(character, {'t2i': 1.0}, decoding='joint')['t2i']\n"
        "assert [e.segments for e in plugin] == [e.segments for e in chain] != [e.segments for e in joint]\n"
        "from cmrp.chat.commands import add_session_arguments\n"
        "import argparse\n"
        "p = argparse.ArgumentParser(); add_session_arguments(p)\n"
        "assert p.parse_args(['--decoding', 'reply_first']).decoding == 'reply_first'\n"
        "print('plugin ok')\n"
    )
    run = run_with_plugins(tmp_path, code)
    assert run.returncode == 0 and "plugin ok" in run.stdout, run.stderr[-3000:]
