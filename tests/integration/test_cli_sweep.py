"""`cmrp sweep` through the real console script on a toy sweep: 2 rows x 2 seeds of the sandbox SFT recipe
(2 steps, tiny evaluation), each cell a real `cmrp fit` + `cmrp eval`.

The main test runs it with the parallel launcher (2 cells at a time), kills it once a cell is done and another
is half-way, and runs it again: only the missing cells run (counted in the cells' logs), the half-finished one
resumes with `--resume`, no MLflow run is left RUNNING, and the table, the MLflow parent/child runs and each
cell's eval.json agree. The submitit test (its local executor) is `slow`.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cmrp import cli
from tests.waiting import scaled, wait_until

ROOT = Path(__file__).resolve().parents[2]
CMRP = str(Path(sys.executable).parent / "cmrp")
TOY = f"""\
name: toy
recipe: {ROOT / 'recipes' / 'sandbox' / 'sft.yaml'}
overrides: {{trainer.max_steps: 2, data.batch_size: 4, eval.grid_prompts: 1, eval.images_per_prompt: 1,
             eval.sample_steps: 2, eval.max_items: 2, checkpoint.every_n_steps: 1}}
seeds: [0, 1]
axes:
  variant:
    a: {{label: plain}}
    b: {{sft.optimizer.lr: 0.002}}
baseline: a
evaluate: {{features: sandbox, baseline: none, max_items: 2, samples: 2, steps: 2, max_new_tokens: 4}}
metrics:
  identity: eval:t2i.identity_fidelity
  knowledge: eval:knowledge_qa.mcq_acc_likelihood
  loss: {{from: "fit:loss_last", better: lower}}
claims:
  - {{name: b keeps identity, row: b, against: a, holds: [identity >= -1]}}
