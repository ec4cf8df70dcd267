"""The MMRole-Data reader on hand-made fixtures (tests/fixtures/mmrole, invented characters in the format of
YanqiDai/MMRole): profiles, comment / human-role / inter-role dialogues, test sets, problems, fuzzing."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmrp.data import load_character, read_character, validate_native, write_character
from cmrp.data.mmrole import inspect_mmrole
from cmrp.data.validate import detect_format, errors_of
from cmrp.errors import DataError
from tests.unit.json_fuzz import mutate_json_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmrole"


@pytest.fixture
def copy(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "mmrole"))


def test_detected_and_roles_listed():
    assert detect_format(FIXTURE) == "mmrole"
    with pytest.raises(DataError, match=r"2 roles \(Captain Ada, Professor Quill\).*data.character"):
        load_character(FIXTURE)
    with pytest.raises(DataError, match="no record answers as 'Captain Adda'.*did you mean 'Captain Ada'"):
        load_character(FIXTURE, character="Captain Adda")


def test_captain_ada_maps_to_train_and_test_scenes():
    c, problems = inspect_mmrole(FIXTURE, "captain_ada")  # underscores and case do not matter
    assert problems == [] and c.name == "Captain Ada" and c.source_format == "mmrole"
    assert c.profile.fields["profile_file"] == "profiles/in-distribution/detailed_profiles/Captain Ada.txt"
    assert "Steady as the tide" in c.profile.text  # the detailed profile wins over profiles.json
    # 3 train records of Ada; the first turn of the two-record human-role dialogue is folded into the second
    assert [s.id.rsplit("/", 1)[1] for s in c.train.scenes] == [
        "Captain_Ada_comment_Coast_0_1", "Captain_Ada_human-role-dialogue_COCO_1_2",
        "Professor_Quill_role-role-dialogue_Coast_0_1"]
    comment, multi, inter = c.train.scenes
    assert [t.role for t in comment.turns] == ["user", "character"]
    assert comment.turns[0].text == "What comes to mind when you see this picture?"
    assert comment.turns[0].image_id == "Invented_Coast/harbor.png"  # the user shares the image
    assert [t.role for t in multi.turns] == ["user", "character", "user", "character"]
    assert multi.turns[1].text == "Only with a full thermos and an apprentice who listens."
    assert [t.role for t in inter.turns] == ["user", "character"]  # the other character's two lines merge
    assert inter.turns[0].text.startswith("The breakwater") and inter.turns[0].text.endswith("photograph?")
    assert set(c.train.images) == {"Invented_Coast/harbor.png", "COCO/train2017/000000000001.png"}
    # test split: one record from each of the three test files, reference answers kept
    assert sorted(s.id.split("/")[1] for s in c.test.scenes) == [
        "in-distribution", "in-distribution", "out-of-distribution"]
    assert [len(s.turns) for s in c.test.scenes] == [2, 4, 2]
    assert c.test.scenes[1].turns[-1].text.startswith("An apprentice who mistook the hull")
    assert set(c.test.images) == {"Invented_Coast/harbor.png", "COCO/train2017/000000000002.png"}


def test_other_role_uses_profiles_json():
    c = load_character(FIXTURE, character="Professor Quill")
    assert c.profile.fields["profile_file"] == "profiles/in-distribution/profiles.json"
    assert c.profile.text.startswith("### Introduction") and len(c.train.scenes) == 1 and len(c.test.scenes) == 1


def test_converts_to_a_clean_native_character(tmp_path):
    out = write_character(load_character(FIXTURE, character="Captain Ada"), tmp_path / "ada")
    assert errors_of(validate_native(out)) == []
    assert len(read_character(out).test.scenes) == 3


def test_missing_images_and_profiles_are_warnings(copy):
    (copy / "images" / "COCO" / "train2017" / "000000000001.png").unlink()
    (copy / "profiles" / "in-distribution" / "detailed_profiles" / "Captain Ada.txt").unlink()
    data = json.loads((copy / "profiles/in-distribution/profiles.json").read_text())
    del data["Captain Ada"]
    (copy / "profiles/in-distribution/profiles.json").write_text(json.dumps(data))
    c, problems = inspect_mmrole(copy, "Captain Ada")
    assert c is not None and errors_of(problems) == []
    text = "\n".join(map(str, problems))
    assert ("data/train/train_mini.json: [1].image: 2 record image(s) cannot be used "
            "(images/COCO/train2017/000000000001.png does not exist)") in text
    assert "profiles/: (file): has no profile of 'Captain Ada'; the description inside its records is used" in text
    assert c.profile.text.startswith("### Brief Introduction") and len(c.train.scenes) == 3  # nothing dropped
    assert all(t.image_id is None for t in c.train.scenes[1].turns)


def test_malformed_records_are_errors_with_file_and_field(copy):
    path = copy / "data/test/in-distribution/comment_test.json"
    records = json.loads(path.read_text())
    records[0]["conversations"][1]["value"] = 7
    records[0]["image"] = "../../etc/passwd"
    path.write_text(json.dumps(records))
    (copy / "data/test/in-distribution/human-role_test.json").write_text('{"id": 1}')
    with pytest.raises(DataError) as err:
        load_character(copy, character="Captain Ada")
    message = str(err.value)
    assert "data/test/in-distribution/comment_test.json: [0].conversations[1].value: should be a string" in message
    assert "data/test/in-distribution/comment_test.json: [0].image: '../../etc/passwd' leaves images/" in message
    assert "data/test/in-distribution/human-role_test.json: (root): should be a list of dialogue records" in message


FILES = ("data/train/train_mini.json", "data/test/in-distribution/comment_test.json",
         "data/test/in-distribution/human-role_test.json", "data/test/out-of-distribution/inter-role_test.json",
         "profiles/in-distribution/profiles.json")
values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=12)
    | st.sampled_from(["Captain Ada", "user", "assistant", "[human]: hi", "../x.png", "COCO/train2017/000000000001.png"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "from", "value", "image", "conversations", "id", "profile", "name"]), inner,
        max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_never_raises_anything_but_a_data_problem(data):
    file = data.draw(st.sampled_from(FILES))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(FIXTURE, Path(tmp) / "m"))
        path = root / file
        mutate_json_file(data, path, values)
        try:
            character, problems = inspect_mmrole(root, "Captain Ada")
        except DataError as err:
            assert str(err)
            return
        for p in problems:
            assert p.file and p.field and p.message
        assert (character is None) == bool(errors_of(problems))


def test_images_users_share_are_understood_in_training_examples():
    from cmrp.data.tasks import build_examples

    character = load_character(FIXTURE, character="Captain Ada")
    chat = build_examples(character, ["chat"])["chat"]
    shared = [seg for ex in chat for seg in ex.segments if seg.kind == "image"]
    assert shared and all(not seg.generate and not seg.train for seg in shared)
