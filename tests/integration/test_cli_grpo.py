"""`cmrp fit` with stages [sft, grpo] through the real CLI; GRPO metrics read back from MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.test_cli_fit import FAST_EVAL, read_run, run_cli

GRPO_FAST = ["trainer.max_steps=5", "grpo.max_steps=2", "grpo.group_size=4", "grpo.sample_steps=4",
             "grpo.minibatch_size=4"]


@pytest.fixture(scope="module")
def sft_grpo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo") / "run"
    proc = run_cli("fit", "recipes/bagel-tiny/sft_grpo.yaml", *GRPO_FAST, f"output_dir={out}", *FAST_EVAL,
                   "grpo.heldout_prompts=3", "grpo.heldout_images=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grpo reward:" in proc.stdout
    return out


def test_sft_then_grpo_logs_every_metric(sft_grpo_run):
    client, run = read_run(sft_grpo_run)
    metrics = set(run.data.metrics)
    assert "train/loss" in metrics  # the SFT stage ran
    expected = {
        "reward/total", "reward/total_std", "reward/vqa_consistency", "reward/vqa_consistency_std",
        "reward/lpips_diversity", "reward/trainset_penalty", "grpo/zero_std_ratio", "grpo/clip_frac",
        "grpo/approx_kl", "grpo/ratio_mean", "grpo/ratio_std", "grpo/grad_norm", "grpo/time_sample_s",
        "grpo/time_reward_s", "grpo/time_train_s", "val/reward/total",
    }
    assert expected <= metrics, expected - metrics
    history = client.get_metric_history(run.info.run_id, "grpo/ratio_mean")
    assert len(history) == 2
    # one update per iteration on fresh samples: on-policy ratios are 1 up to float error
    assert all(abs(m.value - 1.0) < 1e-3 for m in history)
    assert run.data.params["rewards.name"] == "sandbox" and run.data.params["grpo.group_size"] == "4"
    assert run.data.params["rewards.terms.clip_similarity.weight"] == "0.45"  # the preset in full


def test_grpo_result_in_metrics_file(sft_grpo_run):
    metrics = json.loads((sft_grpo_run / "metrics.json").read_text())
    grpo = metrics["grpo"]
    assert grpo["prompts"] > 100 and grpo["trained_parameters"] > 0
    # measured on grpo.heldout_prompts x heldout_images, not the sample grid's 2 x 2 (FAST_EVAL)
    assert (grpo["heldout_prompts"], grpo["heldout_images"]) == (3, 3)
    for when in ("before", "after"):
        terms = grpo[f"heldout_reward_{when}"]
        assert {"total", "vqa_consistency", "lpips_diversity", "trainset_penalty"} <= set(terms)
        assert 0.0 <= terms["vqa_consistency"] <= 1.0


def test_grpo_from_an_sft_checkpoint_changes_only_the_generation_expert(sft_grpo_run, tmp_path):
    out = tmp_path / "grpo-only"
    proc = run_cli("fit", "recipes/bagel-tiny/grpo.yaml", f"init_from={sft_grpo_run}", *GRPO_FAST,
                   f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = load_file(str(sft_grpo_run / "checkpoint" / "backbone" / "model.safetensors"))
    end = load_file(str(out / "checkpoint" / "backbone" / "model.safetensors"))
    changed = {k for k in start if not (start[k] == end[k]).all()}
    assert changed, "GRPO changed nothing"
    generation = ("_moe_gen", "time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")
    assert all(any(g in k for g in generation) for k in changed), sorted(changed)[:5]


def test_init_from_a_folder_without_checkpoint_fails_clearly(tmp_path):
    proc = run_cli("fit", "recipes/bagel-tiny/grpo.yaml", f"init_from={tmp_path}", f"output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2
    assert "init_from" in proc.stderr and "Traceback" not in proc.stderr
