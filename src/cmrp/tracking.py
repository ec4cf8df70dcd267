"""MLflow tracking: an embedded sqlite database by default, any tracking URI otherwise.

A tracking server that is unreachable at the start, or fails mid-run, never stops training: the problem
is reported once, and from then on everything the run logs (params, metrics, artifacts, the final status)
is appended to `<output_dir>/tracking/pending.jsonl`. `cmrp tracking sync OUTPUT_DIR` uploads it later.

Redaction is for what is written and shown: the real tracking URI (it may hold a password) is used to
connect and nothing else; the experiment name, run name, tags, params and every message pass through the
run's `Redactor` (its environment read once) before they reach MLflow, a file or the terminal.

Steps: every metric of a run is logged at a run-wide step. A stage's own steps start at 0 in Lightning; the
logger adds the stage's `step_offset`, so a two-stage run's second stage continues where the first ended.
A resumed run replays the steps after its checkpoint: the logger knows the last step already logged per
metric (from the server or the pending file) and does not log those again, so the history has one row per
(metric, step), as an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cmrp import __version__
from cmrp.config import flatten
from cmrp.config.params import REDACTED, Redactor
from cmrp.errors import CmrpError
from cmrp.jsonio import dumps, write_json
from cmrp.resources import git_commit

__all__ = ["RUN_FILE", "TrackingLogger", "browse_hint", "default_tracking_uri", "is_remote", "make_logger",
           "open_tracked_run", "pending_file", "pending_files", "read_run_file", "redact_text", "run_history",
           "run_link", "sync_pending", "tracked_run"]

PENDING = Path("tracking") / "pending.jsonl"
RUN_FILE = Path("tracking") / "run.json"
# fail fast instead of MLflow's default of minutes of retries per call; users may still set these
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_LOCAL_UI = "http://127.0.0.1:5000"
_DROPPED_METRICS = ("epoch",)  # Lightning adds it to every record; each stage is one epoch, so it says nothing


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def pending_file(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / PENDING


def redact_text(text: Any, redactor: Redactor | None = None) -> str:
    """`text` with URI passwords and the values of secret environment variables (API keys, tokens) hidden."""
    return (redactor or Redactor.from_environ()).text(text)


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def _server_base(uri: str) -> str:
    """`https://user:pw@host:5000/prefix` -> `https://host:5000/prefix` (no credentials in a link)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI: on the server itself, or on `mlflow ui` started for a local store."""
    if not run_id or not experiment_id:
        return None
    base = _server_base(uri) if uri.startswith(("http://", "https://")) else _LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def browse_hint(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """How to look at a run: a remote server serves its own UI; a local store needs `mlflow ui` on it."""
    link = run_link(uri, experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return f"open {link or _server_base(uri)}"
    if uri.startswith("databricks"):
        return "open the experiment in your Databricks workspace"
    return f"mlflow ui --backend-store-uri {uri}   then open {link or _LOCAL_UI}"


def read_run_file(output_dir: str | Path) -> dict[str, Any]:
    """What a run recorded of its MLflow run (`tracking/run.json`: run id, experiment id and name), or {}."""
    try:
        data = json.loads((Path(output_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_run_file(output_dir: Path, record: dict[str, Any]) -> None:
    try:
        write_json(output_dir / RUN_FILE, record)
    except OSError:
        pass  # informational only (it lets `cmrp eval` link its run); never fails a run


def _http_defaults(uri: str) -> None:
    if is_remote(uri):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def default_tags(kind: str) -> dict[str, str]:
    """The tags Lightning's MLFlowLogger sets (user, source name and type, git commit) plus cmrp's own."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = dict(resolve_tags({"cmrp.kind": kind, "cmrp.version": __version__}))
    commit = git_commit()
    if commit and "mlflow.source.git.commit" not in tags:
        tags["mlflow.source.git.commit"] = commit.removesuffix("+dirty")
        tags["cmrp.git_dirty"] = "true" if commit.endswith("+dirty") else "false"
    if Path(sys.argv[0]).name == "cmrp":  # the console script: name the command, not the launcher's path
        tags["mlflow.source.name"] = " ".join(["cmrp", *sys.argv[1:3]])
    return tags


