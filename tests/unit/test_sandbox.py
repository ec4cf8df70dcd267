"""The sandbox world: deterministic per seed, the promised counts, and answers that match the ground truth."""

from __future__ import annotations

import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cmrp.data import Character, read_character
from cmrp.sandbox import (
    ATTRIBUTE_VALUES,
    IDENTITY_ATTRIBUTES,
    build_character,
    describe,
    make_character,
    make_persona,
    render,
    write_sandbox_character,
)
from cmrp.sandbox.persona import FACT_VALUES, QUIRKS, apply_quirk
from cmrp.sandbox.renderer import COLORS
from cmrp.sandbox.templates import (
    EXPRESSION_WORDS,
    VQA_QUESTIONS,
    attribute_phrase,
    image_sentence,
    read_description,
    read_reply,
)

BASE = {"body_shape": "circle", "body_color": "red", "eyes": "dot", "accessory": "none", "accessory_color": "blue",
        "expression": "happy", "pose": "center", "scene": "room"}


@pytest.fixture(scope="module")
def character(tmp_path_factory) -> Character:
    return make_character(0, out_dir=tmp_path_factory.mktemp("sandbox") / "c0")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _character_turns(character: Character, split: str = "train"):
    data = getattr(character, split)
    return [t for s in data.scenes for t in s.turns if t.role == "character"]


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    first = _files(write_sandbox_character(3, tmp_path / "a"))
    second = _files(write_sandbox_character(3, tmp_path / "b"))
    assert first == second
    assert sum(name.endswith(".png") for name in first) == 14
    other = _files(write_sandbox_character(4, tmp_path / "c"))
    assert other["character.json"] != first["character.json"]
    assert other["train/data.json"] != first["train/data.json"]


def test_counts_change_content_not_persona(tmp_path):
    small = build_character(3, tmp_path, n_reference_images=4, n_scenes=12)
    full = build_character(3, tmp_path)
    assert small.name == full.name and small.profile == full.profile
    assert (len(small.train.images), len(small.train.scenes)) == (4, 12)


# ----------------------------------------------------------------------------------------------- content


def test_counts(character):
    assert len(character.train.images) == 10 and len(character.test.images) == 4
    assert len(character.train.scenes) >= 150 and len(character.test.scenes) >= 8
    assert len(character.train.vqa) == 10 and len(character.test.vqa) == 4
    assert len(character.train.knowledge_mcq) >= 20 and len(character.test.knowledge_mcq) >= 20
    assert len(character.train.t2i) > 10 and len(character.test.t2i) > 4
    assert character.test.judge_questions["memorization"] and character.test.judge_questions["personality"]
    fields = character.profile.fields
    assert len(fields["facts"]) >= 8 and len(fields["traits"]) == 3 and len(fields["catchphrases"]) == 2
    assert set(fields["identity"]) == set(IDENTITY_ATTRIBUTES)
    assert character.name in character.profile.text and len(character.profile.text.split("\n\n")) >= 3


