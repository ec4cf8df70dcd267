"""`cmrp fit recipes/janus-tiny/sft_grpo.yaml` through the real CLI: Unified-SFT then Character-GRPO on the
tiny Janus, read back from MLflow; the saved backbone is a Janus checkpoint in the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import FAST_EVAL, read_run, run_cli

FAST = ["trainer.max_steps=12", "trainer.log_every_n_steps=1", "data.batch_size=8", "sft.optimizer.warmup_steps=0",
        "grpo.max_steps=2", "grpo.group_size=4", "grpo.sample_steps=4", "grpo.minibatch_size=4"]


@pytest.fixture(scope="module")
def janus_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("janus") / "run"
    proc = run_cli("fit", "recipes/janus-tiny/sft_grpo.yaml", *FAST, f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grpo reward:" in proc.stdout and "MLflow run:" in proc.stdout
    return out


def test_sft_loss_falls_and_grpo_metrics_are_tracked(janus_run):
    client, run = read_run(janus_run)
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "janus-tiny" and run.data.params["stages"] == "[sft,grpo]"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first, losses  # SFT trains the tiny Janus (about 8% in 10 steps)
    expected = {"reward/total", "reward/total_std", "reward/vqa_consistency", "reward/lpips_diversity",
                "reward/trainset_penalty", "grpo/zero_std_ratio", "grpo/clip_frac", "grpo/approx_kl",
                "grpo/ratio_mean", "grpo/ratio_std", "grpo/grad_norm", "grpo/time_sample_s", "grpo/time_train_s",
                "val/reward/total"}
    metrics = set(run.data.metrics)
    assert expected <= metrics, expected - metrics
    ratios = client.get_metric_history(run.info.run_id, "grpo/ratio_mean")
    assert len(ratios) == 2 and all(abs(m.value - 1.0) < 0.05 for m in ratios)


def test_checkpoint_is_a_janus_checkpoint(janus_run):
    from transformers import JanusConfig

    from cmrp.backbones.janus import JanusAdapter

    backbone = janus_run / "checkpoint" / "backbone"
    assert JanusConfig.from_pretrained(str(backbone)).model_type == "janus"
    adapter = JanusAdapter.from_pretrained(backbone)
    assert adapter.gen_tokens == 16 and adapter.sampling["cfg_scale"] == 2.0
    metrics = json.loads((janus_run / "metrics.json").read_text())
    assert metrics["grpo"]["prompts"] > 0 and metrics["grpo"]["trained_parameters"] > 0
