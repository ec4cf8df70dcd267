"""TrackingLogger: one warning, everything kept locally, secrets hidden, and the upload later."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

from cmrp.tracking import make_logger, redact_text, sync_pending


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_warns_once_and_keeps_every_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("CMRP_JUDGE_API_KEY", "judge-secret-123456")
    uri = f"http://alice:pw-hunter2@127.0.0.1:{_closed_port()}"
    logger = make_logger(SimpleNamespace(tracking_uri=uri, experiment="exp", run_name=None), tmp_path, "r1")
    logger.log_hyperparams({"a": 1, "api_key": "sk-abc", "note": "judge-secret-123456 used"})
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": 0}, step=step)
    (tmp_path / "m.json").write_text("{}")
    logger.log_artifact(tmp_path / "m.json")
    logger.finalize("success")  # Lightning's end of a stage: not the end of the run
    logger.close()
    err = capsys.readouterr().err
    assert err.count("cmrp: tracking: cannot log to") == 1 and "pw-hunter2" not in err and "alice:***@" in err
    assert logger.offline and logger.run_id is None
    text = (tmp_path / "tracking" / "pending.jsonl").read_text()
    assert "sk-abc" not in text and "judge-secret-123456" not in text and "pw-hunter2" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["op"] for r in records] == ["run", "params", "metrics", "metrics", "metrics", "artifact", "status"]
    assert records[1]["params"] == {"a": "1", "api_key": "***", "note": "*** used"}

    target = f"sqlite:///{tmp_path / 'db.sqlite'}"
    [done] = sync_pending(tmp_path, target)
    # Lightning's `epoch` (always 0: each stage is one epoch) is not logged
    assert (done["params"], done["metrics"], done["artifacts"], done["status"]) == (3, 3, 1, "FINISHED")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=target)
    history = client.get_metric_history(done["run_id"], "train/loss")
    assert sorted((m.step, round(m.value, 4)) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    run = client.get_run(done["run_id"])
    assert run.info.run_name == "r1" and client.get_experiment(run.info.experiment_id).name == "exp"


def test_damaged_last_line_is_skipped(tmp_path):
    pending = tmp_path / "tracking" / "pending.jsonl"
    pending.parent.mkdir()
    pending.write_text(json.dumps({"op": "run", "run_id": None, "experiment": "e", "run_name": "x",
                                   "tracking_uri": "sqlite:///nowhere"}) + "\n"
                       + json.dumps({"op": "metrics", "step": 4, "timestamp": 1, "metrics": {"m": 2.0}}) + "\n"
                       + '{"op": "metr')
    [done] = sync_pending(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert done["metrics"] == 1 and done["damaged_lines"] == 1


def test_redact_text_hides_env_secrets_and_uri_passwords(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdefgh")
    monkeypatch.setenv("MAX_TOKENS_LIMIT_X", "not-a-secret-value")  # words, not substrings: not a secret name
    assert redact_text("key sk-live-abcdefgh at https://u:p4ss@h/x") == "key *** at https://u:***@h/x"
    assert redact_text("not-a-secret-value") == "not-a-secret-value"


def test_redaction_never_walks_an_environment_another_thread_changes(monkeypatch):
    """MLflow's telemetry thread sets and unsets a variable at any time; reading os.environ key by key
    while that happens raised KeyError in the middle of logging params. Redaction snapshots it in one step."""
    import os
    import threading

    from cmrp.config.params import Redactor, environ_snapshot, redact_secrets

    monkeypatch.setenv("CMRP_TEST_API_KEY", "sk-race-0123456789")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_CMRP_CHURN"] = "x"
            os.environ.pop("_CMRP_CHURN", None)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(3000):
            assert redact_secrets({"a": "sk-race-0123456789"}) == {"a": "***"}
            assert "CMRP_TEST_API_KEY" in environ_snapshot()
    finally:
        stop.set()
        worker.join()
    # one snapshot per run: a redactor made before a secret appears does not see it (by design)
    before = Redactor.from_environ()
    monkeypatch.setenv("CMRP_LATE_TOKEN", "late-secret-value-42")
    assert before.text("late-secret-value-42") == "late-secret-value-42"
    assert Redactor.from_environ().text("late-secret-value-42") == "***"


def _cfg(uri, experiment="exp"):
    return SimpleNamespace(tracking_uri=uri, experiment=experiment, run_name=None)


def test_secret_experiment_name_is_redacted_in_mlflow_and_pending(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue_XYZ123")
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    logger = make_logger(_cfg(db, "exp-hf_secretvalue_XYZ123"), tmp_path / "a", "r")
    logger.close()
    assert MlflowClient(tracking_uri=db).get_experiment_by_name("exp-***") is not None
    offline = make_logger(_cfg(f"http://127.0.0.1:{_closed_port()}", "exp-hf_secretvalue_XYZ123"), tmp_path / "b", "r")
    offline.close()
    text = (tmp_path / "b" / "tracking" / "pending.jsonl").read_text()
    assert "hf_secretvalue_XYZ123" not in text and '"experiment": "exp-***"' in text


def test_hidden_password_uri_goes_offline_with_what_to_do(tmp_path, capsys):
    from cmrp.tracking import TrackingLogger

    logger = TrackingLogger("http://alice:***@127.0.0.1:1", "exp", "eval", tmp_path)
    logger.close()
    err = capsys.readouterr().err
    assert logger.offline and "--tracking-uri" in err and "cmrp tracking sync" in err


def test_stage_offsets_and_a_resumed_run_log_each_step_once(tmp_path):
    """Steps continue across stages; a resumed run replays steps it logged before: they are not logged again."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = make_logger(_cfg(db), tmp_path, "r")
    for step in range(6):  # stage 1: steps 0..5, then the process dies (no close)
        first.log_metrics({"train/loss": float(step), "epoch": 0}, step=step)
    resumed = make_logger(_cfg(db), tmp_path, "r", run_id=first.run_id, resume=True)
    for step in range(3, 8):  # the checkpoint was at step 3: 3..5 are replayed
        resumed.log_metrics({"train/loss": float(step)}, step=step)
    resumed.step_offset = 8  # stage 2 starts after stage 1's 8 steps
    for step in range(2):
        resumed.log_metrics({"reward/total": 0.5 + step}, step=step)
    resumed.close()
    client = MlflowClient(tracking_uri=db)
    loss = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")]
    assert sorted(loss) == [(s, float(s)) for s in range(8)]  # one row per step
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "reward/total")) == [8, 9]
    assert "epoch" not in client.get_run(first.run_id).data.metrics
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_sync_skips_rows_the_run_already_has(tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    logger = make_logger(_cfg(db), tmp_path, "r")
    for step in range(4):
        logger.log_metrics({"m": float(step)}, step=step)
    pending = tmp_path / "tracking" / "pending.jsonl"  # the server died; the resumed run replayed from step 2
    rows = [{"op": "run", "run_id": logger.run_id, "experiment": "exp", "run_name": "r", "tracking_uri": db}]
    rows += [{"op": "metrics", "step": s, "timestamp": 1, "metrics": {"m": float(s)}} for s in (2, 3, 4, 5, 5)]
    pending.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [done] = sync_pending(tmp_path)
    assert done["metrics"] == 2  # steps 4 and 5, once each
    history = MlflowClient(tracking_uri=db).get_metric_history(logger.run_id, "m")
    assert sorted(m.step for m in history) == list(range(6))


def test_runs_end_failed_or_killed_never_running(tmp_path):
    import pytest
    from mlflow.tracking import MlflowClient

    from cmrp.tracking import tracked_run

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    client = MlflowClient(tracking_uri=db)
    for error, status in ((ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        logger = make_logger(_cfg(db), tmp_path / status, "r")
        with pytest.raises(type(error)), tracked_run(logger):
            raise error
        assert client.get_run(logger.run_id).info.status == status


def test_browse_hints():
    from cmrp.tracking import browse_hint

    remote = browse_hint("https://bob:***@mlflow.example.org:8443/base", "3", "abc")
    assert remote == "open https://mlflow.example.org:8443/base/#/experiments/3/runs/abc"
    local = browse_hint("sqlite:////runs/x/mlflow.db", "1", "abc")
    assert local.startswith("mlflow ui --backend-store-uri sqlite:////runs/x/mlflow.db ")
    assert local.endswith("http://127.0.0.1:5000/#/experiments/1/runs/abc")


def test_a_run_interrupted_as_it_is_made_ends_killed(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM right after MLflow made the run (before any `tracked_run` holds it) ends it KILLED."""
    import signal

    import pytest
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    made = []
    create_run = MlflowClient.create_run

    def create_then_interrupt(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        made.append(run.info.run_id)
        # a real Ctrl-C, as the run comes back from the store, raised in this thread
        signal.raise_signal(signal.SIGINT)
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_then_interrupt)
    # Python's own Ctrl-C handler, as in `cmrp fit`: in the whole suite an earlier test (in tests/integration or
    # tests/faults, not yet pinned down) leaves another handler installed, under which no KeyboardInterrupt comes
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            make_logger(_cfg(db), tmp_path / "r", "r")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert MlflowClient(tracking_uri=db).get_run(made[0]).info.status == "KILLED"
