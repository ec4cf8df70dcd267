"""The MMRole-Data reader on a small extract of the real release (tests/fixtures/mmrole, see its README):
speaker forms, comment / human-role / inter-role dialogues, in- and out-of-distribution, detailed and short
profiles, test records as one item each, held-out dialogues, missing images, problems, fuzzing."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmrp.cli import main
from cmrp.data import load_character, read_character, validate_native, write_character
from cmrp.data.mmrole import inspect_mmrole, list_roles, parse_prompt
from cmrp.data.validate import detect_format, errors_of
from cmrp.errors import DataError
from tests.unit.json_fuzz import mutate_json_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmrole"
IN = "dialogues/in-distribution"


@pytest.fixture
def copy(tmp_path) -> Path:
    root = Path(shutil.copytree(FIXTURE, tmp_path / "mmrole"))
    shutil.rmtree(root / "eval")
    return root


def _record(path: Path, record_id: str) -> dict:
    return next(r for r in json.loads(path.read_text()) if r["id"] == record_id)


def test_detected_and_roles_listed():
    assert detect_format(FIXTURE) == "mmrole"
    roles = list_roles(FIXTURE)
    assert len(roles) == 85 and {"Iron Man", "Loki", "Howard Wolowitz", "孙悟空"} <= set(roles)  # roles.json: 72 + 13
    with pytest.raises(DataError, match=r"MMRole-Data with 85 roles .*data.character"):
        load_character(FIXTURE)
    with pytest.raises(DataError, match="no record answers as 'Iron Mann'.*did you mean 'Iron Man'"):
        load_character(FIXTURE, character="Iron Mann")


def test_iron_man_speaker_mapping_and_counts():
    c, problems = inspect_mmrole(FIXTURE, "iron_man")  # underscores and case do not matter
    assert c is not None and errors_of(problems) == [] and c.name == "Iron Man"
    ids = [s.id.rsplit("/", 1)[1] for s in c.train.scenes]
    assert ids == ["Iron_Man_comment_COCO_0", "Iron_Man_comment_script_29", "Iron_Man_comment_script_10",
                   "Iron_Man_human-role-dialogue_COCO_12", "Iron_Man_human-role-dialogue_script_28",
                   "Iron_Man_role-role-dialogue_COCO_5", "Loki_role-role-dialogue_COCO_29"]
    scenes = {i: s for i, s in zip(ids, c.train.scenes, strict=True)}
    roles = {i: "".join(t.role[0] for t in s.turns) for i, s in scenes.items()}
    assert roles == {"Iron_Man_comment_COCO_0": "uc", "Iron_Man_comment_script_29": "uc",
                     "Iron_Man_comment_script_10": "uc", "Iron_Man_human-role-dialogue_COCO_12": "uc" * 4,
                     "Iron_Man_human-role-dialogue_script_28": "uc" * 7,
                     "Iron_Man_role-role-dialogue_COCO_5": "uc" * 3 + "u",  # Captain America opens and closes
                     "Loki_role-role-dialogue_COCO_29": "cu" * 6}  # Iron Man opens in Loki's file
    # every turn keeps its words: {"from": "human"} questions, {"role": "<name>"} replies, the other character
    raw = _record(FIXTURE / IN / "comment/Iron_Man_COCO.json", "Iron_Man_comment_COCO_0")["conversations"]
    assert raw[0].keys() == {"from", "value"} and raw[1]["role"] == "Iron Man"
    assert [t.text for t in scenes["Iron_Man_comment_COCO_0"].turns] == [raw[0]["value"], raw[1]["value"]]
    raw = _record(FIXTURE / IN / "inter-role/Loki_COCO.json", "Loki_role-role-dialogue_COCO_29")["conversations"]
    assert [t.text for t in scenes["Loki_role-role-dialogue_COCO_29"].turns] == [t["value"] for t in raw]
    # the user shares the dialogue's image (a script image, with its auxiliary information as caption)
    shared = scenes["Iron_Man_comment_script_29"].turns[0]
    assert shared.image_id == "The_Avengers/30.jpg" and c.train.images[shared.image_id].caption.startswith(
        "Character information: From left to right are Loki and Thanos.; Place information: Aboard the Asgardian")
    assert scenes["Iron_Man_human-role-dialogue_script_28"].turns[0].image_id == "The_Avengers/29.jpg"
    assert set(c.train.images) == {"The_Avengers/29.jpg", "The_Avengers/30.jpg"}
    # test split: one scene per test record of Iron Man, the history as context, the reference to score
    assert [(s.id.rsplit("/", 1)[1], s.context_turns, len(s.turns)) for s in c.test.scenes] == [
        ("Iron_Man_comment_COCO_30_1", 1, 2), ("Iron_Man_human-role-dialogue_COCO_30_7", 7, 8)]
    record = _record(FIXTURE / "data/test/in-distribution/human-role_test.json", "Iron_Man_human-role-dialogue_COCO_30_7")
    assert c.test.scenes[1].turns[-1].text == record["conversations"][1]["value"]
    assert c.test.scenes[1].turns[-2].text.startswith("That'd be insane. You think our friend here")
    assert c.sources[f"{IN}/comment/Iron_Man_COCO.json"] == {
        "records": 3, "scenes": 1, "held_out": 1, "empty": 0, "no_reply": 1, "images_missing": 1}
    assert c.sources[f"{IN}/inter-role/Iron_Man_COCO.json"] == {
        "records": 3, "scenes": 1, "held_out": 1, "empty": 1, "no_reply": 0, "images_missing": 1}
    assert c.sources["data/test/in-distribution/human-role_test.json"] == {
        "records": 2, "scenes": 1, "held_out": 0, "images_missing": 1}
    text = "\n".join(map(str, problems))
    assert "3 dialogue(s) of Iron Man are held out of training: MMRole's test records come from them" in text
    assert "images/: (train): 5 dialogue image(s) cannot be used: 4 from MS-COCO train2017" in text
    assert "1 other(s), e.g. images/The_Avengers/11.jpg does not exist" in text
    assert "Iron Man's records here: 1 with the opening words only, no reply; skipped" in text


def test_detailed_profile_preferred_short_kept():
    c = load_character(FIXTURE, character="Iron Man")
    detailed = json.loads((FIXTURE / "profiles/in-distribution/detailed_profiles/Iron_Man.json").read_text())
    short = json.loads((FIXTURE / "profiles/in-distribution/profiles.json").read_text())["Iron Man"]
    fields = c.profile.fields
    assert fields["profile_used"] == "detailed" and fields["detailed_profile"] == detailed
    assert fields["profile_file"] == "profiles/in-distribution/detailed_profiles/Iron_Man.json"
    assert fields["short_profile"] == short and len(short) == 2330 and len(c.profile.text) == 10884
    assert c.profile.text.startswith("### Introduction\n" + detailed["introduction"])
    assert f"### Catchphrases\n{detailed['catchphrase']}" in c.profile.text
    assert (fields["script"], fields["distribution"]) == ("The Avengers", "in-distribution")
    loki = load_character(FIXTURE, character="Loki")  # no detailed profile here: the short one is used
    assert loki.profile.fields["profile_used"] == "short" and loki.profile.text.startswith("### Introduction\nLoki")
    assert loki.sources["profiles/in-distribution/profiles.json"] == {"profile": "used (2379 characters)"}


def test_inter_role_other_character_is_the_user():
    """Loki answers Iron Man: in Iron Man's file (held out: its test record) and in Loki's own file."""
    c = load_character(FIXTURE, character="Loki")
    assert [(s.id.rsplit("/", 1)[1], "".join(t.role[0] for t in s.turns)) for s in c.train.scenes] == [
        ("Loki_role-role-dialogue_COCO_29", "uc" * 6), ("Loki_role-role-dialogue_COCO_17", "uc" * 4)]
    assert c.sources[f"{IN}/inter-role/Iron_Man_COCO.json"]["held_out"] == 1
    (test,) = c.test.scenes  # Loki opened, Iron Man answered; Loki's reply is the item
    assert ("".join(t.role[0] for t in test.turns), test.context_turns) == ("cuc", 2)
    assert test.turns[0].text.startswith("What do we have here, Stark?")


def test_out_of_distribution_character_has_nothing_to_train_on(capsys):
    c, problems = inspect_mmrole(FIXTURE, "Howard Wolowitz")
    assert c is None
    (error,) = errors_of(problems)
    assert error.message.startswith("no training dialogue of Howard Wolowitz: all 6 of its dialogue(s) are held out "
                                    "because MMRole's test records come from them (an out-of-distribution character")
    assert main(["data", "validate", str(FIXTURE), "--character", "Howard Wolowitz"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"FAILED: {FIXTURE}: 1 error(s), 2 warning(s)"


def test_a_folder_of_test_files_only_says_so(capsys):
    for folder in (FIXTURE / "data" / "test", FIXTURE / "data" / "test" / "in-distribution"):
        assert detect_format(folder) == "mmrole"
        assert main(["data", "validate", str(folder)]) == 1
        out = capsys.readouterr().out
        assert "holds only MMRole test files (" in out and "there is nothing to train on" in out
    assert "in-distribution/comment_test.json: 3 records; in-distribution/human-role_test.json: 2 records" in \
        inspect_mmrole(FIXTURE / "data" / "test")[1][0].message
    with pytest.raises(DataError, match="holds only MMRole test files"):  # what `cmrp fit` loads the data with
        load_character(FIXTURE / "data" / "test", format="mmrole", character="Iron Man")


def test_validate_prints_per_file_counts(capsys):
    assert main(["data", "validate", str(FIXTURE), "--character", "Iron Man"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("OK: Iron Man: 2 images, 7 scenes, 0 knowledge QA, 0 VQA, 0 T2I; test: 0 images, 2 scenes, "
                       "0 knowledge QA, 0 VQA, 0 T2I; 7 warning(s)")
    assert "  profiles/in-distribution/detailed_profiles/Iron_Man.json: profile used (10884 characters)" in out
    assert "  profiles/in-distribution/profiles.json: profile kept (2330 characters)" in out
    assert f"  {IN}/human-role/Iron_Man_COCO.json: records 3, scenes 1, held out 1, empty 1, images missing 1" in out


def test_without_test_files_nothing_is_held_out(copy):
    shutil.rmtree(copy / "data")
    c, problems = inspect_mmrole(copy, "Iron Man")
    assert len(c.train.scenes) == 10 and c.test.scenes == []  # the 3 held-out dialogues are back
    assert any("data/test/: (folder): is missing: no dialogue is held out" in str(p) for p in problems)


def test_formatted_records_in_data_train(copy):
    """Without dialogues/, data/train/ records (MMRole's formatted form, as in the test files) are read."""
    shutil.rmtree(copy / "dialogues")
    (copy / "data" / "train").mkdir()
    shutil.move(copy / "data/test/in-distribution/human-role_test.json", copy / "data/train/train.json")
    c = load_character(copy, character="Iron Man")
    (scene,) = c.train.scenes
    assert "".join(t.role[0] for t in scene.turns) == "uc" * 4 and scene.context_turns == 0
    assert [s.id.rsplit("/", 1)[1] for s in c.test.scenes] == ["Iron_Man_comment_COCO_30_1"]


def test_prompt_parts():
    record = _record(FIXTURE / "data/test/in-distribution/inter-role_test.json", "Black_Panther_role-role-dialogue_COCO_22_0")
    prompt = parse_prompt(record["conversations"][0]["value"])  # Vision is asked to open the conversation
    assert prompt.words is None and prompt.history == [] and set(prompt.descriptions) == {"Vision", "Black Panther"}
    record = _record(FIXTURE / "data/test/in-distribution/comment_test.json", "Thor_comment_script_10_1")
    prompt = parse_prompt(record["conversations"][0]["value"])
    assert prompt.words == "What does this picture prompt you to think about?"
    assert prompt.auxiliary.startswith("- Character information: Iron Man\n - Place information: Destroyed Avengers")
    assert not parse_prompt("just words").parsed


def test_missing_profiles_fall_back_to_the_records(copy):
    (copy / "profiles/in-distribution/detailed_profiles/Iron_Man.json").unlink()
    data = json.loads((copy / "profiles/in-distribution/profiles.json").read_text())
    del data["Iron Man"]
    (copy / "profiles/in-distribution/profiles.json").write_text(json.dumps(data))
    c, problems = inspect_mmrole(copy, "Iron Man")
    assert c.profile.fields["profile_used"] == "record" and c.profile.text.startswith("### Brief Introduction")
    assert any("has no profile of 'Iron Man'; the description quoted in its test records is used" in str(p)
               for p in problems)


def test_converts_to_a_clean_native_character(tmp_path):
    out = write_character(load_character(FIXTURE, character="Iron Man"), tmp_path / "ironman")
    assert errors_of(validate_native(out)) == []
    back = read_character(out)
    assert [s.context_turns for s in back.test.scenes] == [1, 7] and len(back.train.scenes) == 7


def test_malformed_records_are_errors_with_file_and_field(copy):
    path = copy / IN / "comment/Iron_Man_COCO.json"
    records = json.loads(path.read_text())
    records[0]["conversations"][1]["value"] = 7
    records[0]["image"] = "../../etc/passwd"
    records[1]["conversations"][0] = {"value": "who?"}
    path.write_text(json.dumps(records))
    (copy / "data/test/in-distribution/human-role_test.json").write_text('{"id": 1}')
    with pytest.raises(DataError) as err:
        load_character(copy, character="Iron Man")
    message = str(err.value)
    assert f"{IN}/comment/Iron_Man_COCO.json: [0].conversations[1].value: should be the words said, got the number 7" \
        in message
    assert f"{IN}/comment/Iron_Man_COCO.json: [1].conversations[0].role: should name the speaker, got null" in message
    assert "data/test/in-distribution/human-role_test.json: (root): should be a list of records" in message
    records[0]["conversations"][1]["value"] = "fine"
    path.write_text(json.dumps(records[:1]))
    with pytest.raises(DataError, match=r"\[0\].image: '../../etc/passwd' leaves images/"):
        load_character(copy, character="Iron Man")


FILES = (f"{IN}/comment/Iron_Man_COCO.json", f"{IN}/inter-role/Loki_COCO.json",
         "data/test/in-distribution/human-role_test.json", "profiles/in-distribution/profiles.json",
         "profiles/in-distribution/roles.json", "profiles/in-distribution/detailed_profiles/Iron_Man.json")
values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=12)
    | st.sampled_from(["Iron Man", "human", "user", "assistant", "[human]: hi", "../x.png", "The_Avengers/30.jpg"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "from", "value", "image", "conversations", "id", "introduction", "The Avengers"]),
        inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_never_raises_anything_but_a_data_problem(data):
    file = data.draw(st.sampled_from(FILES))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(FIXTURE, Path(tmp) / "m", ignore=shutil.ignore_patterns("eval")))
        mutate_json_file(data, root / file, values)
        try:
            character, problems = inspect_mmrole(root, "Iron Man")
        except DataError as err:
            assert str(err)
            return
        for p in problems:
            assert p.file and p.field and p.message
        assert (character is None) == bool(errors_of(problems))


def test_images_users_share_are_understood_in_training_examples():
    from cmrp.data.tasks import build_examples

    character = load_character(FIXTURE, character="Iron Man")
    chat = build_examples(character, ["chat"])["chat"]
    assert len(chat) == 1 + 1 + 1 + 4 + 7 + 3 + 6  # one example per reply of Iron Man
    shared = [seg for ex in chat for seg in ex.segments if seg.kind == "image"]
    assert shared and all(not seg.generate and not seg.train for seg in shared)


def test_a_test_record_is_one_evaluation_item():
    """History turns inside a test prompt are context: Iron Man's 2 test records are 2 items, not 5."""
    from cmrp.evaluation.runner import turn_items

    character = load_character(FIXTURE, character="Iron Man")
    text_items, mm_items = turn_items(character, 32)
    assert mm_items == [] and [it.reference for it in text_items] == [s.turns[-1].text for s in character.test.scenes]
    assert len(text_items[1].context) == 1 + 7  # the system prompt, then the 7 turns of history
