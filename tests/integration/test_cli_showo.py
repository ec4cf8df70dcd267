"""`cmrp fit recipes/showo-tiny/sft_grpo.yaml` (stages [sft, grpo]) through the real CLI on the tiny
Show-o, then the run read back from MLflow: SFT loss decreased, GRPO metrics logged, the checkpoint in
Show-o's official layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import FAST_EVAL, read_run, run_cli

# accumulate 2: both prompts' minibatches are scored before the optimiser steps, so the ratio is on-policy
FAST = ["trainer.max_steps=12", "data.batch_size=8", "trainer.log_every_n_steps=1", "sft.optimizer.warmup_steps=0",
        "grpo.max_steps=2", "grpo.group_size=4", "grpo.sample_steps=4", "grpo.minibatch_size=4", "grpo.accumulate=2"]


@pytest.fixture(scope="module")
def showo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("showo") / "run"
    proc = run_cli("fit", "recipes/showo-tiny/sft_grpo.yaml", *FAST, f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grpo reward:" in proc.stdout
    return out


def test_sft_loss_decreases_and_grpo_metrics_are_logged(showo_run):
    client, run = read_run(showo_run)
    assert run.data.params["backbone"] == "showo-tiny" and run.data.params["decoding"] == "chain"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # SFT trained
    metrics = set(run.data.metrics)
    expected = {"reward/total", "reward/total_std", "reward/vqa_consistency", "reward/lpips_diversity",
                "reward/trainset_penalty", "grpo/ratio_mean", "grpo/clip_frac", "grpo/approx_kl", "grpo/grad_norm",
                "grpo/time_sample_s", "val/reward/total"}
    assert expected <= metrics, expected - metrics
    ratios = client.get_metric_history(run.info.run_id, "grpo/ratio_mean")
    assert len(ratios) == 2 and all(abs(m.value - 1.0) < 1e-4 for m in ratios), [m.value for m in ratios]
    grads = client.get_metric_history(run.info.run_id, "grpo/grad_norm")
    assert all(m.value > 0 for m in grads)


def test_checkpoint_is_in_the_official_showo_layout(showo_run):
    from safetensors.torch import load_file

    backbone = showo_run / "checkpoint" / "backbone"
    config = json.loads((backbone / "config.json").read_text())
    assert config["_class_name"] == "Showo" and config["codebook_size"] == 8192
    assert config["mask_token_id"] == config["vocab_size"] - 1
    keys = load_file(str(backbone / "pytorch_model.safetensors"))
    assert "showo.lm_head.weight" in keys and all(k.startswith("showo.") for k in keys)
    assert (backbone / "vq" / "pytorch_model.safetensors").is_file() and (backbone / "llm" / "tokenizer.json").is_file()
    metrics = json.loads((showo_run / "metrics.json").read_text())
    assert metrics["grpo"]["trained_parameters"] > 0 and metrics["grpo"]["prompts"] > 10


@pytest.mark.slow
@pytest.mark.claims  # README: Show-o's joint decoding trains
def test_joint_decoding_runs_too(tmp_path):
    out = tmp_path / "joint"
    proc = run_cli("fit", "recipes/showo-tiny/sft_grpo.yaml", "decoding=joint", "trainer.max_steps=2",
                   "data.batch_size=4", "grpo.max_steps=1", "grpo.prompts_per_step=1", "grpo.group_size=2",
                   "grpo.sample_steps=3", "grpo.minibatch_size=2", f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = read_run(out)
    assert run.data.params["decoding"] == "joint" and "grpo/ratio_mean" in run.data.metrics
