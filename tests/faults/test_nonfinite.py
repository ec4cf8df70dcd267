"""Issue 20, item 8: GRPO handles non-finite updates as SFT does — each skipped one is reported with its own
iteration number and counted in MLflow (`grpo/nonfinite_steps`) — and a stage in which every update was
skipped (with the stop after N in a row disabled) ends the run with exit status 2 and the MLflow run FAILED."""

from __future__ import annotations

import re

from tests.faults._helpers import TINY, main

GRPO = ["quickstart", *TINY[1:], "stages=[grpo]", "grpo.max_steps=3", "grpo.group_size=2", "grpo.prompts_per_step=1",
        "grpo.sample_steps=2", "grpo.window_size=1", "grpo.minibatch_size=2", "grpo.heldout_prompts=1",
        "grpo.heldout_images=2", "checkpoint.every_n_steps=1",
        "nonfinite_stop_after=0"]


def _run(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cmrp").experiment_id])
    return client, run


def test_grpo_numbers_skipped_iterations_counts_them_and_fails_when_all_were_skipped(tmp_path, capsys, monkeypatch):
    from cmrp.backbones.bagel import BagelAdapter

    real = BagelAdapter.rollout_logprob

    def nan_logprob(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(BagelAdapter, "rollout_logprob", nan_logprob)
    out = tmp_path / "run"
    rc, stdout, stderr = main(capsys, "fit", *GRPO, f"output_dir={out}")
    assert rc == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "cmrp fit: error: grpo: every one of its 3 updates had a NaN/inf loss or gradients and was skipped, so no "
        "weight changed. Lower the learning rate (grpo.optimizer.lr) or check the data.")
    skipped = re.findall(r"cmrp: grpo iteration (\d+): non-finite loss or gradients, update skipped", stdout)
    assert skipped == ["1", "2", "3"]
    client, run = _run(out)
    assert run.info.status == "FAILED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grpo/nonfinite_steps")}
    assert sorted(history.values()) == [1.0, 2.0, 3.0]
    assert not (out / "metrics.json").exists() and not (out / "resume" / "00-grpo-done").exists()


def test_sft_fails_when_every_step_was_skipped(tmp_path, capsys, monkeypatch):
    from cmrp.backbones.bagel import BagelAdapter

    real = BagelAdapter.losses

    def nan_losses(self, batch, **kwargs):
        losses = real(self, batch, **kwargs)
        return {**losses, "text": losses["text"] * float("nan")}

    monkeypatch.setattr(BagelAdapter, "losses", nan_losses)
    out = tmp_path / "run"
    rc, stdout, stderr = main(capsys, "fit", *TINY, "trainer.max_steps=3", "nonfinite_stop_after=0",
                              "checkpoint.every_n_steps=0", f"output_dir={out}")
    assert rc == 2 and "Traceback" not in stderr
    assert "cmrp fit: error: sft: every one of its 3 updates had a NaN/inf loss" in stderr.strip().splitlines()[-1]
    assert re.findall(r"cmrp: sft step (\d+): non-finite", stdout) == ["1", "2", "3"]
    assert _run(out)[1].info.status == "FAILED"


def test_the_stop_after_n_in_a_row_names_grpo_iterations(tmp_path, capsys, monkeypatch):
    from cmrp.backbones.bagel import BagelAdapter

    real = BagelAdapter.rollout_logprob
    monkeypatch.setattr(BagelAdapter, "rollout_logprob",
                        lambda self, *a, **k: (lambda o: (o[0] * float("nan"), *o[1:]))(real(self, *a, **k)))
    out = tmp_path / "run"
    rc, _, stderr = main(capsys, "fit", *GRPO, "nonfinite_stop_after=2", f"output_dir={out}")
    assert rc == 2
    assert "grpo: 2 steps in a row (up to iteration 2)" in stderr.strip().splitlines()[-1]
    assert _run(out)[1].info.status == "FAILED"
