"""Data formats are a registry, as decoding strategies are: validation reads it (built-ins from source, plugins
by entry point), so a format installed by another distribution validates in a recipe and reads a character."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmrp.config import load_recipe
from cmrp.errors import ConfigError
from cmrp.registry import FORMATS
from tests.plugins import make_plugin, run_with_plugins


def test_the_builtin_formats_are_found_in_the_modules_that_read_them():
    assert FORMATS.names() == ["mmrole", "native", "rolescape20"]
    assert FORMATS.entry_point_group == "cmrp.data_formats"


def test_an_unknown_format_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"data\.format.*'nativ'.*native, rolescape20.*did you mean 'native'"):
        load_recipe("sandbox/sft", ["data.format=nativ"])


PLUGIN = '''
from pathlib import Path

from cmrp.data.native import inspect_native
from cmrp.data.problems import DataFormat

# a layout of another project: a marker file and a native character one folder down
BOXED = DataFormat("boxed", lambda path: (Path(path) / "BOX").is_file(),
                   lambda path, character: inspect_native(Path(path) / "inner"),
                   "a BOX marker and the character in inner/", order=5)
'''


def test_a_plugin_format_validates_detects_and_loads(tmp_path: Path):
    make_plugin(tmp_path, "cmrp_boxed", PLUGIN, "cmrp.data_formats", "boxed = cmrp_boxed:BOXED")
    box = tmp_path / "box"
    code = (
        "import contextlib, io, pathlib\n"
        "from cmrp.cli import main\n"
        "from cmrp.sandbox import write_sandbox_character\n"
        "from cmrp.data.validate import detect_format, load_character\n"
        "from cmrp.data.tasks import build_examples\n"
        f"box = pathlib.Path({str(box)!r})\n"
        "write_sandbox_character(3, box / 'inner', n_reference_images=2, n_scenes=4)\n"
        "(box / 'BOX').write_text('')\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    assert main(['validate', 'sandbox/sft', f'data.path={box}', 'data.format=boxed']) == 0\n"
        "assert 'OK:' in out.getvalue() and 'training examples: chat' in out.getvalue(), out.getvalue()\n"
        "assert detect_format(box) == 'boxed'\n"  # auto: the plugin's detector (order 5) is tried
        "character = load_character(box, 'boxed')\n"
        "assert character.name and build_examples(character, {'chat': 1.0})['chat']\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['data', 'validate', str(box), '--format', 'boxed']) == 0\n"
        "    assert main(['data', 'validate', str(box / 'inner'), '--format', 'boxed']) == 1\n"
        "print('plugin ok')\n"
    )
    run = run_with_plugins(tmp_path, code)
    assert run.returncode == 0 and "plugin ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
