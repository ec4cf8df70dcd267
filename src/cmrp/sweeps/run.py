"""Running a planned sweep: the MLflow parent run, the cells wave by wave through a launcher, the table.

The parent run lives in the sweep's one tracking store (default `<out>/mlflow.db`); its id is kept in
`<out>/tracking/run.json`, so a rerun continues the same parent. It holds the sweep file, the table
(summary.md, report.html, summary.json, the plots) and each row's means as `sweep/<row>/<metric>`; every
cell's `cmrp fit` run is its child (`mlflow.parentRunId`), and each cell's `cmrp eval` run a child of that.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrp.config import Redactor
from cmrp.config.yamlio import display_path
from cmrp.errors import CmrpError
from cmrp.jsonio import write_json
from cmrp.progress import Progress
from cmrp.sweeps.launchers import Job
from cmrp.sweeps.plan import Cell, Plan, cell_status
from cmrp.sweeps.report import metric_plots, write_html
from cmrp.sweeps.table import cell_values, markdown, summarize
from cmrp.tracking import (
    TrackingLogger,
    default_tags,
    is_remote,
    open_tracked_run,
    pending_files,
    read_run_file,
    sync_pending,
)

__all__ = ["SweepResult", "describe_plan", "run_sweep", "write_table"]


@dataclass
class SweepResult:
    summary: dict[str, Any]
    markdown: str
    files: dict[str, Path]
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    parent_hint: str = ""
    parent_run_id: str | None = None


def _shown(text: str) -> str:
    """An argument as the user would type it: absolute paths (also after `key=`) relative to the working
    directory, secrets hidden."""
    key, sep, value = text.rpartition("=") if "=" in text and not text.startswith("sqlite:") else ("", "", text)
    if value.startswith("/"):
        value = display_path(Path(value))
    return Redactor.from_environ().text(f"{key}{sep}{value}")


def describe_plan(plan: Plan, launcher: str) -> str:
    """The cells with their recipe, overrides and eval options, for `--dry-run`."""
    counts: dict[str, int] = {}
    for cell in plan.cells:
        counts[cell.status] = counts.get(cell.status, 0) + 1
    seeds = sorted({c.seed for c in plan.cells})
    lines = [f"sweep {plan.sweep.name} ({display_path(plan.sweep.path)}): {len(plan.rows)} rows x {len(seeds)} seeds "
             f"= {len(plan.cells)} cells in {display_path(plan.out)}",
             f"tracking: {_shown(plan.tracking_uri)}, experiment {plan.experiment}; launcher: {launcher}",
             "status: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]
    for cell in plan.cells:
        after = f", after {cell.depends.name}" if cell.depends is not None else ""
        args = cell.fit_args(plan.tracking_uri, plan.experiment)
        shown = [a for a in args[1:] if not a.startswith(("output_dir=", "tracking."))]
        lines.append(f"{cell.name}  [{cell.status}{after}]")
        lines.append(f"  cmrp fit {display_path(cell.recipe)} {' '.join(_shown(a) for a in shown)}"
                     + (" --resume" if cell.status == "resume" else ""))
        lines.append(f"  cmrp eval {' '.join(_shown(a) for a in cell.eval_args)}")
    lines += ["", "every cell also gets output_dir=<out>/<row>/seed<N>, tracking.tracking_uri, tracking.experiment "
              "and tracking.run_name=<row>/seed<N>"]
    changed = [c.name for c in plan.cells if c.status == "changed"]
    if changed:
        lines.append(_changed_message(plan, changed))
    return "\n".join(lines)


def _changed_message(plan: Plan, names: list[str]) -> str:
    return (f"{len(names)} cell(s) ran before with another recipe (or from another starting cell) in "
            f"{display_path(plan.out)}: {', '.join(names)}. Their earlier runs are kept: delete those cell folders "
            "to run them again with this sweep, or give another --out")


def _metric_key(*parts: str) -> str:
    """An MLflow metric name (letters, digits, _ - . / and space)."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", p) for p in parts)