def test_images_share_identity_and_vary_the_rest(character):
    images = [*character.train.images.values(), *character.test.images.values()]
    identity = character.profile.fields["identity"]
    assert all({k: im.attributes[k] for k in IDENTITY_ATTRIBUTES} == identity for im in images)
    combos = [(im.attributes["expression"], im.attributes["pose"], im.attributes["scene"]) for im in images]
    assert len(set(combos)) == len(combos)
    train = list(character.train.images.values())
    assert {im.attributes["expression"] for im in train} == set(ATTRIBUTE_VALUES["expression"])
    assert {im.attributes["scene"] for im in train} == set(ATTRIBUTE_VALUES["scene"])
    train_pairs = {(im.attributes["expression"], im.attributes["scene"]) for im in train}
    assert all((im.attributes["expression"], im.attributes["scene"]) not in train_pairs
               for im in character.test.images.values())
    for im in images:
        assert im.caption == describe(im.attributes)
    # T2I instructions name the character; their captions (rewards, metrics) describe what to draw
    for split in (character.train, character.test):
        for item in split.t2i:
            assert item.instruction.startswith(f"{character.name}, ")
            assert read_description(item.caption)["body_color"] == identity["body_color"]
            assert read_description(item.instruction).keys() == {"expression", "scene", "pose"}
            if item.image_id:
                assert item.caption == split.images[item.image_id].caption
        with open(im.path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_scenes_alternate_and_replies_stay_short(character):
    for split in ("train", "test"):
        for scene in getattr(character, split).scenes:
            assert 2 <= len(scene.turns) <= 6
            assert [t.role for t in scene.turns] == ["user", "character"] * (len(scene.turns) // 2)
        lengths = [len(t.text.split()) for t in _character_turns(character, split)]
        assert min(lengths) >= 6 and max(lengths) <= 32


def test_image_turns_match_what_the_reply_says(character):
    for split in ("train", "test"):
        data = getattr(character, split)
        turns = _character_turns(character, split)
        shown = [t for t in turns if t.image_id]
        if split == "train":
            assert 0.3 <= len(shown) / len(turns) <= 0.5
        for turn in shown:
            attrs = data.images[turn.image_id].attributes
            # the instruction names the character (its look must be learned); the scene is spelled out
            assert turn.generation_instruction == describe(attrs, name=character.name)
            assert character.profile.fields["identity"]["body_color"] not in turn.generation_instruction
            assert EXPRESSION_WORDS[attrs["expression"]] in turn.text
            assert attribute_phrase("scene", attrs["scene"]) in turn.text
            assert attrs["expression"] in turn.thinking and attribute_phrase("pose", attrs["pose"]) in turn.thinking
            # the reply states scene, pose and expression (sometimes the accessory), all true of the picture
            stated = read_reply(turn.text)
            assert {"scene", "pose", "expression"} <= stated.keys()
            assert all(attrs[k] == v for k, v in stated.items()), (turn.text, attrs)
        assert all(t.thinking is None and t.generation_instruction is None for t in turns if not t.image_id)


def test_some_pictures_are_determined_by_the_reply_alone(character):
    """"Now" turns: the query names no picture attribute; only the reply says what the image shows."""
    for split in ("train", "test"):
        data = getattr(character, split)
        now = [(user, reply) for scene in data.scenes for user, reply in zip(scene.turns[::2], scene.turns[1::2],
                                                                               strict=True)
               if reply.image_id and reply.text.startswith(("Right now", "R-Right now"))]
        assert len(now) >= 3, split
        for user, reply in now:
            assert read_reply(user.text) == {} and read_description(user.text) == {}
            attrs = data.images[reply.image_id].attributes
            assert {k: attrs[k] for k in ("scene", "pose", "expression")}.items() <= read_reply(reply.text).items()
        said = [read_reply(reply.text) for _, reply in now]
        assert len({(a["scene"], a["pose"], a["expression"]) for a in said}) >= 2  # not one fixed picture
    named = [read_reply(t.text) for t in _character_turns(character) if t.image_id]
    assert any("accessory" in a for a in named) == (character.profile.fields["identity"]["accessory"] != "none")


def test_read_reply_reads_image_sentences_and_leaves_out_contradictions():
    attrs = {**BASE, "accessory": "hat", "accessory_color": "blue", "pose": "left", "scene": "night",
             "expression": "surprised"}
    text = f"Hmph, fine. Right now I'm {image_sentence(attrs, accessory=True)}. Boop!"
    assert read_reply(text) == {"scene": "night", "pose": "left", "expression": "surprised", "accessory": "hat",
                                "accessory_color": "blue"}
    assert read_reply(image_sentence(BASE, accessory=True)) == {"scene": "room", "pose": "center", "expression": "happy"}
    assert read_reply("I'm on the beach, smiling, no wait, fuming.") == {"scene": "beach"}  # two expressions
    assert read_reply("I grew up in Pebble Bay, the best place ever.") == {}
    assert read_reply("MOKI IS ON THE LEFT, WIDE-EYED") == {"pose": "left", "expression": "surprised"}


def test_vqa_answers_match_render_attributes(character):
    by_question = {mcq_q: key for key, (_open_q, mcq_q) in VQA_QUESTIONS.items()}
    by_open = {open_q: key for key, (open_q, _mcq_q) in VQA_QUESTIONS.items()}
    n = 0
    for split in (character.train, character.test):
        for item in split.vqa:
            attrs = split.images[item.image_id].attributes
            for mcq in item.mcq:
                key = by_question[mcq.question]
                assert mcq.options[mcq.answer] == attribute_phrase(key, attrs[key])
                assert len(set(mcq.options)) == len(mcq.options) == min(4, len(ATTRIBUTE_VALUES[key]))
                n += 1
            for qa in item.open:
                key = by_open[qa.question]
                assert qa.answer == attribute_phrase(key, attrs[key])
    assert n >= 14 * 6


def test_knowledge_answers_and_held_out_paraphrases(character):
    facts = character.profile.fields["facts"]
    for mcq in character.train.knowledge_mcq:
        assert len(set(mcq.options)) == 4 and mcq.difficulty in ("easy", "medium", "hard")
    fact_mcqs = [m for m in character.train.knowledge_mcq if m.difficulty != "hard" and any(
        m.options[m.answer] == value and all(o in FACT_VALUES[key] for o in m.options) for key, value in facts.items())]
    assert len(fact_mcqs) >= 2 * len(FACT_VALUES)
    train_questions = {m.question for m in character.train.knowledge_mcq}
    assert len(character.test.knowledge_mcq) == len(character.train.knowledge_mcq)
    for train, test in zip(character.train.knowledge_mcq, character.test.knowledge_mcq, strict=True):
        assert test.question not in train_questions
        assert sorted(test.options) == sorted(train.options) and test.answer != train.answer
        assert test.options[test.answer] == train.options[train.answer]
    hard = [m for m in character.train.knowledge_mcq if "NOT true" in m.question]
    for mcq in hard:  # exactly the marked statement contradicts the profile
        true = [o for i, o in enumerate(mcq.options) if i != mcq.answer]
        assert all(any(v in o for v in facts.values()) for o in true)


def test_mcq_answer_positions_are_uniform(tmp_path):
    positions = Counter()
    for seed in range(12):
        built = build_character(seed, tmp_path, n_reference_images=4, n_scenes=1)
        positions.update(m.answer for m in built.train.knowledge_mcq)
        positions.update(m.answer for item in built.train.vqa for m in item.mcq if len(m.options) == 4)
    total = sum(positions.values())
    assert set(positions) == {0, 1, 2, 3}
    assert all(0.18 < positions[i] / total < 0.32 for i in range(4))


def test_held_out_dialogue_uses_new_questions(character):
    train_users = {t.text for s in character.train.scenes for t in s.turns if t.role == "user"}
    test_users = {t.text for s in character.test.scenes for t in s.turns if t.role == "user"}
    assert test_users and not test_users & train_users
    for turn in _character_turns(character, "test"):
        assert turn.image_id is None or turn.image_id in character.test.images


def _sentence_ends(text: str) -> set[str]:
    """The word before each sentence-ending punctuation."""
    return set(re.findall(r"(\S+?)[.!?]+(?=\s|$)", text))


def test_style_quirk_and_catchphrases(tmp_path):
    seen = set()
    for seed in range(40):
        built = build_character(seed, tmp_path, n_reference_images=4, n_scenes=40)
        fields, name = built.profile.fields, built.name
        quirk = fields["quirk"]
        replies = [t.text for t in _character_turns(built)]
        checks = {
            "nya": lambda r: _sentence_ends(r) == {"~nya"},
            "desu": lambda r: _sentence_ends(r) == {"desu"},
            "double_bang": lambda r: set(re.findall(r"[.!?]+(?=\s|$)", r)) == {"!!"},
            "stutter": lambda r: re.match(r"^(\w)-\1", r) is not None,
            "third_person": lambda r: re.search(r"\bI\b|\b[Mm]y\b|\b[Mm]e\b", r) is None,
        }
        assert all(checks[quirk](r) for r in replies), (quirk, replies[:3])
        # a catchphrase is said as is inside quotes, and in the quirk's style at the end of a reply
        phrases = [v.rstrip(".!?") for cp in fields["catchphrases"] for v in (cp, apply_quirk(quirk, cp, name))]
        assert sum(any(p in r for p in phrases) for r in replies) >= 0.25 * len(replies)
        seen.add(quirk)
    assert seen == set(QUIRKS)


def test_persona_is_deterministic_per_rng():
    first, second = make_persona(random.Random(11)), make_persona(random.Random(11))
    assert first == second
    assert make_persona(random.Random(12)) != first
    assert len(first["facts"]) >= 8 and first["quirk"] in QUIRKS
    names = {make_persona(random.Random(s))["name"] for s in range(50)}
    assert len(names) >= 45


# ----------------------------------------------------------------------------------------------- renderer


def test_body_colours_give_clearly_different_images():
    means = {}
    for color in ATTRIBUTE_VALUES["body_color"]:
        image = np.asarray(render({**BASE, "body_color": color}), dtype=float)
        assert image.shape == (32, 32, 3)
        centre = image[17, 16]
        assert np.abs(centre - np.array(COLORS[color])).max() < 40, color
        means[color] = image.mean(axis=(0, 1))
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.linalg.norm(means[a] - means[b]) > 8, (a, b)


@pytest.mark.parametrize("key", list(ATTRIBUTE_VALUES))
def test_every_attribute_value_changes_the_image(key):
    base = {**BASE, "accessory": "hat"}
    images = [np.asarray(render({**base, key: value}), dtype=float) for value in ATTRIBUTE_VALUES[key]]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 0.5, (key, ATTRIBUTE_VALUES[key][i], ATTRIBUTE_VALUES[key][j])


def test_render_is_deterministic_and_sized():
    a, b = render(BASE, 48), render(BASE, 48)
    assert a.size == (48, 48) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="body_color='plaid'"):
        render({**BASE, "body_color": "plaid"})


def test_make_character_without_directory_reads_back(tmp_path):
    built = make_character(1, n_reference_images=2, n_scenes=3, image_size=16)
    assert built.root is not None and built.root.is_dir()
    assert read_character(built.root).name == built.name
    shutil.rmtree(built.root)
    with pytest.raises(ValueError):
        build_character(1, tmp_path, n_reference_images=0)