class TrackingLogger:
    """A Lightning logger over `MlflowClient` that survives the tracking server: see the module docstring.
    Only rank 0 talks to MLflow; other ranks' calls do nothing. End the run with `close` (or `tracked_run`);
    Lightning's own `finalize` calls at the end of each stage are not the end of the run."""

    def __init__(self, uri: str, experiment: str, run_name: str, output_dir: Path, *, run_id: str | None = None,
                 artifact_location: str | None = None, rank: int = 0, tags: dict[str, str] | None = None,
                 redactor: Redactor | None = None, resume: bool = False):
        self.redactor = redactor or Redactor.from_environ()
        self.tracking_uri = uri  # the real one: used to connect, never written or printed
        self.display_uri = self.redactor.text(uri)
        self.experiment_name = self.redactor.text(experiment)
        self.run_name = self.redactor.text(run_name)
        self.tags = {k: self.redactor.text(v) for k, v in (tags or {}).items()}
        self.output_dir = Path(output_dir)
        self.pending = pending_file(output_dir)
        self.run_id: str | None = run_id
        self.experiment_id: str | None = None
        self.offline = False
        self.enabled = rank == 0
        self.step_offset = 0  # added to every step: where the current stage starts in the run
        self.status: str | None = None  # set by close()
        self._last_step: dict[str, int] = {}  # a resumed run: the last step each metric was logged at
        self._client = None
        self._artifact_location = artifact_location
        self._append_failed = False
        if not self.enabled:
            return
        if self.pending.is_file() and self.pending.stat().st_size > 0 and not resume:
            # an earlier run's records, never uploaded: kept aside for `cmrp tracking sync`, not mixed with ours
            kept = self.pending.with_name(f"pending-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.jsonl")
            self.pending.rename(kept)
            print(f"cmrp: tracking: an earlier run's records that were never uploaded are kept as {kept}; "
                  f"cmrp tracking sync {self.output_dir} uploads them", file=sys.stderr, flush=True)
        if self.pending.is_file() and self.pending.stat().st_size > 0:
            # a resumed run whose earlier records were never uploaded: keep them in order, in one place
            self.offline = True
            self._last_step = _last_steps(_read_pending(self.pending)[0])
            print(f"cmrp: tracking: {self.pending} holds records not yet uploaded; this run keeps logging there. "
                  f"Upload later with: cmrp tracking sync {self.output_dir}", file=sys.stderr, flush=True)
            return
        try:
            self._connect()
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM just after the run was made: end it, never leave it RUNNING
            if self.run_id is not None and self._client is not None:
                self.close("KILLED")
            raise
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
        if not isinstance(params, dict):
            params = vars(params) if hasattr(params, "__dict__") else {}
        flat = {k: self.redactor.text(v)[:6000] for k, v in flatten(self.redactor.mapping(params)).items()}
        if flat:
            self._do({"op": "params", "params": flat}, lambda c: self._log_params(c, flat))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """`step` is the stage's own; the run-wide step adds `step_offset`. Steps a resumed run logged
        before its interruption are not logged again."""
        step = int(step or 0) + self.step_offset
        values = {}
        for key, value in metrics.items():
            if key in _DROPPED_METRICS or step <= self._last_step.get(key, -1):
                continue
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                continue
        if values:
            record = {"op": "metrics", "step": step, "timestamp": int(time.time() * 1000), "metrics": values}
            self._do(record, lambda c: self._log_metrics(c, record))

    def log_graph(self, *args: Any, **kwargs: Any) -> None:
        return None

    def save(self) -> None:
        return None

    def finalize(self, status: str = "success") -> None:
        """Lightning calls this when a stage's `Trainer.fit` returns or fails; the run goes on (or its
        owner closes it as FAILED/KILLED), so nothing is marked here."""
        return None

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        return None

    def log_artifact(self, path: str | Path) -> None:
        path = str(Path(path).resolve())
        self._do({"op": "artifact", "path": path}, lambda c: c.log_artifact(self.run_id, path))

    @property
    def experiment(self):
        """The logger itself: `logger.experiment.log_artifact(path)` keeps working offline."""
        return self

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED (once; later calls do nothing)."""
        if self.status is not None:
            return
        self.status = status
        self._do({"op": "status", "status": status}, lambda c: c.set_terminated(self.run_id, status))

    def hint(self) -> str:
        return browse_hint(self.display_uri, self.experiment_id, self.run_id)

    def link(self) -> str | None:
        return run_link(self.display_uri, self.experiment_id, self.run_id)

    # -- internals ---------------------------------------------------------------------------------------
    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        if REDACTED in self.tracking_uri:
            raise CmrpError("its password was hidden when the URI was saved; pass the real URI "
                            "(cmrp eval --tracking-uri, cmrp tracking sync --tracking-uri)")
        _http_defaults(self.tracking_uri)
        client = self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is not None:  # a resumed run continues its MLflow run
            run = client.get_run(self.run_id)
            self.experiment_id = run.info.experiment_id
            self._last_step = _server_last_steps(client, self.run_id, list(run.data.metrics))
            client.update_run(self.run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = exp.experiment_id if exp is not None else client.create_experiment(
                self.experiment_name, artifact_location=self._artifact_location)
            with _interrupts_deferred():  # the run and our record of its id come into being together
                self.run_id = client.create_run(self.experiment_id, run_name=self.run_name,
                                                tags=self.tags).info.run_id
        _write_run_file(self.output_dir, {"run_id": self.run_id, "experiment_id": self.experiment_id,
                                          "experiment": self.experiment_name, "tracking_uri": self.display_uri})

    def _go_offline(self, err: BaseException) -> None:
        self.offline = True
        reason = self.redactor.text(f"{type(err).__name__}: {err}").splitlines()[0][:300]
        print(f"cmrp: tracking: cannot log to {self.display_uri} ({reason}). The work goes on; from now on "
              f"params, metrics and artifacts are written to {self.pending}. Upload them later with: "
              f"cmrp tracking sync {self.output_dir}", file=sys.stderr, flush=True)
        self._append({"op": "run", "run_id": self.run_id, "experiment": self.experiment_name,
                      "run_name": self.run_name, "tracking_uri": self.display_uri,
                      "artifact_location": self._artifact_location, "tags": self.tags})

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


def _server_last_steps(client, run_id: str, keys: list[str]) -> dict[str, int]:
    """The last step each metric of a run holds on the server (its history is logged in step order)."""
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1) for key in keys}


def _last_steps(records: list[dict[str, Any]]) -> dict[str, int]:
    last: dict[str, int] = {}
    for record in records:
        if record["op"] == "metrics":
            for key in record["metrics"]:
                last[key] = max(last.get(key, -1), int(record["step"]))
    return last


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM for the length of the block, then deliver them: a run that MLflow made is
    always known by its id, so an interrupt can end it KILLED rather than leave it RUNNING forever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {kind: signal.signal(kind, lambda signum, frame: caught.append(signum)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
        for signum in caught[:1]:
            signal.raise_signal(signum)  # now handled as it would have been (KeyboardInterrupt, or exit)


@contextlib.contextmanager
def open_tracked_run(make: Callable[[], TrackingLogger]) -> Iterator[TrackingLogger]:
    """`tracked_run` of the logger `make()` returns, Ctrl-C / SIGTERM held while it is made: an interrupt that
    lands as its MLflow run comes into being, or just after, ends that run KILLED like one that lands later
    (a logger made before `tracked_run` is entered leaves a moment in which the run would stay RUNNING)."""
    logger: TrackingLogger | None = None
    try:
        with _interrupts_deferred():
            logger = make()
    except (KeyboardInterrupt, SystemExit):  # delivered as the deferral ends, with the run known
        if logger is not None:
            logger.close("KILLED")
        raise
    with tracked_run(logger):
        yield logger


@contextlib.contextmanager
def tracked_run(logger: TrackingLogger) -> Iterator[TrackingLogger]:
    """Close the logger's run as it ends: FINISHED, KILLED (Ctrl-C, SIGTERM, or Lightning's exit after
    one) or FAILED (any other exception, re-raised) — never left RUNNING."""
    try:
        yield logger
    except (KeyboardInterrupt, SystemExit):
        logger.close("KILLED")
        raise
    except BaseException:
        logger.close("FAILED")
        raise
    logger.close("FINISHED")


def run_history(output_dir: str | Path, uri: str, keys: list[str], redactor: Redactor | None = None
                ) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """`key -> [(step, value)]` of the run a `cmrp fit` wrote in `output_dir`, and where it was read: its
    MLflow run (named in tracking/run.json) or, if the server cannot be reached or never saw the run, the
    records still waiting in pending.jsonl."""
    output_dir = Path(output_dir)
    run_id = read_run_file(output_dir).get("run_id")
    redactor = redactor or Redactor.from_environ()
    history: dict[str, list[tuple[int, float]]] = {}
    if run_id and REDACTED not in uri:
        from mlflow.tracking import MlflowClient

        _http_defaults(uri)
        try:
            client = MlflowClient(tracking_uri=uri)
            for key in keys:
                rows = client.get_metric_history(run_id, key)
                if rows:
                    history[key] = sorted((m.step, m.value) for m in rows)
            return history, f"MLflow run {run_id} ({redactor.text(uri)})"
        except Exception:  # noqa: BLE001 - an unreachable server: fall back to what the run kept locally
            history = {}
    pending = pending_file(output_dir)
    if pending.is_file():
        for record in _read_pending(pending)[0]:
            if record["op"] == "metrics":
                for key, value in record["metrics"].items():
                    if key in keys:
                        history.setdefault(key, []).append((int(record["step"]), float(value)))
        return {k: sorted(dict(v).items()) for k, v in history.items()}, f"{pending} (not uploaded yet)"
    return history, "none (no MLflow run recorded)"


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


def make_logger(tracking: Any, output_dir: str | Path, run_name: str, run_id: str | None = None, *,
                kind: str = "fit", redactor: Redactor | None = None, resume: bool = False):
    """A Lightning logger to MLflow; artifacts live beside the database in the output directory. `resume`:
    this continues an interrupted run (its MLflow run `run_id`, or its pending records)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri or default_tracking_uri(output_dir)
    artifact_location = None if is_remote(uri) else (output_dir / "mlartifacts").as_uri()
    rank = getattr(rank_zero_only, "rank", 0)
    return _lightning_class()(uri, tracking.experiment, tracking.run_name or run_name, output_dir, run_id=run_id,
                              artifact_location=artifact_location, rank=rank,
                              tags=default_tags(kind) if rank == 0 and not resume else None, redactor=redactor,
                              resume=resume)


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


