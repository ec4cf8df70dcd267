"""One cell of a sweep: `cmrp fit` then `cmrp eval`, through the CLI's own entry point, in one process.

`python -m cmrp.sweeps.cell SPEC.json` is what the local launchers start (output to the cell's log); a
submitit job calls `submitit_job(SPEC.json)`, which sends its output to the same log. Running both commands
in one process imports torch, Lightning and MLflow once per cell instead of twice; running each cell in a
process of its own keeps cells apart (random state, threads, memory, signal handlers) and lets the sweep
stop one without stopping itself.

The fit run becomes a child of the sweep's MLflow run through MLflow's own `MLFLOW_RUN_CONTEXT` (tags of new
runs, read by `cmrp fit` with its default tags); the eval run is nested under the fit run as always. SIGTERM
ends the cell like Ctrl-C, so its MLflow runs end KILLED and a rerun resumes it (`cmrp fit --resume`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cmrp import cli
from cmrp.config import Redactor
from cmrp.jsonio import write_json
from cmrp.sweeps.plan import RECORD

__all__ = ["run_cell", "submitit_job", "write_record"]


def write_record(cell_dir: Path, record: dict[str, Any]) -> None:
    """`<cell>/sweep-cell.json`, atomically."""
    write_json(cell_dir / RECORD, record)


def _say(line: str) -> None:
    print(Redactor.from_environ().text(line), flush=True)


def _cli(command: str, args: list[str], env: dict[str, str]) -> int:
    _say(f"$ cmrp {command} {' '.join(args)}   # {time.strftime('%Y-%m-%d %H:%M:%S')}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return cli.main([command, *args])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_cell(spec_path: str | Path) -> int:
    """Fit (resuming a half-finished run), check its fingerprint is the one the sweep planned, evaluate,
    then mark the cell done. Returns the first non-zero exit status, or 0."""
    spec = json.loads(Path(spec_path).read_text())
    cell_dir = Path(spec["dir"])
    write_record(cell_dir, {**spec["record"], "state": "started", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _say(f"# cmrp sweep {spec['sweep']}, cell {spec['name']}: process {os.getpid()}, "
         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    tags = {"cmrp.sweep": spec["sweep"], "cmrp.sweep.cell": spec["name"]}
    if spec.get("parent_run_id"):
        tags["mlflow.parentRunId"] = spec["parent_run_id"]
    rc = _cli("fit", spec["fit"], {"MLFLOW_RUN_CONTEXT": json.dumps(tags)})
    if rc:
        return rc
    try:
        got = json.loads((cell_dir / "metrics.json").read_text())["mlflow"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        got = None
    if got != spec["record"]["recipe_fingerprint"]:
        _say(f"cmrp sweep: {cell_dir / 'metrics.json'} has recipe fingerprint {got}, the sweep planned "
             f"{spec['record']['recipe_fingerprint']}; the cell is not marked done")
        return 3
    rc = _cli("eval", spec["eval"], {})
    if rc:
        return rc
    write_record(cell_dir, {**spec["record"], "state": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return 0


def submitit_job(spec_path: str) -> int:
    """A submitit job: the cell, its output appended to the cell's log (the job's own files stay empty)."""
    log = Path(json.loads(Path(spec_path).read_text())["log"])
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    return run_cell(spec_path)  # signals are submitit's business (a cancelled local job gets SIGINT)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cmrp.sweeps.cell SPEC.json (started by `cmrp sweep`)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_cell(argv[0])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
