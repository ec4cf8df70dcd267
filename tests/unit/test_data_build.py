"""`cmrp data build` pieces without a server: JSON repair, schemas, prompt templates, seed dialogues."""

from __future__ import annotations

import json

import pytest

from cmrp.data.build import PROMPT_NAMES, SCHEMAS, _difficulty_counts, load_prompts, load_seed_dialogues
from cmrp.data.llm import ResponseCache, extract_json, request_key
from cmrp.errors import DataError


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
    ('Sure, here it is: {"a": {"b": "}"}} and some words {"c": 2}', {"a": {"b": "}"}}),
    ('``` \n{"a": 1}', {"a": 1}),  # an unclosed fence
])
def test_extract_json_repairs(text, expected):
    assert extract_json(text) == (expected, None)


@pytest.mark.parametrize("text", ['{"a": [1, 2', "no json here", "```json\n```", '{"a": 1'])
def test_extract_json_reports_why(text):
    value, error = extract_json(text)
    assert value is None and ("invalid JSON" in error or "no JSON object" in error)


def test_schemas_name_the_bad_field():
    assert SCHEMAS["knowledge_mcq"]({"mcq": [{"question": "q", "options": ["a", "b", "c"], "answer": 0}]})[1] == \
        "mcq[0].options should be a list of exactly 4 non-empty strings"
    assert "answer should be the 0-based index" in SCHEMAS["vqa"](
        {"open": [{"question": "q", "answer": "a"}],
         "mcq": [{"question": "q", "options": ["a", "b", "c", "d"], "answer": 4}]})[1]
    assert SCHEMAS["scene"]({"user": "u", "character": "c", "thinking": ""})[1].startswith(
        'missing or empty: "thinking", "generation_instruction"')
    ok, error = SCHEMAS["knowledge_mcq"]({"mcq": [{"question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
                                                    "answer": "C"}]})
    assert error is None and ok[0]["answer"] == 2
    assert SCHEMAS["dialogues"]({"dialogues": [[{"role": "character", "text": "x"}, {"role": "user", "text": "y"}]]})[1] \
        == "dialogues[0] should start with the user and contain a character turn"


def test_difficulty_mix():
    assert _difficulty_counts(12) == [("easy", 5), ("medium", 5), ("hard", 2)]
    assert _difficulty_counts(5) == [("easy", 2), ("medium", 2), ("hard", 1)]
    assert _difficulty_counts(1) == [("easy", 1)]


def test_prompts_ship_and_can_be_overridden(tmp_path):
    shipped = load_prompts()
    assert set(shipped) == set(PROMPT_NAMES) and all("$profile" in shipped[n] for n in PROMPT_NAMES if n != "system")
    (tmp_path / "scene.txt").write_text("my scene for $name")
    assert load_prompts(tmp_path)["scene"] == "my scene for $name"
    assert load_prompts(tmp_path)["vqa"] == shipped["vqa"]
    (tmp_path / "scenes.txt").write_text("typo")
    with pytest.raises(DataError, match="scenes.txt is not a template name"):
        load_prompts(tmp_path)


def test_seed_dialogue_problems_name_the_field(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps([[{"role": "user", "text": "hi"}, {"role": "bot", "text": "x"}],
                                {"turns": [{"role": "user", "text": ""}]}, "nope"]))
    with pytest.raises(DataError) as err:
        load_seed_dialogues(path)
    message = str(err.value)
    assert "3 problem(s)" in message and "[0][1].role" in message and "[1][0].text" in message and "[2]:" in message
    path.write_text(json.dumps({"scenes": [[{"role": "user", "text": "hi"}, {"role": "machine", "text": "yo"}]]}))
    assert [t.role for t in load_seed_dialogues(path)[0].turns] == ["user", "character"]


def test_cache_is_keyed_by_request_and_atomic(tmp_path):
    key = request_key("m", [{"role": "user", "content": "x"}])
    assert key == request_key("m", [{"content": "x", "role": "user"}]) != request_key("n", [{"role": "user", "content": "x"}])
    cache = ResponseCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, "item", {"v": 1})
    assert cache.get(key) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == [f"{key}.json"]
    (tmp_path / f"{key}.json").write_text("{broken")
    assert cache.get(key) is None  # asked again rather than crashing