def _new_metrics(records: list[dict[str, Any]], last: dict[str, int]):
    """The metric rows of `records` the run does not hold yet: one per (key, step), none at or before the
    last step the server has for that key (a resumed run replays steps already logged)."""
    from mlflow.entities import Metric

    seen: set[tuple[str, int]] = set()
    rows = []
    for r in records:
        if r["op"] != "metrics":
            continue
        step = int(r["step"])
        for key, value in r["metrics"].items():
            if (key, step) in seen or step <= last.get(key, -1):
                continue
            seen.add((key, step))
            rows.append(Metric(key, float(value), int(r["timestamp"]), step))
    return rows


def pending_files(output_dir: str | Path) -> list[Path]:
    """Records waiting for upload: earlier runs' (kept aside, oldest first), then the latest run's."""
    folder = pending_file(output_dir).parent
    older = sorted(folder.glob("pending-*.jsonl"))
    latest = pending_file(output_dir)
    return [*older, *([latest] if latest.is_file() else [])]


def sync_pending(output_dir: str | Path, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Upload every pending file of `<output_dir>/tracking/` (one MLflow run each), renaming each
    `synced-<time>.jsonl` once uploaded; one summary per file."""
    output_dir = Path(output_dir).expanduser().resolve()
    files = pending_files(output_dir)
    if not files:
        raise CmrpError(f"{pending_file(output_dir)}: no such file — {output_dir} has nothing waiting to be uploaded "
                        "(a run writes it only when its tracking server failed)")
    return [_sync_file(path, output_dir, tracking_uri) for path in files]


def _sync_file(path: Path, output_dir: Path, tracking_uri: str | None) -> dict[str, Any]:
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    redactor = Redactor.from_environ()
    records, damaged = _read_pending(path)
    header = next((r for r in records if r["op"] == "run"), {})
    uri = tracking_uri or header.get("tracking_uri") or default_tracking_uri(output_dir)
    shown = redactor.text(uri)
    if REDACTED in uri:
        raise CmrpError(f"{path}: the recorded tracking URI has a hidden password; pass it with --tracking-uri")
    _http_defaults(uri)
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
                name, artifact_location=None if is_remote(uri) else local)
            run = client.create_run(exp_id, run_name=header.get("run_name"), tags=header.get("tags") or None)
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        have = dict(run.data.params)
        params = [Param(k, str(v)) for r in records if r["op"] == "params" for k, v in r["params"].items()
                  if k not in have]
        params = list({p.key: p for p in params}.values())
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        keys = sorted({k for r in records if r["op"] == "metrics" for k in r["metrics"]})
        metrics = _new_metrics(records, _server_last_steps(client, run_id, [k for k in keys if k in run.data.metrics]))
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
        raise CmrpError(f"cmrp tracking sync: uploading {path.name} to {shown} failed ({redactor.text(err)[:300]}); "
                        f"it was not marked as uploaded, run the command again when the server is up") from None
    except OSError as err:
        raise CmrpError(f"cmrp tracking sync: cannot reach {shown} ({redactor.text(err)}); run it again when the "
                        "server is up") from None
    done = path.with_name(f"synced-{time.strftime('%Y%m%dT%H%M%S')}-{path.stem}.jsonl")
    path.rename(done)
    if path == pending_file(output_dir):  # the latest run: `cmrp eval` finds it by this file
        _write_run_file(output_dir, {"run_id": run_id, "experiment_id": experiment_id,
                                     "experiment": header.get("experiment"), "tracking_uri": shown})
    return {"file": path, "run_id": run_id, "experiment_id": experiment_id, "tracking_uri": shown,
            "params": len(params), "metrics": len(metrics), "artifacts": artifacts, "missing_artifacts": missing,
            "damaged_lines": damaged, "status": statuses[-1] if statuses else None, "archived_as": done}
