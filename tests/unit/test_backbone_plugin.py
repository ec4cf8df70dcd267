"""Adding a backbone edits nothing else: a package that registers an adapter is found (in-tree: by walking
the package, as `cmrp.backbones` is walked; from another distribution: by its `cmrp.backbones` entry point),
and a recipe naming its card validates."""

from __future__ import annotations

import sys
from pathlib import Path

from cmrp.registry import BACKBONES, Registry
from tests.plugins import make_plugin, run_with_plugins


def test_the_builtin_backbones_are_the_subpackages_that_register_one():
    found = BACKBONES._builtin_modules
    assert {"cmrp.backbones.bagel", "cmrp.backbones.janus", "cmrp.backbones.showo"} <= set(found)
    assert all(module.count(".") == 2 and module.startswith("cmrp.backbones.") for module in found), found
    assert {"bagel", "janus", "showo"} <= set(BACKBONES.names())


def test_a_new_subpackage_is_a_builtin_without_being_listed(tmp_path: Path, monkeypatch):
    """What `cmrp.backbones` gets from a new folder: its name is known from source (nothing imported), and
    `get` imports it; a subpackage that registers nothing (shared helpers) is not imported."""
    pkg = tmp_path / "toyplug"
    (pkg / "toy").mkdir(parents=True)
    (pkg / "helpers").mkdir()
    (pkg / "__init__.py").write_text("from cmrp.registry import Registry\n"
                                     "TOYS = Registry('toy', None, symbol='TOYS', builtin_packages=('toyplug',))\n")
    (pkg / "toy" / "__init__.py").write_text("from toyplug.toy.adapter import ToyAdapter\n")
    (pkg / "toy" / "adapter.py").write_text(
        "from toyplug import TOYS\n\n@TOYS.register('toy')\nclass ToyAdapter:\n    def __init__(self, width: int = 4):\n"
        "        self.width = width\n")
    (pkg / "helpers" / "__init__.py").write_text("raise RuntimeError('a helper package must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import toyplug

        assert toyplug.TOYS.names() == ["toy"] and "toyplug.toy" not in sys.modules
        assert toyplug.TOYS.parameters("toy") == ["width"]
        assert toyplug.TOYS.get("toy")(width=2).width == 2 and "toyplug.helpers" not in sys.modules
    finally:
        for name in [m for m in sys.modules if m == "toyplug" or m.startswith("toyplug.")]:
            sys.modules.pop(name)


def test_a_registry_without_packages_lists_only_its_modules():
    assert Registry("thing", None, ("cmrp.sampling.decoding",), symbol="DECODING")._builtin_modules == (
        "cmrp.sampling.decoding",)


TOY_ADAPTER = '''
"""A backbone from another distribution: only its name and constructor matter to validation."""


class ToyAdapter:
    image_head = "tokens"

    @classmethod
    def build(cls, card, *, corpus=(), dtype=None):
        return cls()
'''

TOY_CARD = """name: toy-tiny
adapter: toy
weights: null
tokenizer: train-bpe
image_head: tokens
capabilities: [text, image_understanding, image_generation]
description: a plugin's backbone card
architecture: {}
"""


def test_a_plugin_backbone_from_an_entry_point_validates(tmp_path: Path):
    """The distribution route: entry point group `cmrp.backbones`, a card file; `cmrp validate` of a shipped
    recipe pointed at that card says OK, and an adapter name nobody registered is refused with the known ones."""
    make_plugin(tmp_path, "cmrp_toy", TOY_ADAPTER, "cmrp.backbones", "toy = cmrp_toy:ToyAdapter")
    card = tmp_path / "toy-tiny.yaml"
    card.write_text(TOY_CARD)
    stray = tmp_path / "stray-tiny.yaml"
    stray.write_text(TOY_CARD.replace("adapter: toy", "adapter: toyy"))
    code = (
        "import contextlib, io\n"
        "from cmrp.cli import main\n"
        "from cmrp.registry import BACKBONES\n"
        "assert 'toy' in BACKBONES.names() and BACKBONES.get('toy').build(None).image_head == 'tokens'\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    assert main(['validate', 'sandbox/sft', 'backbone={card}']) == 0\n"
        "assert 'OK:' in out.getvalue() and 'backbone toy-tiny' in out.getvalue(), out.getvalue()\n"
        f"assert main(['validate', 'sandbox/sft', 'backbone={stray}']) == 2\n"
        "print('plugin ok')\n"
    )
    run = run_with_plugins(tmp_path, code)
    assert run.returncode == 0 and "plugin ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    assert "unknown backbone adapter 'toyy'" in run.stderr and "Did you mean 'toy'?" in run.stderr, run.stderr
