"""MMRole-Eval as MMRole defines it: any model's answers on MMRole's test files, scored by a reward model.

Protocol `mmrole` (what MMRole's eval/RM_review.py and eval/RM_result.py do, written anew):
- per test record and metric, one request: the record's image, then a text holding the record's prompt
  ("question"), the evaluated answer (model A), the reference reply (model B), the task and the metric's
  description, in the words of `rewards/mmrole_eval/rm_prompt.json` — those MMRole-Eval_RM was trained on;
- the reply ends "[Scores]: (A, B)" with scores from 0 to 10 (`judge.parse_rm_scores`);
- a record without an answer is not scored (MMRole skips it too);
- per file and metric, the mean over records of A / B (`judge.ratio_scores`); a file's count is the number
  of records with all eight pairs (72 per in-distribution file, 26 per out-of-distribution file when complete).
The reward model is used through any OpenAI-compatible endpoint (`JudgeClient`), e.g. vLLM serving
YanqiDai/MMRole-Eval_RM. A cmrp checkpoint answers the records with MMRole's own input (the record's system
prompt, its image, its prompt as the user's turn), as every model in MMRole's table did.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from cmrp import jsonio
from cmrp.backbones.protocol import Backbone
from cmrp.data.mmrole import load_test_files
from cmrp.data.tasks import Example, Segment
from cmrp.data.validate import errors_of, problems_error
from cmrp.errors import ConfigError, DataError
from cmrp.evaluation.judge import MMROLE_METRICS, JudgeClient, JudgeRequest, parse_rm_scores, ratio_scores
from cmrp.resources import asset_dir

__all__ = ["RMPrompt", "answers_from_records", "find_images_dir", "format_table", "generate_answers",
           "load_rm_prompt", "read_answers", "review_pairs", "run_mmrole_eval", "score_answers", "table_rows"]

PROTOCOL = "mmrole"
_PAIR = tuple[float, float]


# -- the reward model's requests -------------------------------------------------------------------------
@dataclass
class RMPrompt:
    """MMRole-Eval's request wording (rewards/mmrole_eval/rm_prompt.json): filled in per record and metric."""

    system: str
    role_in_script: Template
    role_hypothetical: Template
    hypothetical_script: str
    human: str
    the_human: str
    task: Template
    metrics: list[tuple[str, Template]]  # (MMRole's metric name, its description)
    request: Template

    def texts(self, record: dict[str, Any], answer: str) -> list[tuple[str, str]]:
        """(metric name, request text) for each of the eight metrics, in MMRole's order."""
        role, script, other = record["role"], record.get("script") or "", record["other_role"]

        def who(name: str) -> str:
            if script == self.hypothetical_script:
                return self.role_hypothetical.substitute(name=name)
            return self.role_in_script.substitute(name=name, script=script)

        other_script = other if other == self.human else who(other)
        task = self.task.substitute(role_script=who(role), other_role_script=other_script, role=role)
        the_other = self.the_human if other == self.human else other
        question, reference = record["conversations"][0]["value"], record["conversations"][1]["value"]
        return [(name, self.request.substitute(
            question=question, answer=answer, reference=reference, task=task,
            aspect=description.substitute(role=role, the_other_role=the_other))) for name, description in self.metrics]


