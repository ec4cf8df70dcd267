"""MLflow tracking: an embedded sqlite database by default, any tracking URI otherwise.

A tracking server that is unreachable at the start, or fails mid-run, never stops training: the problem
is reported once, and from then on everything the run logs (params, metrics, artifacts, the final status)
is appended to `<output_dir>/tracking/pending.jsonl`. `cmrp tracking sync OUTPUT_DIR` uploads it later.
Every string that reaches MLflow or that file is passed through secret redaction first.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from cmrp.errors import CmrpError
from cmrp.jsonio import dumps

__all__ = ["TrackingLogger", "default_tracking_uri", "make_logger", "pending_file", "redact_text", "sync_pending"]

PENDING = Path("tracking") / "pending.jsonl"
# fail fast instead of MLflow's default of minutes of retries per call; users may still set these
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def pending_file(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / PENDING


def redact_text(text: str) -> str:
    """`text` with URI passwords and the values of secret environment variables (API keys, tokens) hidden."""
    from cmrp.config.params import redact_secrets

    return redact_secrets({"text": str(text)})["text"]


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


class TrackingLogger:
    """A Lightning logger over `MlflowClient` that survives the tracking server: see the module docstring.
    Only rank 0 talks to MLflow; other ranks' calls do nothing."""

    def __init__(self, uri: str, experiment: str, run_name: str, output_dir: Path, *, run_id: str | None = None,
                 artifact_location: str | None = None, rank: int = 0):
        self.tracking_uri = uri
        self.experiment_name = experiment
        self.run_name = redact_text(run_name)
        self.output_dir = output_dir
        self.pending = pending_file(output_dir)
        self.run_id: str | None = run_id
        self.offline = False
        self.enabled = rank == 0
        self._client = None
        self._artifact_location = artifact_location
        self._append_failed = False
        if not self.enabled:
            return
        if self.pending.is_file() and self.pending.stat().st_size > 0:
            # a resumed run whose earlier records were never uploaded: keep them in order, in one place
            self.offline = True
            print(f"cmrp: tracking: {self.pending} holds records not yet uploaded; this run keeps logging there. "
                  f"Upload later with: cmrp tracking sync {output_dir}", file=sys.stderr, flush=True)
            return
        try:
            self._connect()
        except Exception as err:  # noqa: BLE001 - any tracking failure: go on offline
            self._go_offline(err)

    # -- Lightning's Logger interface --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.experiment_name

    @property
    def version(self) -> str:
        return self.run_id or "offline"

    @property
    def save_dir(self) -> str:
        return str(self.output_dir)

    @property
    def log_dir(self) -> str:
        return str(self.output_dir)

    @property
    def group_separator(self) -> str:
        return "/"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        from cmrp.config import flatten, redact_secrets

        if not isinstance(params, dict):
            params = vars(params) if hasattr(params, "__dict__") else {}
        flat = {k: redact_text(v)[:6000] for k, v in flatten(redact_secrets(params)).items()}
        if flat:
            self._do({"op": "params", "params": flat}, lambda c: self._log_params(c, flat))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                continue
        if values:
            record = {"op": "metrics", "step": int(step or 0), "timestamp": int(time.time() * 1000),
                      "metrics": values}
            self._do(record, lambda c: self._log_metrics(c, record))

    def log_graph(self, *args: Any, **kwargs: Any) -> None:
        return None

    def save(self) -> None:
        return None

    def finalize(self, status: str = "success") -> None:
        state = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(status, "KILLED")
        self._do({"op": "status", "status": state}, lambda c: c.set_terminated(self.run_id, state))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        return None

    def log_artifact(self, path: str | Path) -> None:
        path = str(Path(path).resolve())
        self._do({"op": "artifact", "path": path}, lambda c: c.log_artifact(self.run_id, path))

    @property
    def experiment(self):
        """The logger itself: `logger.experiment.log_artifact(path)` keeps working offline."""
        return self

    # -- internals ---------------------------------------------------------------------------------------
    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        if _is_remote(self.tracking_uri):
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is not None:  # a resumed run continues its MLflow run
            client.update_run(self.run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(self.experiment_name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                self.experiment_name, artifact_location=self._artifact_location)
            self.run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
        self._client = client

    def _go_offline(self, err: BaseException) -> None:
        self.offline = True
        reason = redact_text(f"{type(err).__name__}: {err}").splitlines()[0][:300]
        print(f"cmrp: tracking: cannot log to {redact_text(self.tracking_uri)} ({reason}). Training goes on; from "
              f"now on params, metrics and artifacts are written to {self.pending}. Upload them later with: "
              f"cmrp tracking sync {self.output_dir}", file=sys.stderr, flush=True)
        self._append({"op": "run", "run_id": self.run_id, "experiment": self.experiment_name,
                      "run_name": self.run_name, "tracking_uri": redact_text(self.tracking_uri),
                      "artifact_location": self._artifact_location})

    def _append(self, record: dict[str, Any]) -> None:
        try:
            self.pending.parent.mkdir(parents=True, exist_ok=True)
            with self.pending.open("a") as f:
                f.write(dumps(_finite_or_text(record), ensure_ascii=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # e.g. a full disk: training still goes on, this is said once
            if not self._append_failed:
                self._append_failed = True
                print(f"cmrp: tracking: cannot write {self.pending} either ({err}); records are dropped until "
                      "it can be written", file=sys.stderr, flush=True)

    def _do(self, record: dict[str, Any], call) -> None:
        if not self.enabled:
            return
        if not self.offline:
            try:
                call(self._client)
                return
            except Exception as err:  # noqa: BLE001 - any tracking failure: go on offline
                self._go_offline(err)
        self._append(record)

    def _log_params(self, client, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i:i + 100])

    def _log_metrics(self, client, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
        for i in range(0, len(items), 1000):
            client.log_batch(self.run_id, metrics=items[i:i + 1000])


_LIGHTNING_CLASS: list[type] = []


def _finite_or_text(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record for the JSON queue: NaN and ±inf as the strings "nan", "inf", "-inf" (strict JSON has no
    such numbers; `float()` reads them back on sync, so the values reach MLflow unchanged)."""
    if record.get("op") != "metrics":
        return record
    return {**record, "metrics": {k: v if math.isfinite(v) else str(v) for k, v in record["metrics"].items()}}


def _lightning_class() -> type:
    """TrackingLogger with Lightning's Logger base, made on first use (`import cmrp.tracking` stays light)."""
    if not _LIGHTNING_CLASS:
        from lightning.pytorch.loggers.logger import Logger

        _LIGHTNING_CLASS.append(type("CmrpTrackingLogger", (TrackingLogger, Logger), {}))
    return _LIGHTNING_CLASS[0]


def make_logger(tracking: Any, output_dir: str | Path, run_name: str, run_id: str | None = None):
    """A Lightning logger to MLflow; artifacts live beside the database in the output directory."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri or default_tracking_uri(output_dir)
    artifact_location = None if _is_remote(uri) else (output_dir / "mlartifacts").as_uri()
    return _lightning_class()(uri, tracking.experiment, tracking.run_name or run_name, output_dir, run_id=run_id,
                              artifact_location=artifact_location, rank=getattr(rank_zero_only, "rank", 0))


# -- cmrp tracking sync ------------------------------------------------------------------------------------
def _read_pending(path: Path) -> tuple[list[dict[str, Any]], int]:
    records, damaged = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            damaged += 1  # e.g. a line cut short by a crash
            continue
        if isinstance(record, dict) and "op" in record:
            records.append(record)
        else:
            damaged += 1
    return records, damaged


def sync_pending(output_dir: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Upload `<output_dir>/tracking/pending.jsonl` to MLflow, then rename it `synced-<time>.jsonl`."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    output_dir = Path(output_dir).expanduser().resolve()
    path = pending_file(output_dir)
    if not path.is_file():
        raise CmrpError(f"{path}: no such file — {output_dir} has nothing waiting to be uploaded "
                        "(a run writes it only when its tracking server failed)")
    records, damaged = _read_pending(path)
    header = next((r for r in records if r["op"] == "run"), {})
    uri = tracking_uri or header.get("tracking_uri") or default_tracking_uri(output_dir)
    if "***" in uri:
        raise CmrpError(f"{path}: the recorded tracking URI has a hidden password; pass it with --tracking-uri")
    if _is_remote(uri):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = None
        if header.get("run_id"):
            try:
                run = client.get_run(header["run_id"])
            except MlflowException:
                run = None
        if run is None:
            name = header.get("experiment") or "cmrp"
            exp = client.get_experiment_by_name(name)
            local = header.get("artifact_location") or (output_dir / "mlartifacts").as_uri()
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                name, artifact_location=None if _is_remote(uri) else local)
            run = client.create_run(exp_id, run_name=header.get("run_name"))
        run_id = run.info.run_id
        have = dict(run.data.params)
        params = [Param(k, str(v)) for r in records if r["op"] == "params" for k, v in r["params"].items()
                  if k not in have]
        params = list({p.key: p for p in params}.values())
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        metrics = [Metric(k, float(v), int(r["timestamp"]), int(r["step"])) for r in records if r["op"] == "metrics"
                   for k, v in r["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        artifacts, missing = 0, []
        for r in records:
            if r["op"] == "artifact":
                if Path(r["path"]).is_file():
                    client.log_artifact(run_id, r["path"])
                    artifacts += 1
                else:
                    missing.append(r["path"])
        statuses = [r["status"] for r in records if r["op"] == "status"]
        if statuses:
            client.set_terminated(run_id, statuses[-1])
    except MlflowException as err:
        raise CmrpError(f"cmrp tracking sync: uploading to {redact_text(uri)} failed ({redact_text(str(err))[:300]}); "
                        f"nothing was marked as uploaded, run the command again when the server is up") from None
    except OSError as err:
        raise CmrpError(f"cmrp tracking sync: cannot reach {redact_text(uri)} ({err}); run it again when the server "
                        "is up") from None
    done = path.with_name(f"synced-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
    path.rename(done)
    return {"run_id": run_id, "tracking_uri": redact_text(uri), "params": len(params), "metrics": len(metrics),
            "artifacts": artifacts, "missing_artifacts": missing, "damaged_lines": damaged,
            "status": statuses[-1] if statuses else None, "archived_as": done}
