"""MMRole end to end through the console script: `cmrp fit recipes/mmrole/iron_man.yaml` trains the tiny
backbone on Iron Man read from the extract of MMRole-Data, then `cmrp eval RUN --mmrole-tests` has the
checkpoint answer MMRole's test records and scores the answers with a local server in the reward model's format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.mmrole_rm import FIXTURE, FakeChatServer, request_parts

ROOT = Path(__file__).resolve().parents[2]
CMRP = str(Path(sys.executable).parent / "cmrp")


def test_fit_on_mmrole_dialogues_then_mmrole_eval(tmp_path):
    from PIL import Image

    out = tmp_path / "ironman"
    proc = subprocess.run(
        [CMRP, "fit", "recipes/mmrole/iron_man.yaml", "trainer.max_steps=2", "eval.max_items=2", "eval.grid_prompts=1",
         "eval.sample_steps=2", "eval.images_per_prompt=1", "data.batch_size=4", f"output_dir={out}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["character"] == "Iron Man"
    # one chat example per reply of Iron Man in the 7 dialogues not held out: 1 + 1 + 1 + 4 + 7 + 3 + 6
    assert metrics["examples_per_task"] == {"chat": 23, "thinking": 0, "t2i": 0, "vqa": 0, "knowledge_qa": 0}
    assert metrics["before"]["vqa_mcq_acc"] is None  # undefined: null, strict JSON

    images = tmp_path / "images"  # stand-ins for the COCO and script images the release does not ship
    tests = [json.loads(p.read_text()) for p in sorted((FIXTURE / "data" / "test").rglob("*_test.json"))]
    for record in (r for records in tests for r in records):
        (images / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(images / record["image"])
    seen: list[tuple[str, int]] = []

    def reply(body: dict) -> str:
        _, answer, metric, parts = request_parts(body)
        seen.append((answer, len(parts)))
        return f"Model A is weaker. [Scores]: ({0 if metric == 'Fluency' else 4}, 8)"

    server = FakeChatServer(reply)
    try:
        proc = subprocess.run(
            [CMRP, "eval", str(out), "--mmrole-tests", str(FIXTURE), "--images", str(images), "--max-new-tokens", "6",
             "--judge-url", server.url, "--judge-model", "MMRole-Eval_RM"],
            capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MMRole-Eval, protocol mmrole" in proc.stdout
    report = json.loads((out / "mmrole-eval" / "mmrole_eval.json").read_text())
    rows = {row["file"]: row for row in report["rows"]}
    assert [rows[f]["count"] for f in list(rows)[:6]] == [3, 2, 3, 2, 2, 3]  # every record of the extract
    assert rows["all"]["count"] == 15 and len(seen) == 15 * 8 and all(n == 1 for _, n in seen)
    for row in rows.values():
        assert row["fluency"] == 0.0 and row["tone_consistency"] == 0.5 and row["overall"] == 7 * 0.5 / 8
    answered = json.loads((out / "mmrole-eval" / "answers" / "in-distribution" / "comment_test.json").read_text())
    assert [r["id"] for r in answered] == [r["id"] for r in tests[0]]
    assert {r["conversations"][1]["answer"] for r in answered} <= {a for a, _ in seen}
