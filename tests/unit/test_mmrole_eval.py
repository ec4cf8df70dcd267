"""MMRole-Eval (protocol `mmrole`) against MMRole's own release: its reward model's review texts for one model
(InternVL-Chat-V1.5, in-distribution) must give MMRole's published CSV scores, and `cmrp eval --mmrole-tests`
against a local server answering in the reward model's format must give the same table end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cmrp.cli import main
from cmrp.errors import DataError
from cmrp.evaluation.judge import MMROLE_METRICS, JudgeClient, parse_rm_scores, ratio_scores
from cmrp.evaluation.mmrole_eval import (
    format_table,
    generate_answers,
    load_rm_prompt,
    load_tests,
    read_answers,
    review_pairs,
    score_answers,
    table_rows,
)
from tests.unit.mmrole_rm import CSV_KEYS, FIXTURE, KINDS, FakeChatServer, published, request_parts, reviews


def test_released_reviews_give_mmroles_published_scores():
    for kind in KINDS:
        released = reviews(kind)
        pairs = review_pairs(released)
        for record, got in zip(released, pairs, strict=True):  # our parser reads what MMRole's stored
            assert got == {k: tuple(record["rm_review"][n]["score"]) for k, n in zip(MMROLE_METRICS, CSV_KEYS,
                                                                                      strict=True)}
        (row,) = table_rows([(f"in-distribution/{kind}_test.json", len(released), len(pairs), pairs)])
        count, scores = published(kind)
        assert row["count"] == count == 72 and row["records"] == 72
        for key, name in zip(MMROLE_METRICS, CSV_KEYS, strict=True):
            assert row[key] == pytest.approx(scores[name], abs=1e-4)
            assert abs(row[key] - scores[name]) < 1e-12  # the same sum in the same order
        # dividing sums instead of averaging ratios (what cmrp did before) is not MMRole's number
        sum_ratio = {k: sum(p[k][0] for p in pairs) / sum(p[k][1] for p in pairs) for k in MMROLE_METRICS}
        assert max(abs(sum_ratio[k] - scores[n]) for k, n in zip(MMROLE_METRICS, CSV_KEYS, strict=True)) > 1e-3


def test_requests_are_byte_identical_to_mmroles():
    """rm_prompts.json: the requests MMRole's eval/RM_review.py builds (see the fixture README)."""
    gold = json.loads((FIXTURE / "rm_prompts.json").read_text())
    prompt = load_rm_prompt()
    assert gold["meta"]["systems"] == [prompt.system]
    checked = 0
    for kind in KINDS:
        for record in reviews(kind):
            requests = [[prompt.system, record["image"], text]
                        for _, text in prompt.texts(record, record["conversations"][1]["answer"])]
            digest = hashlib.sha256(json.dumps(requests, ensure_ascii=False).encode("utf-8")).hexdigest()
            assert digest == gold["records"][f"{kind}_test.json/{record['id']}"], record["id"]
            checked += 1
    assert checked == 216


@pytest.mark.parametrize(("text", "pair"), [
    ("Both are good, [Scores]: (8, 9)", (8.0, 9.0)), ("A is off-topic, [Scores]: (0, 8)", (0.0, 8.0)),
    ("[Scores]: 10, 9", (10.0, 9.0)), ("[Scores]: (Model A: 7, Model B: 8.5)", (7.0, 8.5)),
    ("[Scores]: (11, 3)", None), ("no scores", None), ("first [Scores]: (1, 2), then [Scores]: (3, 4)", (3.0, 4.0)),
])
def test_parse_rm_scores(text, pair):
    assert parse_rm_scores(text) == pair


