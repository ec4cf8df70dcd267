"""`cmrp fit recipes/rolescape20/bo.yaml`: the tiny backbone trains a few steps on Bo, read as-is from the
RoleScape-20 release layout (the shared sample), through the real console script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shared_data import ROLESCAPE_SAMPLE as SAMPLE

ROOT = Path(__file__).resolve().parents[2]
CMRP = str(Path(sys.executable).parent / "cmrp")


@pytest.mark.rolescape
def test_fit_trains_on_bo(tmp_path):
    out = tmp_path / "bo"
    proc = subprocess.run(
        [CMRP, "fit", "recipes/rolescape20/bo.yaml", "trainer.max_steps=3", "eval.max_items=8", "eval.grid_prompts=2",
         "eval.sample_steps=3", "eval.images_per_prompt=1", "data.batch_size=4", f"output_dir={out}",
         f"data.path={SAMPLE}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    metrics = json.loads(text)
    assert metrics["character"] == "Bo"
    # 12 annotated + 192 extension scenes, one character turn each; 12 images with reasoning; 12 scene images +
    # 12 T2I instructions; 239 open + 60 MCQ VQA; 100 open knowledge questions
    assert metrics["examples_per_task"] == {"chat": 204, "thinking": 12, "t2i": 24, "vqa": 299, "knowledge_qa": 100}
    for when in ("before", "after"):  # 8 of the 10 test MCQ; the release has no test VQA: undefined, null in JSON
        assert metrics[when]["knowledge_mcq_acc"] * 8 == round(metrics[when]["knowledge_mcq_acc"] * 8)
        assert metrics[when]["vqa_mcq_acc"] is None
    assert math.isfinite(metrics["loss_first"]) and math.isfinite(metrics["loss_last"])
    assert (out / "samples.png").is_file() and (out / "checkpoint" / "backbone" / "model.safetensors").is_file()