"""
CELLS = ("a/seed0", "a/seed1", "b/seed0", "b/seed1")


def fits(out: Path, cell: str) -> list[str]:
    """The `cmrp fit` commands a cell ran (its log starts each command with a `$ cmrp ...` line)."""
    log = out / cell / "log.txt"
    return [line for line in log.read_text().splitlines() if line.startswith("$ cmrp fit")] if log.is_file() else []


def done(out: Path, cell: str) -> bool:
    try:
        return json.loads((out / cell / "sweep-cell.json").read_text())["state"] == "done"
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "toy.yaml").write_text(TOY)
    return folder / "toy.yaml", folder / "out"


def test_dry_run_prints_every_cell_and_runs_nothing(toy, capsys):
    sweep, out = toy
    assert cli.main(["sweep", str(sweep), "--dry-run", "--out", str(out / "dry")]) == 0
    text = capsys.readouterr().out
    assert "2 rows x 2 seeds = 4 cells" in text and "status: 4 new" in text
    for cell in CELLS:
        assert f"{cell}  [new]" in text
    assert text.count("sft.optimizer.lr=0.002") == 2 and text.count("trainer.max_steps=2") == 4
    assert text.count("--features sandbox --baseline none --max-items 2 --samples 2 --steps 2 --max-new-tokens 4") == 4
    assert "seed=1" in text
    assert not (out / "dry").exists()  # nothing written, nothing run


def test_a_bad_sweep_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(TOY.replace("seeds: [0, 1]", "seeds: [0, 1]\nsede: 3"))
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml:6" in err and "'sede'" in err and "did you mean 'seeds'" in err


def test_killed_sweep_finishes_only_the_missing_cells(toy, monkeypatch, capsys):
    from cmrp.sweeps.launchers import threads_per_process

    sweep, out = toy
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # threads per cell: cores // jobs
    env = dict(os.environ)
    command = [CMRP, "sweep", str(sweep), "--out", str(out), "--launcher", "parallel", "--jobs", "2"]
    first = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def started(cell: str) -> bool:
        return (out / cell / "log.txt").is_file()

    def running() -> list[str]:  # cells whose fit has created its MLflow run and that are not done
        return [c for c in CELLS if (out / c / "tracking" / "run.json").is_file() and not done(out, c)]

    # kill it (SIGTERM, like a scheduler) once a cell is done and another is half-way. The half-way cell can
    # still finish between the check and the signal; then nothing is half-way and the sweep is started and
    # killed again (its done cells are skipped) until a kill leaves one.
    for attempt in range(3):
        if attempt:
            first = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        wait_until(lambda: any(done(out, c) for c in CELLS) and running(), 900, "a cell done and one half-way",
                   first)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=scaled(300))
        assert first.returncode == 130, err[-3000:]
        assert "interrupted" in err
        half = [c for c in CELLS if started(c) and not done(out, c)]
        if half:
            break
        print(f"kill {attempt + 1}: the half-way cell finished before SIGTERM reached it; starting the sweep again")
    finished_before = [c for c in CELLS if done(out, c)]
    untouched = [c for c in CELLS if not started(c)]
    assert finished_before and half, "three kills in a row found no cell half-way"
    assert all(not (out / c).exists() for c in untouched)  # a cell not started leaves nothing behind
    logs = {c: (out / c / "log.txt").read_text() for c in finished_before}
    killed = {}  # cell -> the MLflow run that was running when it was stopped (its eval's, else its fit's)
    for c in half:
        for folder in (out / c / "eval", out / c):
            if (folder / "tracking" / "run.json").is_file():
                killed[c] = json.loads((folder / "tracking" / "run.json").read_text())["run_id"]
                break

    # the rerun in this process (the cells still run in processes of their own)
    assert cli.main(command[1:]) == 0
    n = len(finished_before)
    assert f"cells:       {4 - n} run now, {n} already done" in capsys.readouterr().out
    # only the missing cells ran: done cells untouched, half-finished ones resumed, the others ran once
    for c in finished_before:
        assert (out / c / "log.txt").read_text() == logs[c] and len(fits(out, c)) == 1
    for c in half:
        ran = fits(out, c)
        assert len(ran) == 2 and "--resume" not in ran[0] and ran[1].split("   #")[0].endswith("--resume")
    for c in untouched:
        assert len(fits(out, c)) == 1 and "--resume" not in fits(out, c)[0]
    threads = threads_per_process(2, env)
    for cell in CELLS:
        header = [line for line in (out / cell / "log.txt").read_text().splitlines() if line.startswith("# cmrp sweep")]
        assert header and all(line.endswith(f"OMP_NUM_THREADS={threads}") for line in header)

    # the table's numbers are the cells' own
    summary = json.loads((out / "summary.json").read_text())
    for row in ("a", "b"):
        evals = [json.loads((out / row / f"seed{s}" / "eval" / "eval.json").read_text())["model"]["numbers"]
                 for s in (0, 1)]
        metrics = [json.loads((out / row / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
        columns = {"identity": [e["t2i"]["identity_fidelity"] for e in evals],
                   "knowledge": [e["knowledge_qa"]["mcq_acc_likelihood"] for e in evals],
                   "loss": [m["loss_last"] for m in metrics]}
        for name, values in columns.items():
            got = summary["rows"][row]["stats"][name]
            assert got["n"] == 2
            assert got["mean"] == pytest.approx(statistics.mean(values))
            assert got["std"] == pytest.approx(statistics.stdev(values))
            assert summary["rows"][row]["values"]["0"][name] == pytest.approx(values[0])
    a, b = (summary["rows"][r]["values"] for r in ("a", "b"))
    assert summary["rows"]["b"]["delta"]["loss"]["per_seed"] == {
        s: pytest.approx(b[s]["loss"] - a[s]["loss"]) for s in ("0", "1")}
    assert summary["claims"][0]["holds_on_every_seed"] is True
    table = (out / "summary.md").read_text()
    mean = summary["rows"]["a"]["stats"]["loss"]["mean"]
    row = next(line for line in table.splitlines() if line.startswith("| plain | 2 |"))
    assert row.split(" | ")[4].startswith(f"{mean:.3f} ± ")  # row, seeds, identity, knowledge, loss
    assert "claim holds on every seed: True (2/2 seeds)" in table
    assert (out / "report.html").is_file() and {p.name for p in (out / "plots").iterdir()} == {
        "identity.png", "knowledge.png", "loss.png"}

    # MLflow: one parent run for the sweep; every cell's fit run is its child, every eval run a fit run's child
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("toy")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("cmrp.kind") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "toy"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "sweep.yaml", "summary.md", "summary.json", "report.html", "identity.png"}
    assert parent.data.metrics["sweep/a/loss"] == pytest.approx(mean)
    fits_ = [r for r in runs if r.data.tags.get("cmrp.kind") == "fit"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in fits_)
    finished = {r.data.tags["cmrp.sweep.cell"]: r for r in fits_ if r.info.status == "FINISHED"}
    assert sorted(finished) == sorted(CELLS)
    status = {r.info.run_id: r.info.status for r in runs}
    for cell, run_id in killed.items():  # ended KILLED, or continued by --resume from a checkpoint to FINISHED
        resumed = "cmrp fit: resuming" in (out / cell / "log.txt").read_text()
        assert status[run_id] == "KILLED" or (resumed and run_id == finished[cell].info.run_id), (cell, status[run_id])
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)  # none left RUNNING
    evals = [r for r in runs if r.data.tags.get("cmrp.kind") == "eval" and r.info.status == "FINISHED"]
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in evals) == sorted(r.info.run_id for r in finished.values())

    # once everything is done, a rerun runs nothing and writes the same table
    assert cli.main(["sweep", str(sweep), "--out", str(out)]) == 0
    assert "cells:       0 run now, 4 already done" in capsys.readouterr().out
    assert all(len(fits(out, c)) == (2 if c in half else 1) for c in CELLS)
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]


@pytest.mark.slow
def test_submitit_local_executor_runs_the_cells_as_a_job_array(tmp_path):
    pytest.importorskip("submitit")
    sweep = tmp_path / "toy.yaml"
    one_row = TOY[:TOY.index("claims:")].replace("    b: {sft.optimizer.lr: 0.002}\n", "")
    sweep.write_text(one_row + "submitit: {cluster: local, timeout_min: 30}\n")
    out = tmp_path / "out"
    proc = subprocess.run([CMRP, "sweep", str(sweep), "--out", str(out), "--launcher", "submitit"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cells:       2 run now, 0 already done" in proc.stdout
    for cell in ("a/seed0", "a/seed1"):
        assert done(out, cell) and len(fits(out, cell)) == 1
        assert "$ cmrp eval" in (out / cell / "log.txt").read_text()  # the job's output went to the cell's log
    assert list((out / "submitit").glob("*_submitted.pkl"))  # submitit's own job files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"]["a"]["stats"]["identity"]["n"] == 2