def test_ratio_is_the_mean_of_per_item_ratios():
    pairs = [{"fluency": (4.0, 8.0)}, {"fluency": (9.0, 9.0)}, {"fluency": (0.0, 6.0)}, {"fluency": (5.0, 0.0)}, None]
    got = ratio_scores(pairs, ("fluency",))
    assert got["fluency"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # a reference score of 0 has no ratio
    assert got["overall"] == got["fluency"]
    assert ratio_scores([None], ("fluency",)) == {"fluency": None, "overall": None}


def _release(tmp_path: Path, images: bool = True) -> tuple[Path, Path, dict]:
    """MMRole_dataset/data/test/in-distribution (the three test files), the model's answers files, images, and
    what the reward model said to each request (from the released reviews)."""
    from PIL import Image

    root = tmp_path / "MMRole_dataset"
    answers = tmp_path / "answers"
    said: dict[tuple[str, str, str], str] = {}
    for kind in KINDS:
        records = reviews(kind)
        for record in records:
            question, answer = record["conversations"][0]["value"], record["conversations"][1]["answer"]
            for name, review in record.pop("rm_review").items():
                said[(question, answer, name)] = review["review"]
            if images and not (root / "images" / record["image"]).is_file():
                (root / "images" / record["image"]).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (40, 80, 120)).save(root / "images" / record["image"])
        (answers / f"{kind}_test.json").parent.mkdir(parents=True, exist_ok=True)
        (answers / f"{kind}_test.json").write_text(json.dumps(records, ensure_ascii=False))
        for record in records:
            del record["conversations"][1]["answer"]
        (root / "data/test/in-distribution").mkdir(parents=True, exist_ok=True)
        (root / f"data/test/in-distribution/{kind}_test.json").write_text(json.dumps(records, ensure_ascii=False))
    return root, answers, said


