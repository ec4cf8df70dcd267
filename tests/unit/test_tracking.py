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
    done = sync_pending(tmp_path, target)
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
    done = sync_pending(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert done["metrics"] == 1 and done["damaged_lines"] == 1


def test_redact_text_hides_env_secrets_and_uri_passwords(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdefgh")
    monkeypatch.setenv("MAX_TOKENS_LIMIT_X", "not-a-secret-value")  # words, not substrings: not a secret name
    assert redact_text("key sk-live-abcdefgh at https://u:p4ss@h/x") == "key *** at https://u:***@h/x"
    assert redact_text("not-a-secret-value") == "not-a-secret-value"
