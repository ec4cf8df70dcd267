"""Every rejection of a fuzzed native character names the file and the JSON field (the RoleScape-20 and
MMRole readers' fuzz tests check their `Problem`s the same way)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmrp.data import read_character
from cmrp.errors import DataError
from cmrp.sandbox import write_sandbox_character
from tests.unit.json_fuzz import mutate_json_file

FILES = ("train/data.json", "test/data.json")
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["../x.png", "/etc/passwd", "images/ref_00.png", "ref_00", "user", "character"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["scenes", "turns", "role", "text", "image_id", "mcq", "options", "answer"]), inner,
        max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    return write_sandbox_character(3, tmp_path_factory.mktemp("native") / "char", n_reference_images=3, n_scenes=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_native_character_error_names_file_and_field(valid_dir, data):
    file = data.draw(st.sampled_from([f for f in FILES if (valid_dir / f).is_file()]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(valid_dir, Path(tmp) / "c"))
        mutate_json_file(data, root / file, _values)
        try:
            read_character(root)
        except DataError as err:
            text = str(err)
            if "\n" in text:  # "<root>: N error(s) ..." then one problem per line
                lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
            else:  # one error: "<root>/<problem>"
                assert text.startswith(f"{root}/"), text
                lines = [text[len(f"{root}/"):]]
            assert lines, str(err)
            for line in lines:  # "<file>: <field>: <message>"
                assert re.match(r"^(warning: )?\S+\.(json|jsonl|png|jpg|txt|yaml)\S*: \S.*: .+", line), line
