"""Two "nodes" on this machine, one CPU process each, through the real `cmrp fit`: launched by torchrun
(`--nnodes 2 --node-rank 0|1`, a 127.0.0.1 rendezvous) and by the SLURM batch script docs/scaling.md documents
(scripts/slurm/fit.sbatch, run with SLURM's variables set by hand and `srun` played by a shell function).
Each ends with one MLflow run and the same weights on both ranks (their digests, in metrics.json)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import CMRP, ROOT, read_run
from tests.integration.test_resume import TINY_EVAL

pytestmark = [pytest.mark.slow, pytest.mark.claims]  # two cmrp fit processes each: minutes on 2 loaded cores

SBATCH = ROOT / "scripts" / "slurm" / "fit.sbatch"
RUN = ["recipes/bagel-tiny/sft_grpo.yaml", "trainer.accelerator=cpu", "trainer.max_steps=3", "data.batch_size=2",
       "data.max_text_tokens=32", "grpo.max_steps=2", "grpo.group_size=2", "grpo.prompts_per_step=1",
       "grpo.sample_steps=3", "grpo.minibatch_size=2", *TINY_EVAL]
BUSY = ("address already in use", "eaddrinuse", "errno: 98")


def free_port() -> int:
    """A port nothing listens on now (the OS's pick); a launch that loses it to another process retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Poll until every process has ended (one failing ends the others, with the processes each started:
    no rank is left waiting on a peer)."""
    deadline = time.monotonic() + timeout

    def end_all():
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                end_all()
            time.sleep(0.2)
    finally:
        end_all()
    return [p.wait() for p in procs]


def launch(commands: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float = 900) -> list[tuple[int, str, str]]:
    """Run the commands side by side, output to files under `logs` (a pipe nobody reads would block a
    chatty rank); (exit code, stdout, stderr) of each."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (cmd, e) in enumerate(commands):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=err, start_new_session=True))
    codes = wait_all(procs, timeout)
    return [(code, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()) for i, code in enumerate(codes)]


def with_retried_port(start) -> list[tuple[int, str, str]]:
    """`start(port)` with a fresh free port, again (twice at most) when the rendezvous lost its port."""
    for _ in range(3):
        results = start(free_port())
        if not any(code and any(b in err.lower() for b in BUSY) for code, _, err in results):
            return results
    return results


def assert_one_run_same_weights(results: list[tuple[int, str, str]], out: Path, strategy: str) -> None:
    for code, _, err in results:
        assert code == 0, err[-4000:]
    assert sum(stdout.count("MLflow run:") for _, stdout, _ in results) == 1  # rank 0 alone reports
    _, run = read_run(out)  # exactly one run
    assert run.info.status == "FINISHED" and run.data.params["trainer.num_nodes"] == "2"
    assert "grpo/ratio_mean" in run.data.metrics
    dist = json.loads((out / "metrics.json").read_text())["distributed"]
    assert dist["world_size"] == 2 and dist["num_nodes"] == 2 and dist["strategy"] == strategy
    assert dist["ranks_agree"] and len(set(dist["weights_sha256"])) == 1
    assert (out / "checkpoint" / "backbone" / "model.safetensors").is_file()


def test_torchrun_two_nodes_one_process_each(tmp_path):
    out = tmp_path / "run"

    def start(port: int):
        shutil.rmtree(out, ignore_errors=True)  # what a try that lost its port left

        def node(rank: int) -> list[str]:
            return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                    "-m", "cmrp.cli", "fit", *RUN, "trainer.strategy=fsdp", "trainer.devices=1",
                    "trainer.num_nodes=2", f"output_dir={out}"]
        return launch([(node(0), env()), (node(1), env())], tmp_path / f"logs-{port}")

    assert_one_run_same_weights(with_retried_port(start), out, "fsdp")


def test_slurm_batch_script_two_nodes(tmp_path):
    """The documented batch script's own lines, under what SLURM would set for --nodes=2 --ntasks-per-node=1;
    `srun` starts its command once per task with that task's variables (here: one task per "node")."""
    out = tmp_path / "run"
    fake_srun = ('srun() { for i in $(seq 0 $((SLURM_NTASKS - 1))); do '
                 'SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "$@" > "$SRUN_LOGS/task$i.out" 2>&1 & done; '
                 'code=0; for job in $(jobs -p); do wait "$job" || code=$?; done; return $code; }; '
                 'export -f srun; bash "$0" "$@"')

    def start(port: int):
        shutil.rmtree(out, ignore_errors=True)  # what a try that lost its port left
        logs = tmp_path / f"logs-{port}"
        logs.mkdir()
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cmrp-fit", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
                 "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port),
                 "SRUN_LOGS": str(logs), "PATH": f"{Path(CMRP).parent}{os.pathsep}{os.environ['PATH']}"}
        code, _, err = launch([(["bash", "-c", fake_srun, str(SBATCH), RUN[0], *RUN[1:], "trainer.strategy=ddp",
                                 f"output_dir={out}"], {**env(), **slurm})], logs)[0]
        tasks = [(logs / f"task{i}.out").read_text() for i in (0, 1)]
        return [(code, tasks[0], tasks[0] + err), (code, tasks[1], tasks[1])]

    results = with_retried_port(start)
    assert_one_run_same_weights(results, out, "ddp")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in results[1][1]  # Lightning took the ranks from SLURM's variables
