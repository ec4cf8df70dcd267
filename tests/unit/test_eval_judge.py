"""The LLM-judge client against a local OpenAI-compatible server (127.0.0.1, started by the test)."""

from __future__ import annotations

import json

import pytest

from cmrp.evaluation.judge import (
    MMROLE_METRICS,
    JudgeClient,
    JudgeError,
    JudgeRequest,
    load_templates,
    parse_pair_scores,
    parse_score,
    ratio_scores,
)
from tests.unit.mmrole_rm import FakeChatServer

GOOD_PAIRS = json.dumps({m: [6, 8] for m in MMROLE_METRICS})


class FakeJudge(FakeChatServer):
    """Answers by the marker in the question's `response` text: R-GOOD -> "Score: 6", R-BOLD -> "**5/7**",
    R-JSON -> {"score": 4}, R-GARBLED -> no score at all, R-FAIL -> HTTP 500, R-FIXED -> garbled first, then a
    score when asked again, R-PAIRS -> MMRole pairs. Records every request body and Authorization header."""

    def __init__(self):
        super().__init__(self.answer)

    def answer(self, body: dict) -> tuple[int, str]:
        prompt = body["messages"][1]["content"]
        follow_up = len(body["messages"]) > 2
        if "R-FAIL" in prompt:
            return 500, ""
        if "R-GARBLED" in prompt:
            return 200, "I think it is quite good overall, hard to say."
        if "R-FIXED" in prompt:
            return 200, ("Reasoning done.\nScore: 3" if follow_up else "Let me think... no verdict.")
        if "R-BOLD" in prompt:
            return 200, "The answer is in character (score 2 would be too low).\n**5/7**"
        if "R-JSON" in prompt:
            return 200, 'Step 1: fine.\n```json\n{"score": 4}\n```'
        if "R-PAIRS" in prompt:
            return 200, f"Reply A is weaker on knowledge.\n{GOOD_PAIRS}"
        return 200, "Step 1: the facts match. Step 2: specific.\nScore: 6"


@pytest.fixture
def server():
    fake = FakeJudge()
    yield fake
    fake.close()


def _request(response: str, template: str = "memorization") -> JudgeRequest:
    return JudgeRequest(template, {"name": "Kiko", "profile": "Kiko is a fox.", "question": "Where are you from?",
                                   "response": response})


def test_scores_parsed_cached_and_missing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret-123")
    client = JudgeClient(server.url, "judge-model", api_key_env="JUDGE_TEST_KEY", cache_dir=tmp_path / "cache",
                         concurrency=3, max_attempts=3, retry_wait=0.0)
    requests = [_request(r) for r in ("R-GOOD", "R-BOLD", "R-JSON", "R-GARBLED", "R-FAIL", "R-FIXED")]
    results = client.score_many(requests)
    assert [r.value for r in results] == [6.0, 5.0, 4.0, None, None, 3.0]
    assert results[3].attempts == 3 and "no score" in results[3].error  # malformed: retried, then missing
    assert results[4].attempts == 3 and "HTTP 500" in results[4].error  # failing: retried, then missing
    assert results[5].attempts == 2  # asked again with the reason, then parsed
    calls = len(server.requests)
    assert calls == 1 + 1 + 1 + 3 + 3 + 2
    assert all(a == "Bearer sk-test-secret-123" for a in server.auth)
    # a second run: parsed answers come from the cache, only the missing ones are asked again
    again = client.score_many(requests)
    assert [r.value for r in again] == [6.0, 5.0, 4.0, None, None, 3.0]
    assert all(r.cached for r in (again[0], again[1], again[2], again[5]))
    assert len(server.requests) == calls + 3 + 3
    # the key is never written to disk nor shown
    for file in (tmp_path / "cache").iterdir():
        assert "sk-test-secret-123" not in file.read_text()
    assert "sk-test" not in repr(client)


def test_cache_hit_makes_no_request(server, tmp_path):
    first = JudgeClient(server.url, "m", cache_dir=tmp_path, retry_wait=0.0)
    assert first.score(_request("R-GOOD")).value == 6.0
    second = JudgeClient(server.url, "m", cache_dir=tmp_path, retry_wait=0.0)  # a new process, same cache
    result = second.score(_request("R-GOOD"))
    assert result.value == 6.0 and result.cached
    assert len(server.requests) == 1 and second.calls == 0
    # a different judge model is a different request
    JudgeClient(server.url, "other-model", cache_dir=tmp_path, retry_wait=0.0).score(_request("R-GOOD"))
    assert len(server.requests) == 2


