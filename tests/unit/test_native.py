"""The native character format: lossless round trip, and every malformed input named by file and field."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cmrp.data import (
    Character,
    CharacterSplit,
    ImageRef,
    MultipleChoice,
    OpenQA,
    Profile,
    Scene,
    T2IItem,
    Turn,
    VQAItem,
    load_character,
    read_character,
    validate_character_dir,
    validate_native,
    write_character,
)
from cmrp.errors import DataError
from cmrp.sandbox import write_sandbox_character

TRAIN = "train/data.json"


@pytest.fixture(scope="module")
def sandbox_dir(tmp_path_factory) -> Path:
    return write_sandbox_character(5, tmp_path_factory.mktemp("native") / "src", n_reference_images=4, n_scenes=10)


@pytest.fixture
def char_dir(sandbox_dir, tmp_path) -> Path:
    """A fresh, writable copy of a small valid character."""
    return Path(shutil.copytree(sandbox_dir, tmp_path / "char"))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def comparable(character: Character) -> dict:
    """The character as plain data, image paths made relative to its root."""
    data = dataclasses.asdict(character)
    for split in ("train", "test"):
        for image in data[split]["images"].values():
            image["path"] = Path(image["path"]).relative_to(character.root).as_posix()
    del data["root"], data["warnings"]
    return data


# ----------------------------------------------------------------------------------------------- round trip


def test_sandbox_character_is_clean(sandbox_dir):
    assert validate_native(sandbox_dir) == []
    character = read_character(sandbox_dir)
    assert character.warnings == [] and character.source_format == "native"
    assert all(image.path.is_absolute() and image.path.is_file() for image in character.reference_images)


def test_round_trip_is_lossless_and_byte_stable(sandbox_dir, tmp_path):
    first = read_character(sandbox_dir)
    copy = write_character(first, tmp_path / "copy")
    second = read_character(copy)
    assert comparable(second) == comparable(first)
    for name in ("character.json", TRAIN, "test/data.json"):
        assert (copy / name).read_bytes() == (sandbox_dir / name).read_bytes()
    for image in first.reference_images:
        assert second.train.images[image.id].path.read_bytes() == image.path.read_bytes()


def test_round_trip_of_hand_built_character(tmp_path):
    Image.new("RGB", (6, 5), (10, 200, 30)).save(tmp_path / "photo.jpg")
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(tmp_path / "b.png")
    train = CharacterSplit(
        images={
            "a/b c": ImageRef("a/b c", tmp_path / "photo.jpg", "a jpeg", {"k": [1, 2]}),
            "a_b c": ImageRef("a_b c", tmp_path / "b.png"),
        },
        scenes=[Scene("s1", [Turn("user", "hi ✨"), Turn("character", "hey", "a/b c", "why", "how")])],
        knowledge_open=[OpenQA("q", "a")],
        knowledge_mcq=[MultipleChoice("q?", ["x", "y"], 1), MultipleChoice("q2?", ["x", "y", "z"], 2, "hard")],
        vqa=[VQAItem("a_b c", [OpenQA("color?", "red")], [MultipleChoice("c?", ["r", "g"], 0, "easy")])],
        t2i=[T2IItem("draw", "a/b c"), T2IItem("draw more")],
    )
    test = CharacterSplit(judge_questions={"memorization": ["where?"], "personality": []})
    original = Character("Zoë", Profile("text", {"traits": ["x"], "nested": {"n": 1}}), train, test)
    out = write_character(original, tmp_path / "out")
    loaded = read_character(out)
    original.root = loaded.root
    for image in original.train.images.values():  # the writer stores every image as PNG under images/
        image.path = loaded.train.images[image.id].path
    assert comparable(loaded) == comparable(original)
    paths = {image.path.name for image in loaded.reference_images}
    assert paths == {"a_b_c.png", "a_b_c-2.png"}
    with Image.open(loaded.train.images["a/b c"].path) as image:
        assert image.format == "PNG" and image.size == (6, 5)


def test_writer_reports_missing_source_image(tmp_path):
    character = Character("x", Profile(""), CharacterSplit(images={"a": ImageRef("a", tmp_path / "none.png")}))
    with pytest.raises(DataError, match="none.png"):
        write_character(character, tmp_path / "out")


# ----------------------------------------------------------------------------------------------- malformed


def _remove_image(d: Path) -> None:
    (d / "train/images/ref_00.png").unlink()


def _set_image_file(value: str) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        edit_json(d / TRAIN, lambda data: data["images"][0].__setitem__("file", value))

    return change


def _corrupt_png(d: Path) -> None:
    (d / "train/images/ref_01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)


def _truncate_png(d: Path) -> None:
    path = d / "train/images/ref_01.png"
    path.write_bytes(path.read_bytes()[:-40])


def _symlink_outside(d: Path) -> None:
    outside = d.parent / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, d / "train/images/evil.png")
    _set_image_file("images/evil.png")(d)


def _edit(change: Callable[[dict], None], file: str = TRAIN) -> Callable[[Path], None]:
    return lambda d: edit_json(d / file, change)


MALFORMED = {
    "missing image": (_remove_image, TRAIN, "images[0].file", "does not exist"),
    "mcq answer letter": (_edit(lambda j: j["knowledge_qa"]["mcq"][0].__setitem__("answer", "B")),
                          TRAIN, "knowledge_qa.mcq[0].answer", "should be an integer, got the string 'B'"),
    "mcq answer out of range": (_edit(lambda j: j["knowledge_qa"]["mcq"][2].__setitem__("answer", 4)),
                                TRAIN, "knowledge_qa.mcq[2].answer", "is 4, but there are 4 options"),
    "missing turns": (_edit(lambda j: j["scenes"][3].pop("turns")), TRAIN, "scenes[3].turns", "is missing"),
    "empty turns": (_edit(lambda j: j["scenes"][2].__setitem__("turns", [])), TRAIN, "scenes[2].turns", "is empty"),
    "bad role": (_edit(lambda j: j["scenes"][1]["turns"][0].__setitem__("role", "assistant")),
                 TRAIN, "scenes[1].turns[0].role", "'assistant'"),
    "unknown image id": (_edit(lambda j: j["scenes"][0]["turns"][1].__setitem__("image_id", "nope")),
                         TRAIN, "scenes[0].turns[1].image_id", "'nope' is not the id of any image"),
    "unknown vqa image": (_edit(lambda j: j["vqa"][0].__setitem__("image_id", "ghost")), TRAIN, "vqa[0].image_id", "ghost"),
    "duplicate image id": (_edit(lambda j: j["images"][1].__setitem__("id", j["images"][0]["id"])),
                           TRAIN, "images[1].id", "already the id of images[0]"),
    "corrupt png": (_corrupt_png, TRAIN, "images[1].file", "not a readable image"),
    "truncated png": (_truncate_png, TRAIN, "images[1].file", "not a readable image"),
    "parent path": (_set_image_file("../../etc/passwd"), TRAIN, "images[0].file", "uses '..'"),
    "absolute path": (_set_image_file("/etc/passwd"), TRAIN, "images[0].file", "absolute path"),
    "symlink outside": (_symlink_outside, TRAIN, "images[0].file", "outside the character directory"),
    "null byte": (_set_image_file("images/a\x00.png"), TRAIN, "images[0].file", "cannot be used as a path"),
    "scenes not a list": (_edit(lambda j: j.__setitem__("scenes", {"a": 1})), TRAIN, "scenes", "should be a list"),
    "turn not an object": (_edit(lambda j: j["scenes"][0]["turns"].__setitem__(0, "hi")),
                           TRAIN, "scenes[0].turns[0]", "should be an object"),
    "option not a string": (_edit(lambda j: j["knowledge_qa"]["mcq"][0]["options"].__setitem__(1, 3)),
                            TRAIN, "knowledge_qa.mcq[0].options[1]", "should be a string"),
    "bad json": (lambda d: (d / TRAIN).write_text('{"images": [\n  1,\n]}'), TRAIN, "(root)", "invalid JSON at line 3"),
    "json not an object": (lambda d: (d / TRAIN).write_text("[]"), TRAIN, "(root)", "should be a JSON object"),
    "not utf-8": (lambda d: (d / TRAIN).write_bytes(b'{"a": "\xff"}'), TRAIN, "(root)", "not UTF-8"),
    "missing train": (lambda d: (d / TRAIN).unlink(), TRAIN, "(file)", "does not exist"),
    "wrong format": (_edit(lambda j: j.__setitem__("format", "mmrole"), "character.json"),
                     "character.json", "format", "'mmrole'"),
    "wrong version": (_edit(lambda j: j.__setitem__("version", 9), "character.json"), "character.json", "version", "is 9"),
    "missing profile text": (_edit(lambda j: j["profile"].pop("text"), "character.json"),
                             "character.json", "profile.text", "is missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_character_names_file_and_field(char_dir, case):
    change, file, field, what = MALFORMED[case]
    change(char_dir)
    with pytest.raises(DataError) as info:
        read_character(char_dir)
    message = str(info.value)
    line = next((ln for ln in message.splitlines() if f"{file}: {field}: " in ln), None)
    assert line is not None, message
    assert what in line and "(" in line  # says what is wrong, then how to fix it
    errors = [p for p in validate_native(char_dir) if p.severity == "error"]
    assert any(p.file == file and p.field == field for p in errors)


def test_every_problem_is_reported_at_once(char_dir):
    _remove_image(char_dir)
    _corrupt_png(char_dir)

    def change(data: dict) -> None:
        data["knowledge_qa"]["mcq"][0]["answer"] = "B"
        del data["scenes"][3]["turns"]
        data["images"][2]["file"] = "/etc/passwd"

    edit_json(char_dir / TRAIN, change)
    edit_json(char_dir / "test/data.json", lambda data: data["vqa"][0].__setitem__("image_id", "ghost"))
    with pytest.raises(DataError) as info:
        read_character(char_dir)
    message = str(info.value)
    for expected in ("train/data.json: images[0].file", "train/data.json: images[1].file",
                     "train/data.json: images[2].file", "train/data.json: scenes[3].turns",
                     "train/data.json: knowledge_qa.mcq[0].answer", "test/data.json: vqa[0].image_id"):
        assert expected in message
    assert "6 error(s)" in message


def test_warnings_do_not_block_reading(char_dir):
    edit_json(char_dir / TRAIN, lambda data: data.update(scene=[], extra=1))
    Image.new("RGB", (4, 4)).save(char_dir / "train/images/stray.png")
    (char_dir / "test/data.json").unlink()
    character = read_character(char_dir)
    warnings = "\n".join(character.warnings)
    assert "train/data.json: scene: unknown key, ignored (did you mean 'scenes'?)" in warnings
    assert "train/images/stray.png" in warnings and "test/data.json" in warnings
    assert character.test.scenes == []
    problems = validate_native(char_dir)
    assert problems and all(p.severity == "warning" for p in problems)


def test_symlink_inside_the_directory_is_allowed(char_dir):
    os.symlink(char_dir / "train/images/ref_00.png", char_dir / "train/images/alias.png")
    _set_image_file("images/alias.png")(char_dir)
    character = read_character(char_dir)
    assert character.train.images["ref_00"].path == (char_dir / "train/images/ref_00.png").resolve()


# ----------------------------------------------------------------------------------------------- dispatch


def test_load_character_detects_native(sandbox_dir):
    assert load_character(sandbox_dir).name == read_character(sandbox_dir).name
    assert validate_character_dir(sandbox_dir, format="native") == []


def test_load_character_picks_a_named_subdirectory(sandbox_dir):
    character = load_character(sandbox_dir.parent, format="native", character=sandbox_dir.name)
    assert character.root == sandbox_dir.resolve()


def test_load_character_explains_unsupported_input(tmp_path, sandbox_dir):
    with pytest.raises(DataError, match="not a character directory.*native"):
        load_character(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        load_character(tmp_path / "missing")
    with pytest.raises(DataError, match="'parquet' is not supported.*native"):
        load_character(sandbox_dir, format="parquet")


def test_load_character_raises_with_every_error(char_dir):
    _remove_image(char_dir)
    with pytest.raises(DataError, match=r"train/data.json: images\[0\].file"):
        load_character(char_dir)


# ----------------------------------------------------------------------------------------------- fuzz

_KEYS = ("images", "scenes", "knowledge_qa", "vqa", "t2i", "judge_questions", "id", "file", "caption", "attributes",
         "turns", "role", "text", "image_id", "thinking", "generation_instruction", "open", "mcq", "question",
         "answer", "options", "difficulty", "instruction", "memorization")
_STRINGS = ("user", "character", "ref_00", "ref_01", "images/ref_00.png", "images", "../x.png", "/etc/passwd", "",
            "images/ref_01.png", "\x00", ".")
_leaves = (st.none() | st.booleans() | st.integers(-5, 5) | st.integers() | st.floats()
           | st.sampled_from(_STRINGS) | st.text(max_size=6))
_structured = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=6),
    max_leaves=40,
)
_documents = st.dictionaries(st.sampled_from(_KEYS[:6]), _structured, max_size=6) | _structured


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_documents)
def test_fuzzed_data_json_gives_data_error_or_a_character(char_dir, document):
    (char_dir / TRAIN).write_text(json.dumps(document))
    try:
        character = read_character(char_dir)
    except DataError as err:
        assert str(err)
    else:
        assert isinstance(character, Character)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzzed_bytes_give_data_error(char_dir, raw):
    (char_dir / TRAIN).write_bytes(raw)
    try:
        character = read_character(char_dir)
    except DataError as err:  # anything else (a traceback) fails the test
        message = str(err)
        assert message.startswith(str(char_dir / TRAIN)) and "\n" not in message, message
    else:  # only bytes that are a JSON object may read as a character (its missing lists are empty)
        assert isinstance(json.loads(raw.decode("utf-8")), dict), raw
        assert isinstance(character, Character)
