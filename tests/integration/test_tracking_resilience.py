"""Bad conditions never lose a run: NaN losses are skipped and counted, an unreachable or dying tracking
server leaves a local record that `cmrp tracking sync` uploads later, and secrets never reach disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.test_cli_fit import CMRP, ROOT, run_cli
from tests.integration.test_tracking_server import start_server, stop_server
from tests.waiting import scaled, wait_until

TINY = ["recipes/sandbox/sft.yaml", "data.batch_size=2", "data.max_text_tokens=32", "eval.max_items=4",
        "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2", "checkpoint.every_n_steps=0"]
WARNING = "cmrp: tracking: cannot log to"


@pytest.fixture
def refused_port():
    """A port bound here but never listened on: connections to it are refused for as long as the test runs
    (a port found free and released could be taken by another process meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def metric_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}


def pending_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "tracking" / "pending.jsonl").read_text().splitlines()]


def test_nan_losses_are_skipped_and_an_unreachable_server_defers_logging(tmp_path, monkeypatch, capsys,
                                                                        refused_port):
    """In-process run: the backbone's loss is NaN at two steps; the tracking URI points at a closed port."""
    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.config import load_recipe
    from cmrp.tracking import sync_pending
    from cmrp.training.fit import run_fit

    real_losses = BagelAdapter.losses
    calls = {"n": 0}

    def losses(self, batch, **kwargs):
        out = real_losses(self, batch, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # steps 3 and 4: a NaN loss
            out = {**out, "text": out["text"] * float("nan")}
        return out

    monkeypatch.setattr(BagelAdapter, "losses", losses)
    out = tmp_path / "run"
    uri = f"http://127.0.0.1:{refused_port}"
    cfg = load_recipe(TINY[0], [*TINY[1:], "trainer.max_steps=8", "trainer.log_every_n_steps=1",
                                "nonfinite_stop_after=3", f"tracking.tracking_uri={uri}", f"output_dir={out}"])
    result = run_fit(cfg)
    printed = capsys.readouterr()
    assert printed.err.count(WARNING) == 1 and "cmrp tracking sync" in printed.err
    assert printed.out.count("non-finite loss or gradients, update skipped") == 2
    assert result.tracking_pending == out / "tracking" / "pending.jsonl" and result.run_id == ""
    records = pending_records(out)
    assert records[0]["op"] == "run" and records[-1] == {"op": "status", "status": "FINISHED"}
    steps = {r["step"]: r["metrics"] for r in records if r["op"] == "metrics" and "train/loss" in r["metrics"]}
    assert sorted(steps) == list(range(8))
    assert [s for s, m in steps.items() if m["train/loss"] == "nan"] == [2, 3]  # NaN at steps 3, 4 (strict JSON)
    assert steps[7]["train/nonfinite_steps"] == 2
    assert {Path(r["path"]).name for r in records if r["op"] == "artifact"} == {"recipe.yaml", "metrics.json",
                                                                                "samples.png"}
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint" / "backbone" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())

    # later: upload to a tracking store (here a sqlite database)
    target = f"sqlite:///{tmp_path / 'later.db'}"
    [done] = sync_pending(out, target)
    assert done["metrics"] >= 8 * 3 and done["artifacts"] == 3 and done["status"] == "FINISHED"
    assert set(metric_history(target, done["run_id"], "train/loss")) == set(range(8))
    assert metric_history(target, done["run_id"], "train/nonfinite_steps")[7] == 2
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=target).get_run(done["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "8"
    assert not (out / "tracking" / "pending.jsonl").exists()  # archived: a second sync has nothing to send
    proc = run_cli("tracking", "sync", str(out), "--tracking-uri", target)
    assert proc.returncode == 2 and "nothing waiting to be uploaded" in proc.stderr


def test_diverging_run_stops_with_a_clear_message(tmp_path):
    proc = run_cli("fit", *TINY, "trainer.max_steps=30", "sft.optimizer.lr=1e30", "sft.optimizer.warmup_steps=0",
                   "trainer.gradient_clip_val=null", "nonfinite_stop_after=3", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sft: 3 steps in a row" in proc.stderr and "nonfinite_stop_after: 3" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.claims  # docs/runs.md: a run outlives its tracking server; `cmrp tracking sync` uploads the rest
def test_tracking_server_killed_mid_run_then_synced_to_a_restarted_server(tmp_path):
    from mlflow.tracking import MlflowClient

    server, uri = start_server(tmp_path)
    out = tmp_path / "run"
    try:
        fit = subprocess.Popen([CMRP, "fit", *TINY, "trainer.max_steps=60", "trainer.log_every_n_steps=1",
                                f"tracking.tracking_uri={uri}", f"output_dir={out}"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(tracking_uri=uri)

        def logging_run():  # the run, once the server has a few steps of its train/loss
            exp = client.get_experiment_by_name("cmrp")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
                return runs[0]
            return None

        run_id = wait_until(logging_run, 300, "3 steps of train/loss on the server", fit).info.run_id
        stop_server(server)
        stdout, stderr = fit.communicate(timeout=scaled(600))
    finally:
        stop_server(server)
    assert fit.returncode == 0, stderr[-3000:]
    assert stderr.count(WARNING) == 1
    assert "not logged:" in stdout and f"cmrp tracking sync {out}" in stdout
    records = pending_records(out)
    assert records[0]["run_id"] == run_id
    offline_steps = {r["step"] for r in records if r["op"] == "metrics" and "train/loss" in r["metrics"]}
    assert offline_steps and max(offline_steps) == 59

    server, uri = start_server(tmp_path)  # the server is back (same database, another port)
    try:
        proc = run_cli("tracking", "sync", str(out), "--tracking-uri", uri)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"uploaded to run {run_id}" in proc.stdout
        history = metric_history(uri, run_id, "train/loss")
        assert set(history) == set(range(60))  # online steps + uploaded ones: nothing lost
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        assert run.info.status == "FINISHED" and "eval/after/vqa_mcq_acc" in run.data.metrics
    finally:
        stop_server(server)


def test_secrets_in_the_environment_never_reach_mlflow_or_the_output_dir(tmp_path):
    secrets = {"OPENAI_API_KEY": "sk-test-0123456789abcdefSECRET", "CMRP_JUDGE_API_KEY": "judge-key-9876543210xyz",
               "HF_TOKEN": "hf_tokenvalue_ABCDEFGHIJ"}
    out = tmp_path / "run"
    env = {**os.environ, **secrets}
    # the key used by the run: interpolated from the environment into recipe values
    proc = subprocess.run(
        [CMRP, "fit", *TINY, "trainer.max_steps=2", "checkpoint.every_n_steps=1",
         "tracking.run_name=run-${oc.env:OPENAI_API_KEY}", "name=n-${oc.env:CMRP_JUDGE_API_KEY}",
         "tracking.experiment=exp-${oc.env:HF_TOKEN}", f"output_dir={out}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "manifest.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} found in {path}"
    for value in secrets.values():
        assert value not in proc.stdout and value not in proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("exp-***").experiment_id])[0]  # the experiment too
    assert run.data.tags["mlflow.runName"] == "run-***" and run.data.params["name"] == "n-***"


def test_sigterm_just_after_the_mlflow_run_is_made_ends_it_killed(tmp_path, monkeypatch):
    """A scheduler's SIGTERM that lands as `cmrp fit` has just made its MLflow run (before any stage) ends that
    run KILLED: the signal is an interrupt from the moment the run can exist, never the default exit that
    leaves it RUNNING. Without that, the test's own handler below sees the signal and the run stays RUNNING."""
    import signal

    from mlflow.tracking import MlflowClient

    from cmrp.config import load_recipe
    from cmrp.training import fit

    made = {}

    def make_logger_then_sigterm(*args, **kwargs):
        made["logger"] = logger = real_make_logger(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return logger

    class OutsideTheWindow(Exception):
        pass

    def outside(signum, frame):
        raise OutsideTheWindow("SIGTERM arrived while cmrp fit did not treat it as an interrupt")

    real_make_logger = fit.make_logger
    monkeypatch.setattr(fit, "make_logger", make_logger_then_sigterm)
    previous = signal.signal(signal.SIGTERM, outside)
    out = tmp_path / "run"
    cfg = load_recipe(TINY[0], [*TINY[1:], "trainer.max_steps=2", f"output_dir={out}"])
    try:
        with pytest.raises(KeyboardInterrupt):
            fit.run_fit(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger = made["logger"]
    run = MlflowClient(tracking_uri=logger.display_uri).get_run(logger.run_id)
    assert run.info.status == "KILLED"


def test_ctrl_c_inside_a_stage_ends_the_run_killed_and_hands_ctrl_c_back(tmp_path, monkeypatch):
    """Ctrl-C during SFT: `run_fit` raises KeyboardInterrupt (not Lightning's SystemExit), the MLflow run ends
    KILLED, and the caller's Ctrl-C handler is in place again (Lightning's graceful shutdown sets SIGINT to
    "ignore"; its signal connector's teardown puts it back): a notebook or sweep calling run_fit still hears
    the next Ctrl-C."""
    import signal

    from mlflow.tracking import MlflowClient

    from cmrp.config import load_recipe
    from cmrp.training import fit
    from cmrp.training.sft import UnifiedSFTModule

    real_step = UnifiedSFTModule.training_step

    def step_then_ctrl_c(self, batch, batch_idx):
        if batch_idx == 1:
            raise KeyboardInterrupt
        return real_step(self, batch, batch_idx)

    made = {}
    real_make_logger = fit.make_logger

    def remember_logger(*args, **kwargs):
        made["logger"] = logger = real_make_logger(*args, **kwargs)
        return logger

    monkeypatch.setattr(UnifiedSFTModule, "training_step", step_then_ctrl_c)
    monkeypatch.setattr(fit, "make_logger", remember_logger)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = load_recipe(TINY[0], [*TINY[1:], "trainer.max_steps=4", f"output_dir={tmp_path / 'run'}"])
    try:
        with pytest.raises(KeyboardInterrupt):
            fit.run_fit(cfg)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    logger = made["logger"]
    assert MlflowClient(tracking_uri=logger.display_uri).get_run(logger.run_id).info.status == "KILLED"
