"""What a run leaves in MLflow is what a researcher compares: the reward in full as params, one row per
(metric, step) with steps that continue across stages, and a resume that leaves the history exactly as an
uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import read_run, run_cli
from tests.integration.test_resume import kill_after

GRPO_ONLY = ["recipes/bagel-tiny/sft_grpo.yaml", "stages=[grpo]", "data.max_text_tokens=32", "grpo.max_steps=2",
             "grpo.group_size=2", "grpo.prompts_per_step=1", "grpo.sample_steps=3", "grpo.minibatch_size=2",
             "eval.max_items=2", "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2",
             "checkpoint.every_n_steps=0"]
WEIGHT = "rewards.terms.clip_similarity.weight"


def rows(output_dir: Path, skip: tuple[str, ...] = ("grpo/time_",)) -> dict[str, list[tuple[int, float]]]:
    """Every metric row of the run, (step, value) in step order (wall-clock timings left out)."""
    client, run = read_run(output_dir)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if not key.startswith(skip)}


def test_a_reward_weight_from_the_command_line_reaches_mlflow(tmp_path, capsys):
    from cmrp.cli import main
    from cmrp.config import load_reward_preset

    default = load_reward_preset("sandbox")["terms"]["clip_similarity"]["weight"]
    assert main(["fit", *GRPO_ONLY, f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["fit", *GRPO_ONLY, f"{WEIGHT}=0.9", f"output_dir={tmp_path / 'b'}"]) == 0
    capsys.readouterr()
    (_, a), (_, b) = read_run(tmp_path / "a"), read_run(tmp_path / "b")
    assert a.data.params[WEIGHT] == str(default) and b.data.params[WEIGHT] == "0.9"
    # every term, weight and kwarg is a param; the two runs' params differ in that weight only
    assert a.data.params["rewards.terms.trainset_penalty.kwargs.tau_high"] == "0.85"
    assert a.data.params["rewards.name"] == "sandbox"
    differ = {k for k in set(a.data.params) | set(b.data.params) if a.data.params.get(k) != b.data.params.get(k)}
    assert differ == {WEIGHT, "output_dir"}
    # ... and so do the rewards they logged: same rollouts (same seed), differently weighted
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert ra["reward/clip_similarity"][0] == pytest.approx(rb["reward/clip_similarity"][0])
    assert ra["reward/total"][0][1] != pytest.approx(rb["reward/total"][0][1])
    saved = (tmp_path / "b" / "checkpoint" / "recipe.yaml").read_text()
    assert "clip_similarity:\n      weight: 0.9" in saved  # the resolved reward in the saved recipe too


SFT_GRPO = ["recipes/bagel-tiny/sft_grpo.yaml", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
            "data.batch_size=2", "data.max_text_tokens=32", "grpo.max_steps=8", "grpo.group_size=2",
            "grpo.prompts_per_step=1", "grpo.sample_steps=3", "grpo.minibatch_size=2", "checkpoint.every_n_steps=2",
            "checkpoint.keep=2", "eval.max_items=4", "eval.grid_prompts=1", "eval.images_per_prompt=1",
            "eval.sample_steps=2"]


@pytest.mark.slow  # four CLI runs: about 3 minutes on a loaded 2-core machine
def test_resumed_history_equals_an_uninterrupted_runs_row_for_row(tmp_path):
    reference = tmp_path / "ref"
    proc = run_cli("fit", *SFT_GRPO, f"output_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = rows(reference)
    # steps continue across stages: SFT 0..3, GRPO 4..11, the final evaluation at 12
    assert [s for s, _ in expected["train/loss"]] == [0, 1, 2, 3]
    assert [s for s, _ in expected["reward/total"]] == list(range(4, 12))
    assert [s for s, _ in expected["val/reward/total"]] == [4, 12]
    assert [s for s, _ in expected["eval/before/vqa_mcq_acc"]] == [0]
    assert [s for s, _ in expected["eval/after/vqa_mcq_acc"]] == [12]
    assert "epoch" not in expected

    out = tmp_path / "run"  # killed in GRPO after its checkpoint at iteration 2, at a random later point
    kill_after(SFT_GRPO, out, lambda names: any(n.startswith("01-grpo-0") and int(n[-8:]) >= 2 for n in names))
    _, crashed = read_run(out)
    assert crashed.info.status == "RUNNING"  # SIGKILL: nothing could mark it; the resume continues it
    proc = run_cli("fit", *SFT_GRPO, f"output_dir={out}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = rows(out)
    assert got.keys() == expected.keys()
    for key in expected:
        assert [s for s, _ in got[key]] == [s for s, _ in expected[key]], key  # no duplicate (key, step) row
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-4, abs=1e-5), key
    _, run = read_run(out)
    assert run.info.status == "FINISHED"

    # --resume of the finished run: nothing is trained, evaluated or logged again
    metrics_before = (out / "metrics.json").read_text()
    proc = run_cli("fit", *SFT_GRPO, f"output_dir={out}", "--resume")
    assert proc.returncode == 0 and "already finished" in proc.stdout, proc.stderr[-3000:]
    assert rows(out) == got and (out / "metrics.json").read_text() == metrics_before
    assert json.loads(metrics_before)["mlflow"]["run_id"] == run.info.run_id