def _released_reviewer(said: dict, problems: list[str], with_image: bool = True):
    system = load_rm_prompt().system

    def reply(body: dict) -> str:
        question, answer, metric, images = request_parts(body)
        if body["messages"][0] != {"role": "system", "content": system}:
            problems.append("system prompt")
        if with_image and (len(images) != 1 or not images[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")):
            problems.append(f"image of {metric}")
        return said.get((question, answer, metric), "no such request")

    return reply


def test_cmrp_eval_reproduces_mmroles_table_end_to_end(tmp_path, capsys):
    root, answers, said = _release(tmp_path)
    problems: list[str] = []
    server = FakeChatServer(_released_reviewer(said, problems))
    try:
        args = ["eval", "--mmrole-tests", str(root), "--answers", str(answers), "--judge-url", server.url,
                "--judge-model", "MMRole-Eval_RM", "--out", str(tmp_path / "out"), "--judge-concurrency", "8"]
        assert main(args) == 0
        assert problems == [] and len(server.requests) == 216 * 8
        report = json.loads((tmp_path / "out" / "mmrole_eval.json").read_text())
        assert report["protocol"] == "mmrole" and report["missing_scores"] == 0 and report["without_image"] == 0
        rows = {row["file"]: row for row in report["rows"]}
        assert list(rows) == [f"in-distribution/{k}_test.json" for k in KINDS] + ["in-distribution/ (all)"]
        for kind in KINDS:
            count, scores = published(kind)
            row = rows[f"in-distribution/{kind}_test.json"]
            assert (row["count"], row["answered"]) == (count, 72)
            for key, name in zip(MMROLE_METRICS, CSV_KEYS, strict=True):
                assert row[key] == pytest.approx(scores[name], abs=1e-4)
        assert rows["in-distribution/ (all)"]["count"] == 216
        out = capsys.readouterr().out
        assert "MMRole-Eval, protocol mmrole (one request per metric)" in out
        assert format_table(report["rows"]) in out
        written = json.loads((tmp_path / "out/reviews/in-distribution/comment_test.json").read_text())
        assert [r["rm_review"]["Fluency"]["score"] for r in written] == \
            [r["rm_review"]["Fluency"]["score"] for r in reviews("comment")]  # MMRole's reviews format
        assert main(args) == 0 and len(server.requests) == 216 * 8  # a second run asks nothing: all cached
    finally:
        server.close()


def test_missing_images_are_an_error_unless_allowed(tmp_path):
    root, answers, said = _release(tmp_path, images=False)
    tests = load_tests(root)
    problems: list[str] = []
    server = FakeChatServer(_released_reviewer(said, problems, with_image=False))
    try:
        client = JudgeClient(server.url, "MMRole-Eval_RM", concurrency=8, retry_wait=0.0)
        with pytest.raises(DataError, match=r"216 of 216 test images are not found .*--allow-missing-images"):
            score_answers(tests, read_answers(answers), client, images=None)
        scores = score_answers(tests, read_answers(answers), client, images=None, allow_missing_images=True)
        assert scores.without_image == 216 and scores.rows[0]["count"] == 72
        assert all(part["type"] == "text" for body in server.requests for part in body["messages"][1]["content"])
    finally:
        server.close()


def test_answers_formats_and_mistakes(tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps({"Iron_Man_comment_COCO_30_1": "I am Iron Man."}))
    assert read_answers(tmp_path / "ids.json") == {"Iron_Man_comment_COCO_30_1": "I am Iron Man."}
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(DataError, match=r"bad.json: \[0\]: not a record of MMRole's answers format"):
        read_answers(tmp_path / "bad.json")
    (tmp_path / "d").mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / "d" / name).write_text(json.dumps({"same": "twice"}))
    with pytest.raises(DataError, match="record 'same' is answered twice"):
        read_answers(tmp_path / "d")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "comment_test.json").write_text(json.dumps([dict(reviews("comment")[0], image="../../x.jpg")]))
    with pytest.raises(DataError, match=r"comment_test.json: \[0\].image: '../../x.jpg' leaves images/"):
        load_tests(tmp_path / "t")  # never read (and sent to the judge) a file outside images/
    tests = load_tests(FIXTURE)
    assert [name for name, _ in tests] == [f"{d}/{k}_test.json" for d in ("in-distribution", "out-of-distribution")
                                           for k in KINDS]
    with pytest.raises(DataError, match="none of the 15 test records has an answer"):
        score_answers(tests, {"other": "x"}, client=None, images=None)


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["eval", "--answers", str(tmp_path)]) == 2
    assert "--answers goes with --mmrole-tests" in capsys.readouterr().err
    assert main(["eval", "--mmrole-tests", str(FIXTURE), "--answers", str(tmp_path)]) == 2
    assert "scoring needs the reward model; give --judge-url and --judge-model" in capsys.readouterr().err
    assert main(["eval", "--mmrole-tests", str(tmp_path / "nowhere"), "--answers", str(tmp_path),
                 "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["eval"]) == 2


def test_a_checkpoint_answers_with_mmroles_input():
    """Each record's system prompt, image and whole prompt (never cut to data.max_text_tokens) reach the model."""
    from cmrp.data.tasks import Example

    class Recorder:
        max_text_tokens = 64
        seen: list[tuple[Example, int]] = []

        def generate_text(self, contexts, max_new_tokens):
            self.seen += [(c, self.max_text_tokens) for c in contexts]
            return [f"reply {len(self.seen) - len(contexts) + i}" for i in range(len(contexts))]

    model = Recorder()
    tests = load_tests(FIXTURE)
    answers = generate_answers(model, tests, images=FIXTURE / "images", allow_missing_images=True, max_new_tokens=8,
                               batch_size=4)
    records = [r for _, rs in tests for r in rs]
    assert list(answers) == [r["id"] for r in records] and answers[records[2]["id"]] == "reply 2"
    assert model.max_text_tokens == 64 and all(limit >= 1 << 20 for _, limit in model.seen)
    context = model.seen[0][0]
    assert [(s.kind, s.role) for s in context.segments] == [("text", "system"), ("text", "user")]  # COCO: no image
    assert context.segments[0].text == records[0]["system"]
    assert context.segments[1].text == records[0]["conversations"][0]["value"]
    with pytest.raises(DataError, match="15 of 15 test images are not under"):
        generate_answers(model, tests, images=FIXTURE / "nowhere", allow_missing_images=False, max_new_tokens=8)
