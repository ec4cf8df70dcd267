"""The RoleScape-20 reader on the real sample (Bo, Mam): exact counts per file, quirks as warnings, fuzzing.

Expected counts were computed from the JSON files with jq, independently of the reader, e.g.
`jq '[.scenes[][]|.qa_pairs//[]|length]|add' train/Bo/Bo_with_image.json` -> 239.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmrp.data import load_character, read_character, validate_native, write_character
from cmrp.data.rolescape import inspect_rolescape, is_rolescape
from cmrp.data.validate import detect_format, errors_of
from cmrp.errors import DataError
from tests.shared_data import ROLESCAPE_SAMPLE as SAMPLE
from tests.unit.json_fuzz import mutate_json_file

pytestmark = pytest.mark.rolescape  # tests/conftest.py: left out (one line) without the sample, an error in CI

# per character: counts taken from the files themselves (see the module docstring)
EXPECTED = {
    "Bo": dict(train_images=12, test_images=3, with_image_scenes=12, ext_train=192, ext_test=20, test_scenes=3,
               qa_pairs=239, vqa_mcq=60, knowledge_open=100, knowledge_mcq=10, memorization=20, personality=16,
               t2i=12, test_t2i=3, ext_train_refs=141, ext_test_refs=16, numeric_options=0, duplicate_questions=16,
               quoted=16, mcq_keys="BCBCCCBCBC", scene0_qa=19, scene0_mcq0=(2, "Tan or light brown")),
    "Mam": dict(train_images=12, test_images=3, with_image_scenes=12, ext_train=192, ext_test=20, test_scenes=3,
                qa_pairs=238, vqa_mcq=60, knowledge_open=100, knowledge_mcq=10, memorization=20, personality=20,
                t2i=12, test_t2i=3, ext_train_refs=125, ext_test_refs=15, numeric_options=8, duplicate_questions=13,
                quoted=0, mcq_keys="BCACDCBBCC", scene0_qa=19, scene0_mcq0=(1, "Orange tabby with white markings")),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def loaded(request):
    character, problems = inspect_rolescape(SAMPLE, request.param)
    return request.param, character, problems


def test_sample_counts_are_exact(loaded):
    name, c, problems = loaded
    e = EXPECTED[name]
    assert errors_of(problems) == [] and c is not None
    assert c.name == name and c.source_format == "rolescape20"
    assert len(c.train.images) == e["train_images"] and len(c.test.images) == e["test_images"]
    assert sorted(c.train.images, key=int) == [str(i) for i in range(e["train_images"])]
    assert len(c.train.scenes) == e["with_image_scenes"] + e["ext_train"]
    assert len(c.test.scenes) == e["test_scenes"] + e["ext_test"]
    assert len(c.train.vqa) == e["with_image_scenes"]  # one VQA block per annotated image
    assert sum(len(v.open) for v in c.train.vqa) == e["qa_pairs"]
    assert sum(len(v.mcq) for v in c.train.vqa) == e["vqa_mcq"]
    assert len(c.train.knowledge_open) == e["knowledge_open"]  # duplicates are kept
    assert len(c.test.knowledge_mcq) == e["knowledge_mcq"] and c.train.knowledge_mcq == []
    assert {k: len(v) for k, v in c.test.judge_questions.items()} == {
        "memorization": e["memorization"], "personality": e["personality"]}
    assert len(c.train.t2i) == e["t2i"] and len(c.test.t2i) == e["test_t2i"]
    assert all(t.image_id in c.train.images for t in c.train.t2i)
    assert all(t.image_id in c.test.images for t in c.test.t2i)


def test_sample_fields_map_to_the_model(loaded):
    name, c, _ = loaded
    e = EXPECTED[name]
    annotated = c.train.scenes[: e["with_image_scenes"]]
    for scene in annotated:  # user, then the character showing an image with its reasoning
        user, reply = scene.turns
        assert user.role == "user" and reply.role == "character" and reply.image_id in c.train.images
        assert reply.thinking and reply.generation_instruction
    assert [s.turns[1].image_id for s in annotated] == [str(i) for i in range(e["with_image_scenes"])]
    extended = c.train.scenes[e["with_image_scenes"]:]
    assert all(t.image_id is None for s in extended for t in s.turns)  # their ids name no existing image
    assert all(len(s.turns) == 2 and s.turns[0].role == "user" for s in extended)
    assert "".join("ABCD"[m.answer] for m in c.test.knowledge_mcq) == e["mcq_keys"]
    assert all(len(m.options) == 4 and m.difficulty in ("easy", "medium", "hard") for m in c.test.knowledge_mcq)
    first = c.train.vqa[0]
    assert first.image_id == "0" and len(first.open) == e["scene0_qa"]
    assert (first.mcq[0].answer, first.mcq[0].options[first.mcq[0].answer]) == e["scene0_mcq0"]
    assert c.profile.text.startswith("###") and c.profile.fields["simplified_profile"]
    assert c.profile.fields["description"].startswith(name)
    assert all(not q.startswith('"') for q in c.test.judge_questions["personality"])
    assert all(image.path.is_file() and image.path.is_relative_to(SAMPLE.resolve())
               for split in (c.train, c.test) for image in split.images.values())


def test_sample_quirks_are_exactly_these_warnings(loaded):
    name, c, problems = loaded
    e = EXPECTED[name]
    assert all(p.severity == "warning" for p in problems)
    by_file = {(p.file, p.field.split("[")[0].split(".")[0]): p.message for p in problems}
    ext_train = by_file.pop((f"train/{name}/{name}_dialogue_text_extension_train.json", "scenes"))
    assert ext_train.startswith(f"{e['ext_train_refs']} reference(s) to 20 image id(s)") and "kept" in ext_train
    ext_test = by_file.pop((f"train/{name}/{name}_dialogue_text_extension_test.json", "scenes"))
    assert ext_test.startswith(f"{e['ext_test_refs']} reference(s)")
    dup = by_file.pop((f"train/{name}/{name}_knowledge_qa.json", "qa_items"))
    assert dup.startswith(f"{e['duplicate_questions']} of 100 questions repeat") and "all are kept" in dup
    if e["numeric_options"]:
        numeric = by_file.pop((f"train/{name}/{name}_with_image.json", "scenes"))
        assert numeric.startswith(f"{e['numeric_options']} option(s) in this file are numbers")
    if e["quoted"]:
        quoted = by_file.pop((f"train/{name}/{name}_personality_test.json", "test_questions"))
        assert quoted.startswith(f"{e['quoted']} question(s) are wrapped in double quotes")
    assert by_file == {}
    assert len(c.warnings) == len(problems)


def test_root_folder_and_name_forms_agree(tmp_path):
    by_root = load_character(SAMPLE, character="Bo")
    assert detect_format(SAMPLE) == "rolescape20" and is_rolescape(SAMPLE / "train" / "Bo")
    for path, name in ((SAMPLE / "train" / "Bo", None), (SAMPLE / "test" / "Bo", None), (SAMPLE, "bo")):
        other = load_character(path, format="rolescape20", character=name)
        assert other.name == "Bo" and len(other.train.scenes) == len(by_root.train.scenes)
        assert len(other.test.scenes) == len(by_root.test.scenes)
    with pytest.raises(DataError, match=r"2 characters \(Bo, Mam\).*data.character"):
        load_character(SAMPLE)
    with pytest.raises(DataError, match="no character 'Boo'.*did you mean 'Bo'"):
        load_character(SAMPLE, character="Boo")


def test_converts_to_a_clean_native_character(tmp_path):
    character = load_character(SAMPLE, character="Mam")
    out = write_character(character, tmp_path / "mam")
    assert errors_of(validate_native(out)) == []
    again = read_character(out)
    assert len(again.train.scenes) == len(character.train.scenes)
    assert sum(len(v.mcq) for v in again.train.vqa) == 60 and len(again.test.knowledge_mcq) == 10


# ----------------------------------------------------------------------------------------------- quirks


@pytest.fixture
def bo_copy(tmp_path) -> Path:
    """A writable copy of Bo only (train + test), so edits never touch the shared sample."""
    for split in ("train", "test"):
        shutil.copytree(SAMPLE / split / "Bo", tmp_path / "rs" / split / "Bo")
    return tmp_path / "rs"


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_quirks_warn_and_keep_everything(bo_copy):
    train = bo_copy / "train" / "Bo"

    def quirks(d):
        d["scenes"][0][1]["image"] = "99"  # an annotated scene pointing at a missing image
        d["scenes"][1][1]["qa_pairs"] += d["scenes"][1][1]["qa_pairs"][:3]  # a duplicated question list
    edit(train / "Bo_with_image.json", quirks)
    long = "word " * 30
    edit(train / "Bo_knowledge_qa.json", lambda d: d["qa_items"][5].__setitem__("answer", long))
    edit(train / "Bo_memorization_test.json", lambda d: d["test_questions"].append(d["test_questions"][0]))
    c, problems = inspect_rolescape(bo_copy, "Bo")
    assert c is not None and errors_of(problems) == []
    text = "\n".join(map(str, problems))
    assert "Bo_with_image.json: scenes[0][1].image: 1 reference(s) to 1 image id(s)" in text
    assert "scenes[0][1]: 19 open and 5 multiple-choice image question(s) belong to no existing image" in text
    assert "scenes[1][1].qa_pairs: 3 of 23 questions repeat" in text
    assert "Bo_knowledge_qa.json: qa_items[5].answer: 1 open answer(s) are longer than 20 words" in text
    assert "Bo_memorization_test.json: test_questions: 1 of 21 questions repeat" in text
    assert len(c.train.scenes) == 204 and c.train.scenes[0].turns[1].image_id is None  # the turn is kept
    assert len(c.test.judge_questions["memorization"]) == 21 and len(c.train.knowledge_open) == 100
    assert sum(len(v.open) for v in c.train.vqa) == 239 - 19 + 3


def test_malformed_files_are_errors_with_file_and_field(bo_copy):
    train = bo_copy / "train" / "Bo"
    edit(train / "Bo_knowledge_qa_test.json", lambda d: d["mcq_items"][2].__setitem__("answer_key", "E"))
    edit(train / "Bo_t2i_instruction.json", lambda d: d["t2i_instructions"][0].__setitem__("t2i_instruction", 5))
    edit(train / "Bo_with_image.json", lambda d: d["scenes"][3][0].__setitem__("role", "narrator"))
    (train / "Bo_personality_test.json").write_text("{not json")
    (train / "3.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        load_character(bo_copy, character="Bo")
    message = str(err.value)
    assert "train/Bo/Bo_knowledge_qa_test.json: mcq_items[2].answer_key: is 'E', not one of the option letters" in message
    assert "train/Bo/Bo_t2i_instruction.json: t2i_instructions[0].t2i_instruction: should be a string" in message
    assert "train/Bo/Bo_with_image.json: scenes[3][0].role: is 'narrator'" in message
    assert "train/Bo/Bo_personality_test.json: (root): invalid JSON at line 1" in message
    assert "train/Bo/3.png: (file): is not a readable image" in message


def test_missing_optional_files_are_warnings(bo_copy):
    for name in ("Bo_knowledge_qa.json", "Bo_full_profile.txt"):
        (bo_copy / "train" / "Bo" / name).unlink()
    shutil.rmtree(bo_copy / "test")
    c, problems = inspect_rolescape(bo_copy / "train" / "Bo")
    assert c is not None and errors_of(problems) == []
    text = "\n".join(map(str, problems))
    assert "train/Bo/Bo_knowledge_qa.json: (file): does not exist" in text
    assert "test/Bo/: (file): does not exist" in text
    assert "Bo_full_profile.txt: (file): is missing or empty; the profile is taken from the annotation description" in text
    assert c.profile.text.startswith("Bo is a charismatic") and c.test.images == {}
    assert len(c.test.scenes) == 20  # the extension test dialogues still come from train/Bo


def test_symlinked_image_outside_is_refused(bo_copy, tmp_path):
    outside = tmp_path / "secret.png"
    shutil.copy(bo_copy / "train" / "Bo" / "0.png", outside)
    (bo_copy / "train" / "Bo" / "0.png").unlink()
    (bo_copy / "train" / "Bo" / "0.png").symlink_to(outside)
    _, problems = inspect_rolescape(bo_copy, "Bo")
    assert any(p.file == "train/Bo/0.png" and "outside the data set" in p.message for p in errors_of(problems))


# ----------------------------------------------------------------------------------------------- fuzzing

JSON_FILES = ("annotation.json", "Bo_with_image.json", "Bo_t2i_instruction.json", "Bo_knowledge_qa.json",
              "Bo_knowledge_qa_test.json", "Bo_memorization_test.json", "Bo_personality_test.json",
              "Bo_dialogue_text_extension_train.json", "Bo_dialogue_text_extension_test.json")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["0", "3", "99", "A", "machine", "user"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "text", "image", "options", "answer_key", "question", "answer", "scenes",
                         "qa_items", "mcq_items", "test_questions", "t2i_instructions", "image_id", "x"]), inner,
        max_size=3),
    max_leaves=8,
)


def _mini_release(root: Path) -> None:
    """A tiny Bo (2 images, 2 scenes, a few items of each file) cut from the sample."""
    src = SAMPLE / "train" / "Bo"
    dst = root / "train" / "Bo"
    dst.mkdir(parents=True)
    for name in JSON_FILES:
        data = json.loads((src / name).read_text())
        for key in ("scenes", "qa_items", "mcq_items", "test_questions", "t2i_instructions"):
            if key in data:
                data[key] = data[key][:2]
        (dst / name).write_text(json.dumps(data))
    for name in ("0.png", "1.png", "Bo_full_profile.txt"):
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "rs"
    _mini_release(root)
    return root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_never_raises_anything_but_a_data_problem(mini, data):
    file = data.draw(st.sampled_from(JSON_FILES))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(mini, Path(tmp) / "rs"))
        path = root / "train" / "Bo" / file
        mutate_json_file(data, path, json_values)
        try:
            character, problems = inspect_rolescape(root, "Bo")
        except DataError as err:
            assert str(err)
            return
        for p in problems:
            assert p.file and p.field and p.message and p.severity in ("error", "warning")
        assert (character is None) == bool(errors_of(problems))
