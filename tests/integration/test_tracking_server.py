"""`cmrp fit` against a real `mlflow server` on 127.0.0.1, with MLflow's telemetry on (as a user's machine has
it; pytest and CI variables turn it off, so they are removed from the runs' environment).

- soak: many short fits in a row all end FINISHED with their params and metrics (telemetry's thread sets and
  unsets a variable while params are logged: iterating os.environ then crashed 4 runs in 5);
- a fit interrupted with Ctrl-C (SIGINT) mid-run ends KILLED on the server, one that fails ends FAILED —
  never RUNNING.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import CMRP, ROOT
from tests.waiting import scaled

TINY = ["recipes/sandbox/sft.yaml", "data.batch_size=2", "data.max_text_tokens=32", "eval.max_items=2",
        "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2", "checkpoint.every_n_steps=0"]
# variables that make MLflow turn its telemetry off (mlflow.telemetry.utils), or that pytest sets
_TELEMETRY_OFF = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "JENKINS_URL", "TRAVIS",
                  "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                  "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",
                  "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")


def telemetry_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _TELEMETRY_OFF}


def start_server(folder: Path, deadline_s: float = 300) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on port 0 (the OS picks a free port: no race with other processes); the port is read
    from uvicorn's start line, then /health is polled until it answers."""
    log = (folder / "server.log").open("w")
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", "0", "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + scaled(deadline_s)
    port = None
    while port is None:
        assert proc.poll() is None, f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "mlflow server did not report its port"
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", (folder / "server.log").read_text())
        port = int(found.group(1)) if found else None
        time.sleep(0.5)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)  # noqa: S310 - the local test server
            return proc, url
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers (its own session, started above)
        proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    proc, url = start_server(folder)
    yield url
    stop_server(proc)


def runs_by_name(url: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("cmrp")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])} if experiment else {}


def test_the_runs_have_telemetry_on():
    code = "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"
    out = subprocess.run([sys.executable, "-c", code], env=telemetry_env(), capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow  # ten CLI fits: about 5 minutes on a loaded 2-core machine
def test_soak_ten_fits_against_a_real_server_all_finish(server, tmp_path):
    names = [f"soak-{i}" for i in range(10)]
    for i, name in enumerate(names):
        proc = subprocess.run([CMRP, "fit", *TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                               f"seed={i}", f"name={name}", f"tracking.tracking_uri={server}",
                               f"output_dir={tmp_path / name}"], cwd=ROOT, env=telemetry_env(), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        assert "cmrp: tracking:" not in proc.stderr, proc.stderr[-2000:]  # logged online, never fell back
    runs = runs_by_name(server)
    assert set(names) <= set(runs)
    for name in names:
        run = runs[name]
        assert run.info.status == "FINISHED", (name, run.info.status)
        assert run.data.params["name"] == name and run.data.params["trainer.max_steps"] == "2"
        assert {"train/loss", "eval/before/vqa_mcq_acc", "eval/after/vqa_mcq_acc"} <= set(run.data.metrics)
        assert run.data.tags["cmrp.kind"] == "fit" and run.data.tags["mlflow.user"]


@pytest.mark.slow  # two CLI fits
def test_interrupted_and_failed_fits_are_marked_on_the_server(server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server)
    fit = subprocess.Popen([CMRP, "fit", *TINY, "trainer.max_steps=400", "trainer.log_every_n_steps=1",
                            "name=interrupted", f"tracking.tracking_uri={server}", f"output_dir={tmp_path / 'i'}"],
                           cwd=ROOT, env=telemetry_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:  # interrupt once the run is training (a few steps logged)
            assert fit.poll() is None, fit.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            run = runs_by_name(server).get("interrupted")
            if run is not None and len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3:
                break
            time.sleep(0.3)
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
        fit.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = fit.communicate(timeout=300)
    finally:
        if fit.poll() is None:
            fit.kill()
            fit.wait()
    assert fit.returncode == 130 and "cmrp fit: interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    proc = subprocess.run([CMRP, "fit", *TINY, "trainer.max_steps=30", "sft.optimizer.lr=1e30",
                           "sft.optimizer.warmup_steps=0", "trainer.gradient_clip_val=null", "nonfinite_stop_after=2",
                           "name=diverged", f"tracking.tracking_uri={server}", f"output_dir={tmp_path / 'd'}"],
                          cwd=ROOT, env=telemetry_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "nonfinite_stop_after: 2" in proc.stderr, proc.stderr[-3000:]
    assert runs_by_name(server)["diverged"].info.status == "FAILED"
