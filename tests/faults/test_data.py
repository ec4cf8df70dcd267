"""Issue 20, item 9: a decompression-bomb-sized image and NaN/infinity in numeric data fields are refused with
one line naming the file and field (not PIL's warning, not silently accepted)."""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import pytest

from cmrp.data.character import ImageRef
from cmrp.data.images import MAX_PIXELS, load_images
from cmrp.errors import DataError
from cmrp.sandbox import write_sandbox_character
from tests.faults._helpers import TINY, assert_one_line_error, main


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels (a few dozen bytes: a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture
def character(tmp_path):
    return write_sandbox_character(5, tmp_path / "char", n_reference_images=3, n_scenes=4)


@pytest.mark.parametrize(("size", "needle"), [((10_000, 10_000), "10000 x 10000 pixels, more than the"),
                                              ((20_000, 20_000), "declares more than")])
def test_a_huge_image_is_refused_naming_it(tmp_path, capsys, character, size, needle):
    image = character / "train" / "images" / "ref_01.png"
    image.write_bytes(png_header(*size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not reach the user
        for command in ("validate", "fit"):
            rc, _, err = main(capsys, command, *TINY, f"data.path={character}", f"output_dir={tmp_path / 'run'}")
            assert_one_line_error(rc, err, command, "train/images/ref_01.png", needle)
        with pytest.raises(DataError, match=r"ref_01\.png: .*pixels"):
            load_images([ImageRef("x", image)], (32, 32))
    assert 8192 * 8192 == MAX_PIXELS


@pytest.mark.parametrize(("value", "shown"), [("NaN", "is NaN"), ("Infinity", "is infinite"), ("1e400", "is infinite"),
                                              ("-Infinity", "is infinite")])
def test_non_finite_numbers_in_data_are_refused(tmp_path, capsys, character, value, shown):
    path = character / "train" / "data.json"
    data = json.loads(path.read_text())
    data["images"][1]["attributes"]["hue"] = "PLACEHOLDER"
    path.write_text(json.dumps(data).replace('"PLACEHOLDER"', value))
    rc, _, err = main(capsys, "validate", *TINY, f"data.path={character}", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, "validate", "train/data.json: images[1].attributes.hue: ", shown)


def test_non_finite_numbers_in_the_profile_are_refused(tmp_path, capsys, character):
    path = character / "character.json"
    path.write_text(path.read_text().replace('"fields": {', '"fields": {"age": NaN, ', 1))
    rc, out, _ = main(capsys, "data", "validate", str(character))
    assert rc == 1 and "FAILED:" in out and "character.json: profile.fields.age: is NaN" in out