def test_mmrole_pairs_and_ratio(server, tmp_path):
    client = JudgeClient(server.url, "m", cache_dir=tmp_path, retry_wait=0.0)
    fields = {"name": "Kiko", "profile": "p", "image": "none", "context": "User: hi", "response": "R-PAIRS",
              "reference": "ref"}
    results = client.score_many([JudgeRequest("mmrole_pairwise", fields, kind="pairs"),
                                 JudgeRequest("mmrole_pairwise", {**fields, "response": "R-GARBLED"}, kind="pairs")])
    assert results[0].value == {m: (6.0, 8.0) for m in MMROLE_METRICS}
    assert results[1].value is None
    ratios = ratio_scores([r.value for r in results])
    assert ratios["fluency"] == pytest.approx(0.75) and ratios["overall"] == pytest.approx(0.75)
    # score_many sends in parallel: the order the server saw them in is not fixed
    sent = [request["messages"][1]["content"] for request in server.requests]
    pairs = [text for text in sent if "R-PAIRS" in text]
    assert len(pairs) == 1 and len(sent) > 1  # the garbled reply is asked again, the readable one is not
    pairs = pairs[0]
    assert "Reply B" in pairs and "$" not in pairs.split("Reply A")[0]


def test_bad_endpoint_settings_fail_clearly(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_KEY_VAR"):
        JudgeClient(server.url, "m", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(JudgeError, match="--judge-url"):
        JudgeClient("127.0.0.1:8000", "m")


@pytest.mark.parametrize(("text", "score"), [
    ("Score: 6", 6.0), ("**Score:** 7", 7.0), ("reasoning...\n**6/7**", 6.0), ('{"score": 2, "why": "x"}', 2.0),
    ("I'd rate 3 out of 7 at first, but on reflection Score: 5", 5.0), ("Final rating: 4.", 4.0),
    ("Score: 9", None), ("no number", None), ("", None), ("5", 5.0),
])
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_parse_pair_scores_from_lines():
    text = "\n".join(f"{m.replace('_', ' ').title()}: 7, 9" for m in MMROLE_METRICS)
    pairs = parse_pair_scores(text)
    assert pairs == {m: (7.0, 9.0) for m in MMROLE_METRICS}
    nested = json.dumps({m: {"model": 3, "reference": 6} for m in MMROLE_METRICS})
    assert parse_pair_scores(nested)["tone_consistency"] == (3.0, 6.0)
    assert parse_pair_scores('{"fluency": [11, 3]}')["fluency"] is None


def test_templates_override(tmp_path):
    (tmp_path / "personality.txt").write_text("Rate $name: $response")
    templates = load_templates(tmp_path)
    assert templates["personality"].safe_substitute(name="Kiko", response="hi") == "Rate Kiko: hi"
    assert "$profile" in templates["memorization"].template


def test_rm_pair_requests_carry_their_messages_and_are_cached(tmp_path):
    """Protocol `mmrole`: prebuilt messages (image parts included) go out as they are; "[Scores]: (0, 7)" is a
    valid verdict; an unreadable one is asked again; the parsed pair is cached."""
    server = FakeChatServer(lambda body: "[Scores]: (0, 7)" if len(body["messages"]) > 2 else "I cannot decide.")
    messages = [{"role": "system", "content": "You judge."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                             {"type": "text", "text": "Which is better?"}]}]
    request = JudgeRequest("mmrole:fluency", {}, kind="rm_pair", messages=messages)
    try:
        result = JudgeClient(server.url, "rm", cache_dir=tmp_path, retry_wait=0.0).score(request)
        assert (result.value, result.attempts) == ((0.0, 7.0), 2)
        assert server.requests[0]["messages"] == messages and server.requests[1]["messages"][:2] == messages
        again = JudgeClient(server.url, "rm", cache_dir=tmp_path).score(request)
        assert again.cached and again.value == (0.0, 7.0) and len(server.requests) == 2
    finally:
        server.close()