def load_rm_prompt(path: Path | None = None) -> RMPrompt:
    """The shipped wording (or a file of the same form, for another reward model)."""
    path = path or asset_dir("rewards") / "mmrole_eval" / "rm_prompt.json"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        metrics = [(str(name), Template(text)) for name, text in data["metrics"]]
        prompt = RMPrompt(data["system"], Template(data["role_in_script"]), Template(data["role_hypothetical"]),
                          data["hypothetical_script"], data["human"], data["the_human"], Template(data["task"]),
                          metrics, Template(data["request"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a usable MMRole-Eval prompt file ({type(err).__name__}: {err})") from None
    if len(metrics) != len(MMROLE_METRICS):
        raise ConfigError(f"{path}: 'metrics' lists {len(metrics)} metrics; MMRole-Eval has {len(MMROLE_METRICS)}")
    return prompt


def _metric_key(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


def _image_part(path: Path) -> dict[str, Any]:
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def rm_requests(prompt: RMPrompt, record: dict[str, Any], answer: str, image: Path | None) -> list[JudgeRequest]:
    """The eight requests for one answered record: system prompt, then the image and the text as the user turn."""
    out = []
    image_parts = [_image_part(image)] if image is not None else []
    for name, text in prompt.texts(record, answer):
        messages: list[dict[str, Any]] = [{"role": "system", "content": prompt.system},
                    {"role": "user", "content": [*image_parts, {"type": "text", "text": text}]}]
        out.append(JudgeRequest(f"mmrole:{_metric_key(name)}", {}, kind="rm_pair", messages=messages))
    return out


# -- inputs ----------------------------------------------------------------------------------------------
def load_tests(path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """MMRole's test files under `path`, checked: [(file, records)]; a DataError names every problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--mmrole-tests {path}: no such file or folder (give MMRole_dataset's root, its data/test, "
                          "or a folder of <kind>_test.json files)")
    tests, problems = load_test_files(path)
    if errors_of(problems):
        raise problems_error(path, problems)
    if not tests:
        raise ConfigError(f"--mmrole-tests {path}: no MMRole test files there (comment_test.json, human-role_test.json, "
                          "inter-role_test.json, directly or in in-distribution/ and out-of-distribution/, or under "
                          "data/test/)")
    return tests


def answers_from_records(records: list[Any], where: str) -> dict[str, str]:
    """id -> answer from MMRole's answers format (test records with conversations[1]["answer"])."""
    out: dict[str, str] = {}
    for i, record in enumerate(records):
        try:
            record_id, answer = record["id"], record["conversations"][1].get("answer", "")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise DataError(f"{where}: [{i}]: not a record of MMRole's answers format ({{\"id\": ..., "
                            "\"conversations\": [{...}, {\"value\": REFERENCE, \"answer\": ANSWER}]}})") from None
        if not isinstance(record_id, str) or not isinstance(answer, str | None):
            raise DataError(f"{where}: [{i}]: \"id\" and conversations[1].answer must be strings")
        out[record_id] = answer or ""
    return out


def read_answers(path: Path) -> dict[str, str]:
    """A model's answers: a JSON file (or a folder of them, searched recursively) holding either MMRole's answers
    format (the test records, each with conversations[1]["answer"]) or an object {record id: answer}."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*.json") if p.is_file()) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ConfigError(f"--answers {path}: no such file, or no .json file in that folder")
    out: dict[str, str] = {}
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{file}: cannot be read as JSON ({type(err).__name__}: {err}); fix the answers file") from None
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            found = {str(k): v for k, v in data.items()}
        elif isinstance(data, list):
            found = answers_from_records(data, str(file))
        else:
            raise DataError(f"{file}: expected MMRole's answers format (a list of test records with "
                            "conversations[1].answer) or an object {\"record id\": \"answer\"}")
        for record_id in found:
            if record_id in out:
                raise DataError(f"{file}: record {record_id!r} is answered twice (also in another answers file); "
                                "keep one answer per record")
        out.update(found)
    return out


def find_images_dir(tests_path: Path) -> Path | None:
    """MMRole_dataset's images/ beside the test files: the first `images/` in the tests path or above it."""
    path = Path(tests_path).expanduser().resolve()
    for folder in [path, *path.parents][:5]:
        if (folder / "images").is_dir():
            return folder / "images"
    return None


def _image_paths(tests: list[tuple[str, list[dict]]], images: Path | None, allow_missing: bool,
                 ids: set[str] | None = None) -> tuple[dict[str, Path | None], int]:
    """record id -> its image file (None when missing and allowed); the number missing."""
    out: dict[str, Path | None] = {}
    missing: list[str] = []
    for _, records in tests:
        for record in records:
            if ids is not None and record["id"] not in ids:
                continue
            target = images / record["image"] if images is not None else None
            if target is not None and target.is_file():
                out[record["id"]] = target
            else:
                out[record["id"]] = None
                missing.append(record["image"])
    if missing and not allow_missing:
        where = f"under {images}" if images is not None else "found (no images/ folder beside the test files)"
        raise DataError(f"{len(missing)} of {len(out)} test images are not {where}, e.g. {missing[0]}. MMRole's reward "
                        "model judges each answer with its image: download them (MS-COCO train2017 into "
                        "images/COCO/train2017, the rest from MMRole_dataset's images/) and pass --images DIR, or "
                        "score without them with --allow-missing-images (the report counts them)")
    return out, len(missing)


# -- scoring ---------------------------------------------------------------------------------------------
@dataclass
class MMRoleScores:
    """What a scoring run produced: a table row per file, and MMRole's review records per file."""

    rows: list[dict[str, Any]]
    reviews: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    without_image: int = 0
    missing_scores: int = 0


def _row(name: str, records: int, answered: int, pairs: list[dict[str, _PAIR | None]]) -> dict[str, Any]:
    complete = sum(all(p.get(m) is not None for m in MMROLE_METRICS) for p in pairs)
    row: dict[str, Any] = {"file": name, "records": records, "answered": answered, "count": complete}
    row.update(ratio_scores(pairs, MMROLE_METRICS))
    row["per_metric_count"] = {m: sum((pair := p.get(m)) is not None and pair[1] > 0 for p in pairs)
                               for m in MMROLE_METRICS}
    return row


def table_rows(per_file: list[tuple[str, int, int, list[dict[str, _PAIR | None]]]]) -> list[dict[str, Any]]:
    """One row per file, then one per folder of several files and one for all (means over their records)."""
    rows = [_row(*entry) for entry in per_file]
    groups: dict[str, list[int]] = {}
    for i, (name, *_rest) in enumerate(per_file):
        groups.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", []).append(i)
    pooled = [(f"{folder}/ (all)", idx) for folder, idx in groups.items() if folder and len(idx) > 1]
    if len(per_file) > 1 and (len(groups) > 1 or not pooled):
        pooled.append(("all", list(range(len(per_file)))))
    for name, idx in pooled:
        rows.append(_row(name, sum(per_file[i][1] for i in idx), sum(per_file[i][2] for i in idx),
                         [p for i in idx for p in per_file[i][3]]))
    return rows


def review_pairs(reviews: list[dict[str, Any]]) -> list[dict[str, _PAIR | None]]:
    """Per reviewed record of an MMRole reviews file ("rm_review": {metric: {"review": text, ...}}), the score
    pairs our parser reads from the review texts; records without a review are left out (as MMRole does)."""
    out = []
    for record in reviews:
        review = record.get("rm_review") or {}
        if review:
            out.append({_metric_key(name): parse_rm_scores((entry or {}).get("review") or "")
                        for name, entry in review.items()})
    return out


def score_answers(tests: list[tuple[str, list[dict]]], answers: dict[str, str], client: Any, *,
                  images: Path | None, allow_missing_images: bool = False, prompt: RMPrompt | None = None,
                  limit: int | None = None) -> MMRoleScores:
    """Score every answered test record with the reward model behind `client` (a JudgeClient)."""
    prompt = prompt or load_rm_prompt()
    selected = [(name, records[:limit] if limit else records) for name, records in tests]
    answered_ids = {r["id"] for _, records in selected for r in records if answers.get(r["id"])}
    if not answered_ids:
        raise DataError(f"none of the {sum(len(r) for _, r in selected)} test records has an answer (the answers' "
                        "record ids must be those of the test files, e.g. "
                        f"{selected[0][1][0]['id'] if selected and selected[0][1] else '...'})")
    image_of, without = _image_paths(selected, images, allow_missing_images, answered_ids)
    requests: list[JudgeRequest] = []
    slots: list[tuple[int, int]] = []
    for f, (_, records) in enumerate(selected):
        for r, record in enumerate(records):
            if record["id"] in answered_ids:
                requests += rm_requests(prompt, record, answers[record["id"]], image_of[record["id"]])
                slots += [(f, r)] * len(MMROLE_METRICS)
    results = client.score_many(requests)
    names = [name for name, _ in prompt.metrics]
    per_record: dict[tuple[int, int], list[Any]] = {}
    for slot, result in zip(slots, results, strict=True):
        per_record.setdefault(slot, []).append(result)
    per_file, reviews, missing = [], {}, 0
    for f, (name, records) in enumerate(selected):
        pairs, out_records = [], []
        for r, record in enumerate(records):
            done = dict(record, conversations=[dict(c) for c in record["conversations"]])
            done["conversations"][1]["answer"] = answers.get(record["id"], "")
            if (f, r) in per_record:
                got = per_record[(f, r)]
                pairs.append({_metric_key(n): res.value for n, res in zip(names, got, strict=True)})
                missing += sum(res.value is None for res in got)
                done["rm_review"] = {n: {"review": res.raw, "score": list(res.value) if res.value else None}
                                     for n, res in zip(names, got, strict=True)}
            out_records.append(done)
        per_file.append((name, len(records), len(pairs), pairs))
        reviews[name] = out_records
    return MMRoleScores(table_rows(per_file), reviews, without, missing)


# -- answering with a cmrp checkpoint --------------------------------------------------------------------
def generate_answers(adapter: Backbone, tests: list[tuple[str, list[dict]]], *, images: Path | None,
                     allow_missing_images: bool, max_new_tokens: int, batch_size: int = 4,
                     limit: int | None = None) -> dict[str, str]:
    """The model's answer to every test record, from MMRole's input: the record's system prompt, its image and
    its prompt as the user's turn (whole: the prompt is not cut to data.max_text_tokens)."""
    selected = [(name, records[:limit] if limit else records) for name, records in tests]
    image_of, _ = _image_paths(selected, images, allow_missing_images)
    records = [r for _, rs in selected for r in rs]
    contexts = []
    for record in records:
        segments = [Segment("text", "system", record.get("system") or "")]
        if image_of[record["id"]] is not None:
            segments.append(Segment("image", "user", image=image_of[record["id"]]))
        segments.append(Segment("text", "user", record["conversations"][0]["value"]))
        contexts.append(Example("chat", segments))
    limit_before = adapter.max_text_tokens
    adapter.max_text_tokens = max(limit_before, 1 << 20)  # MMRole's prompts hold whole profiles
    try:
        replies: list[str] = []
        for start in range(0, len(contexts), batch_size):
            replies += adapter.generate_text(contexts[start:start + batch_size], max_new_tokens=max_new_tokens)
    finally:
        adapter.max_text_tokens = limit_before
    return {r["id"]: reply for r, reply in zip(records, replies, strict=True)}


# -- report ----------------------------------------------------------------------------------------------
_SHORT = {"instruction_adherence": "IA", "fluency": "Flu", "coherency": "Coh", "image_text_relevance": "ITR",
          "response_accuracy": "RA", "personality_consistency": "PC", "knowledge_consistency": "KC",
          "tone_consistency": "TC", "overall": "mean"}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as text, one row per file: count, then the eight metrics (MMRole's order) and their mean."""
    keys = [*MMROLE_METRICS, "overall"]
    width = max([len(r["file"]) for r in rows] + [4])
    head = f"{'file':<{width}}  {'count':>7}  " + "  ".join(f"{_SHORT[k]:>6}" for k in keys)
    lines = [head]
    for row in rows:
        cells = "  ".join(f"{row[k]:6.4f}" if isinstance(row.get(k), float) else f"{'-':>6}" for k in keys)
        lines.append(f"{row['file']:<{width}}  {str(row['count']) + '/' + str(row['records']):>7}  {cells}")
    legend = ", ".join(f"{_SHORT[k]} = {k}" for k in keys)
    return "\n".join(lines) + f"\n({legend}; each a mean over records of the ratio model score / reference score)"


def run_mmrole_eval(args: Any) -> dict[str, Any]:
    """`cmrp eval --mmrole-tests DIR (--answers FILE | CHECKPOINT)`: answers, reviews, table; the report dict."""
    tests = load_tests(args.mmrole_tests)
    images = Path(args.images).expanduser() if args.images else find_images_dir(Path(args.mmrole_tests))
    if images is not None and not images.is_dir():
        raise ConfigError(f"--images {args.images}: not a folder (give MMRole_dataset's images/)")
    limit = args.mmrole_limit
    report: dict[str, Any] = {"protocol": PROTOCOL, "tests": str(Path(args.mmrole_tests).expanduser().resolve()),
                              "images": str(images) if images else None, "limit_per_file": limit}
    if args.answers:
        out = (args.out or Path("mmrole-eval")).expanduser().resolve()
        answers = read_answers(args.answers)
        report["answers"] = str(Path(args.answers).expanduser().resolve())
    else:
        from cmrp.backbones.loading import find_checkpoint, load_checkpoint, load_recipe_of

        ckpt = find_checkpoint(args.checkpoint)
        out = (args.out or ckpt.parent / "mmrole-eval").expanduser().resolve()
        adapter = load_checkpoint(ckpt, load_recipe_of(ckpt)).to(args.device)
        answers = generate_answers(adapter, tests, images=images, allow_missing_images=args.allow_missing_images,
                                   max_new_tokens=args.max_new_tokens, limit=limit)
        for name, records in tests:  # MMRole's answers format: each test record with conversations[1]["answer"]
            kept = records[:limit] if limit else records
            done = [dict(r, conversations=[dict(r["conversations"][0]),
                                           {**r["conversations"][1], "answer": answers[r["id"]]}]) for r in kept]
            jsonio.write_json(out / "answers" / name, done, indent=4)
        report.update(checkpoint=str(ckpt), answers=str(out / "answers"))
    out.mkdir(parents=True, exist_ok=True)
    if args.judge_url:
        client = JudgeClient(args.judge_url, args.judge_model, api_key_env=args.judge_key_env,
                             cache_dir=out / "judge-cache", concurrency=args.judge_concurrency,
                             max_attempts=args.judge_attempts)
        scores = score_answers(tests, answers, client, images=images,
                               allow_missing_images=args.allow_missing_images, limit=limit)
        for name, records in scores.reviews.items():  # MMRole's reviews format, "rm_review" per record
            jsonio.write_json(out / "reviews" / name, records, indent=4)
        report.update(judge_endpoint=f"{client.url} ({client.model})", rows=scores.rows,
                      without_image=scores.without_image, missing_scores=scores.missing_scores,
                      reviews=str(out / "reviews"))
    report["files"] = {"json": str(jsonio.write_json(out / "mmrole_eval.json", report))}
    return report