def _upload_pending(folder: Path, say) -> None:
    """Upload what a run in `folder` could not log (as `cmrp tracking sync` does): a cell stopped in the middle
    of a write to the store, or a server that was down. Its runs then end with their real status (KILLED)
    instead of staying RUNNING, and a resumed cell logs to the store again rather than to its pending file."""
    if not pending_files(folder):
        return
    try:
        for done in sync_pending(folder):
            say(f"{folder}: uploaded the tracking records a stopped run left ({done['file'].name}, run {done['run_id']})")
    except CmrpError as err:
        say(f"{folder}: tracking records still waiting for upload ({err})")


def _parent_run(plan: Plan):
    """The sweep's MLflow run: continued when an earlier run of this sweep recorded it in the same store."""
    redactor = Redactor.from_environ()
    known = read_run_file(plan.out)
    run_id = known.get("run_id") if known.get("tracking_uri") == redactor.text(plan.tracking_uri) else None
    if run_id and plan.tracking_uri.startswith("sqlite:///") and not Path(plan.tracking_uri[len("sqlite:///"):]).is_file():
        run_id = None  # the local store was deleted: a new parent
    tags = None if run_id else {**default_tags("sweep"), "cmrp.sweep": plan.sweep.name}
    artifacts = None if is_remote(plan.tracking_uri) else (plan.out / "mlartifacts").as_uri()
    return TrackingLogger(plan.tracking_uri, plan.experiment, plan.sweep.name, plan.out, run_id=run_id,
                          artifact_location=artifacts, tags=tags, redactor=redactor, resume=bool(run_id))


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """`kill PID` stops the sweep like Ctrl-C: running cells are ended (KILLED) and the parent run too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _job(plan: Plan, cell: Cell, parent_run_id: str | None):
    """The cell's job file (in `<out>/.jobs/`, so a cell's folder exists only once its process starts)."""
    record = {"row": cell.row, "seed": cell.seed, "recipe_fingerprint": cell.recipe_fingerprint,
              "source_fingerprint": cell.depends.fingerprint if cell.depends else None,
              "fingerprint": cell.fingerprint, "eval_args": list(cell.eval_args)}
    resume = cell.status == "resume"
    log = cell.dir / "log.txt"
    spec = {"name": cell.name, "sweep": plan.sweep.name, "dir": str(cell.dir), "log": str(log),
            "fit": [*cell.fit_args(plan.tracking_uri, plan.experiment), *(["--resume"] if resume else [])],
            "eval": list(cell.eval_args), "parent_run_id": parent_run_id, "record": record}
    path = plan.out / ".jobs" / cell.row / f"seed{cell.seed}.json"
    write_json(path, spec)
    return Job(cell.name, path, log)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _last_error(log: Path) -> str:
    """The last line of a cell's log that says what went wrong."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "error" in line.lower() or "interrupted" in line.lower() or line.startswith("cmrp sweep:"):
            return line[:300]
    return lines[-1][:300] if lines else "empty log"


