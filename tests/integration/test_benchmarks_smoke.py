"""`benchmarks/grpo_rollout.py --smoke`: the prefix-reuse sweep (rollout cost vs prompt length and vs latent
tokens, as ratios to the free-prefix bound), FLOP accounting and the plot, at toy size. Timings are only
checked to exist; the ratios checked are the FLOP model's."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def grpo_rollout(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("grpo_rollout", None)
    return importlib.import_module("grpo_rollout")


def test_grpo_rollout_smoke_sweeps_prompt_length_and_latent_tokens(grpo_rollout, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "r.json", tmp_path / "prefix.png"
    result = grpo_rollout.main(["--smoke", "--out", str(out), "--plot", str(plot)])
    assert out.is_file() and plot.is_file() and plot.stat().st_size > 10_000
    assert result["peak_matmul"]["flops_per_s"] > 0
    for variant in ("prefix_reuse", "no_prefix_reuse"):
        r = result["rollout"][variant]
        assert r["images_per_s"] > 0 and r["flops"] > 0 and r["utilisation"] > 0
    assert result["rollout"]["no_prefix_reuse"]["flops"] > result["rollout"]["prefix_reuse"]["flops"]
    assert result["train"]["window_all_2"]["flops"] == pytest.approx(result["train"]["window_2"]["flops"])
    rows = result["prefix_scaling"]
    assert [r["prefix_tokens"] for r in rows] == [16, 64]
    for r in rows:
        assert r["reuse_s"] > 0 and r["no_reuse_s"] > 0 and r["bound_s"] > 0
        f = r["flops"]
        assert 1.0 < f["reuse_ratio_to_bound"] < f["no_reuse_ratio_to_bound"]
        assert 0.5 < f["saving_captured"] <= 1.0
    assert rows[0]["flops"]["no_reuse_ratio_to_bound"] < rows[1]["flops"]["no_reuse_ratio_to_bound"]
    latent = result["latent_scaling"]
    assert [r["latent_tokens"] for r in latent] == [16, 64]
    # the same prompt weighs less against more latent tokens
    assert latent[0]["flops"]["no_reuse_ratio_to_bound"] > latent[1]["flops"]["no_reuse_ratio_to_bound"]


def test_quickstart_benchmark_splits_a_real_fit_into_its_phases(monkeypatch, tmp_path):
    """`benchmarks/quickstart.py` on a two-step quickstart: the child's wall time is the fit's own phases plus
    what lies outside them, and the GRPO iteration split comes from the run's MLflow store."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("quickstart", None)
    quickstart = importlib.import_module("quickstart")
    result = quickstart.run(str(BENCHMARKS.parent / "recipes" / "quickstart.yaml"),
                            ["trainer.max_steps=2", "data.batch_size=2", "data.max_text_tokens=32", "grpo.max_steps=2",
                             "grpo.prompts_per_step=1", "grpo.group_size=2", "grpo.minibatch_size=2", "grpo.sample_steps=2",
                             # cps: the last step is noise-free, so a 2-step rollout trains a window of 1
                             "grpo.window_size=1", "grpo.heldout_prompts=1", "grpo.heldout_images=2",
                             "eval.max_items=4", "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2"],
                            None)
    phases = result["fit_timings_s"]
    assert {"setup_s", "sft_s", "grpo_s", "eval_before_s", "eval_after_s", "total_s"} <= set(phases)
    inside = sum(v for k, v in phases.items() if k != "total_s")
    assert result["outside_fit_timings_s"] == pytest.approx(result["wall_s"] - inside)
    assert 0 < inside < result["wall_s"] and result["user_s"] > 0 and result["peak_rss_mb"] > 100
    assert result["sft_steps_per_s"] == pytest.approx(2 / phases["sft_s"])
    split = result["grpo_iteration_s"]
    assert set(split) == set(quickstart.ITERATION_PARTS) and split["sample"] > 0 and split["train"] > 0
    assert result["heldout_reward_before"] is not None and "identity_fidelity_after" in result
