"""Where cells run: local processes (one at a time, or N at once) or a cluster through submitit.

No scheduling of our own: the local launchers are a thread pool that waits on one process per cell
(`python -m cmrp.sweeps.cell SPEC.json`), and the cluster launcher hands a wave of cells to submitit as one
job array (SLURM, or submitit's local executor). The sweep gives each launcher one wave at a time (the
cells of a wave do not depend on each other) and hears back as each cell ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrp.errors import CmrpError, ConfigError
from cmrp.sweeps.cell import submitit_job

__all__ = ["Job", "LocalLauncher", "SubmititLauncher", "available_cores", "threads_per_process"]

Started = Callable[["Job"], None]
Done = Callable[["Job", int, float], None]  # (job, exit status, seconds)


@dataclass
class Job:
    name: str
    spec: Path
    log: Path


def available_cores() -> int:
    """Cores this process may use (its CPU affinity, e.g. a container's or a SLURM allocation's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_process(processes: int, environ: dict[str, str] | None = None) -> int:
    """Threads for each of `processes` cell processes so that processes x threads <= cores; an
    OMP_NUM_THREADS the user set is a cap."""
    threads = max(1, available_cores() // max(1, processes))
    cap = (environ if environ is not None else os.environ).get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


class LocalLauncher:
    """`processes` cell processes at a time on this machine, each with `threads` threads."""

    def __init__(self, processes: int = 1):
        if processes < 1:
            raise ConfigError(f"--jobs must be at least 1, got {processes}")
        self.processes = processes
        self.threads = threads_per_process(processes)
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def describe(self) -> str:
        kind = "local, one cell at a time" if self.processes == 1 else f"parallel, {self.processes} cells at a time"
        return f"{kind}, {self.threads} thread(s) per cell"

    def _run_one(self, job: Job, started: Started) -> tuple[int, float]:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        start = time.monotonic()
        with self._lock:  # nothing of a cell is made once the sweep is stopping
            if self._stopping:
                return 130, 0.0
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = job.log.open("a")
            proc = subprocess.Popen([sys.executable, "-m", "cmrp.sweeps.cell", str(job.spec)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            self._live.add(proc)
        try:
            started(job)
            rc = proc.wait()
        finally:
            log.close()
            with self._lock:
                self._live.discard(proc)
        return rc, time.monotonic() - start

    def run(self, jobs: list[Job], started: Started, done: Done) -> None:
        """Run every job, `processes` at a time; `started` is called as each process starts (in a worker
        thread), `done` as each ends (in the calling thread)."""
        pool = ThreadPoolExecutor(self.processes, thread_name_prefix="cmrp-sweep")
        futures = {pool.submit(self._run_one, job, started): job for job in jobs}
        try:
            for future in as_completed(futures):
                rc, seconds = future.result()
                done(futures[future], rc, seconds)
        except BaseException:
            for future in futures:
                future.cancel()
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """End the running cells (SIGTERM: each ends its MLflow runs KILLED), then wait for them."""
        with self._lock:
            self._stopping = True
            live = list(self._live)
        for proc in live:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 60
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class SubmititLauncher:
    """Each wave of cells as one submitit job array: SLURM (`cluster: slurm`), submitit's local executor
    (`cluster: local`), or whichever submitit finds (`auto`: SLURM when `sbatch` is on the PATH)."""

    def __init__(self, folder: Path, parameters: dict[str, Any], array_parallelism: int | None = None,
                 poll_s: float = 2.0):
        try:
            import submitit
        except ImportError:
            raise CmrpError("--launcher submitit needs submitit: pip install 'cmrp[slurm]'") from None
        params = dict(parameters)
        cluster = params.pop("cluster", "auto")
        if cluster not in ("auto", "slurm", "local"):
            raise ConfigError(f"submitit.cluster must be auto, slurm or local, got {cluster!r}")
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=None if cluster == "auto" else cluster)
        if array_parallelism is not None:
            params.setdefault("slurm_array_parallelism", array_parallelism)
        params.setdefault("name", "cmrp-sweep")
        try:
            self.executor.update_parameters(**params)
        except (NameError, AssertionError, TypeError, ValueError) as err:
            raise ConfigError(f"submitit executor parameters {sorted(params)}: {err}") from None
        self.poll_s = poll_s
        self._jobs: list = []

    def describe(self) -> str:
        return f"submitit ({self.executor.cluster} executor)"

    def run(self, jobs: list[Job], started: Started, done: Done) -> None:
        """Submit the jobs as one array; `started` is called for each once submitted, `done` as each ends."""
        start = time.monotonic()
        submitted = self.executor.map_array(submitit_job, [str(job.spec) for job in jobs])
        self._jobs = submitted
        for job in jobs:
            started(job)
        waiting = dict(zip(submitted, jobs, strict=True))
        try:
            while waiting:
                for handle in [h for h in waiting if h.done()]:
                    job = waiting.pop(handle)
                    try:
                        rc = int(handle.result())
                    except Exception as err:  # noqa: BLE001 - the job died (killed, timed out, node lost)
                        with job.log.open("a") as log:
                            log.write(f"cmrp sweep: submitit job {handle.job_id} failed: {err}\n")
                        rc = 1
                    done(job, rc, time.monotonic() - start)
                if waiting:
                    time.sleep(self.poll_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for handle in self._jobs:
            if not handle.done():
                handle.cancel(check=False)