def run_sweep(plan: Plan, launcher: Any) -> SweepResult:
    """Every cell not done yet, wave by wave; then the table (also when some cells failed)."""
    changed = [c.name for c in plan.cells if c.status == "changed"]
    if changed:
        raise CmrpError(_changed_message(plan, changed))
    plan.out.mkdir(parents=True, exist_ok=True)
    _upload_pending(plan.out, _stderr)
    todo = [c for c in plan.cells if c.status != "done"]
    ran: list[str] = []
    failed: dict[str, str] = {}
    with _sigterm_as_ctrl_c(), open_tracked_run(lambda: _parent_run(plan)) as parent:
        if parent.tags:  # a new parent: MLflow params cannot change later
            seeds = sorted({c.seed for c in plan.cells})
            parent.log_hyperparams({"sweep_file": str(plan.sweep.path), "recipe": str(plan.sweep.recipe),
                                    "rows": ",".join(plan.rows), "seeds": ",".join(map(str, seeds)),
                                    "baseline": plan.sweep.baseline or "none", "cells": len(plan.cells),
                                    "launcher": launcher.describe()})
        copy = plan.out / "sweep.yaml"
        shutil.copyfile(plan.sweep.path, copy)
        parent.log_artifact(copy)
        by_name = {c.name: c for c in plan.cells}
        with Progress(len(todo), f"sweep {plan.sweep.name}", unit="cell") as progress:

            def finished(job, rc: int, seconds: float) -> None:
                cell = by_name[job.name]
                cell.status = cell_status(cell)
                if rc == 0 and cell.status == "done":
                    ran.append(cell.name)
                    progress.write(f"cell {cell.name}: done in {seconds:.0f} s")
                else:
                    failed[cell.name] = f"exit {rc}: {_last_error(job.log)}"
                    progress.write(f"cell {cell.name}: FAILED — {failed[cell.name]} — see {job.log}")
                progress.update(1, cell=cell.name, failed=len(failed))

            def started(job) -> None:
                cell = by_name[job.name]
                verb = "resuming" if cell.status == "resume" else "started"
                progress.write(f"cell {cell.name}: {verb} (log {display_path(job.log)})")

            if len(plan.cells) > len(todo):
                progress.write(f"sweep {plan.sweep.name}: {len(plan.cells) - len(todo)} cell(s) already done, "
                               "not run again")
            for wave in plan.waves(todo):
                jobs = []
                for cell in wave:
                    if cell.depends is not None and cell.depends.name in failed:
                        failed[cell.name] = f"not run: {cell.depends.name} failed"
                        progress.write(f"cell {cell.name}: not run, the cell it starts from ({cell.depends.name}) failed")
                        progress.update(1, failed=len(failed))
                        continue
                    for folder in (cell.dir, cell.dir / "eval"):
                        _upload_pending(folder, progress.write)
                    jobs.append(_job(plan, cell, parent.run_id))
                if jobs:
                    launcher.run(jobs, started, finished)
        result = write_table(plan, parent)
        result.ran, result.failed = ran, failed
        result.skipped = [c.name for c in plan.cells if c.status == "done" and c.name not in ran]
        if failed:
            raise CmrpError(f"{len(failed)} of {len(plan.cells)} cell(s) failed — "
                            + "; ".join(f"{k}: {v}" for k, v in failed.items())
                            + f". The table of the cells that are done is in {display_path(result.files['markdown'])}; "
                            "run the same command again to retry the others")
    return result


def write_table(plan: Plan, parent: Any = None) -> SweepResult:
    """summary.md, report.html, summary.json and plots/ from the cells that are done; logged to the parent."""
    cells = []
    for cell in plan.cells:
        if cell_status(cell) == "done":
            cells.append({"row": cell.row, "seed": cell.seed, "dir": str(cell.dir),
                          "values": cell_values(cell.dir, plan.sweep.metrics)})
    missing = [c.name for c in plan.cells if not any(d["row"] == c.row and d["seed"] == c.seed for d in cells)]
    summary = summarize(plan.sweep, plan.rows, cells)
    summary["cells"] = cells
    summary["not_done"] = missing
    text = markdown(summary, missing)
    files = {"markdown": plan.out / "summary.md", "json": plan.out / "summary.json", "html": plan.out / "report.html"}
    files["markdown"].write_text(text, encoding="utf-8")
    write_json(files["json"], summary)
    plots = metric_plots(summary, plan.out / "plots")
    meta = {"sweep file": plan.sweep.path, "output": plan.out, "baseline": plan.sweep.baseline,
            "tracking": _shown(plan.tracking_uri), "parent run": getattr(parent, "run_id", None),
            "not done": ", ".join(missing)}
    write_html(summary, cells, plots, plan.out, files["html"], meta)
    result = SweepResult(summary, text, files)
    if parent is not None:
        means = {_metric_key("sweep", row, m): s["mean"] for row, r in summary["rows"].items()
                 for m, s in r["stats"].items() if s["mean"] is not None}
        parent.log_metrics(means, step=len(cells))  # a later, fuller table logs at a later step
        for path in [*files.values(), *plots.values()]:
            parent.log_artifact(path)
        result.parent_hint = parent.hint()
        result.parent_run_id = parent.run_id
    return result
