"""Exact resumption: a `cmrp fit` killed with SIGKILL at a random step and resumed with `--resume` ends with
the same weights and the same logged metric history as a run that was never interrupted.

The kill step is drawn from `CMRP_KILL_SEED` (default 0) and printed, so a failure names the step that broke it
and `CMRP_KILL_SEED=<seed>` replays it; CI may vary the seed to cover other steps."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.test_cli_fit import CMRP, ROOT, read_run, run_cli
from tests.waiting import scaled, wait_until

KILL_SEED = int(os.environ.get("CMRP_KILL_SEED", "0"))

TINY_EVAL = ["eval.max_items=4", "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2"]
SFT = ["recipes/sandbox/sft.yaml", "trainer.max_steps=24", "data.batch_size=2", "data.max_text_tokens=32",
       "checkpoint.every_n_steps=4", "checkpoint.keep=3", "sft.optimizer.warmup_steps=4", *TINY_EVAL]
GRPO = ["recipes/bagel-tiny/sft_grpo.yaml", "trainer.max_steps=4", "data.batch_size=2", "data.max_text_tokens=32",
        "grpo.max_steps=8", "grpo.group_size=2", "grpo.prompts_per_step=1", "grpo.sample_steps=3",
        "grpo.minibatch_size=2", "grpo.ema_decay=0.5", "checkpoint.every_n_steps=2", "checkpoint.keep=2",
        *TINY_EVAL]


def _positions(out: Path) -> list[tuple[int, str]]:
    """(stage index, name) of every complete checkpoint on disk."""
    root = out / "resume"
    if not root.is_dir():
        return []
    return sorted((int(p.name[:2]), p.name) for p in root.iterdir()
                  if not p.name.startswith(".") and (p / "manifest.json").is_file())


def kill_point(choices) -> int:
    """The step to kill at, drawn from CMRP_KILL_SEED and printed (pytest shows it when the test fails)."""
    step = random.Random(KILL_SEED).choice(list(choices))
    print(f"kill point: the first checkpoint at or after step {step} (CMRP_KILL_SEED={KILL_SEED})")
    return step


def kill_after(args: list[str], out: Path, ready, timeout: float = 600) -> None:
    """Start `cmrp fit`, SIGKILL it as soon as `ready(names)` is true for the checkpoints on disk (with the
    processes it started: a multi-process run's other ranks)."""
    proc = subprocess.Popen([CMRP, "fit", *args, f"output_dir={out}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: ready([name for _, name in _positions(out)]), timeout, "the kill point", proc,
                   every=0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the run's process group: its other ranks too
        assert proc.wait(scaled(30)) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "metrics.json").exists()  # it really died before the end


def history(out: Path) -> dict[str, dict[int, float]]:
    """Every metric's value per step (a resumed run does not log the steps it replays again)."""
    client, run = read_run(out)
    result: dict[str, dict[int, float]] = {}
    for key in run.data.metrics:
        if key.startswith("grpo/time_"):
            continue  # wall-clock timings differ by nature
        per_step: dict[int, set[float]] = {}
        for m in client.get_metric_history(run.info.run_id, key):
            per_step.setdefault(m.step, set()).add(round(m.value, 5))
        assert all(len(v) == 1 for v in per_step.values()), (key, per_step)  # replayed steps agree
        result[key] = {step: values.pop() for step, values in per_step.items()}
    return result


def assert_same_run(resumed: Path, reference: Path) -> None:
    a = load_file(str(resumed / "checkpoint" / "backbone" / "model.safetensors"))
    b = load_file(str(reference / "checkpoint" / "backbone" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    ha, hb = history(resumed), history(reference)
    assert ha.keys() == hb.keys()
    for key in ha:
        assert ha[key].keys() == hb[key].keys(), key
        for step in ha[key]:
            x, y = ha[key][step], hb[key][step]
            assert x == pytest.approx(y, rel=1e-4, abs=1e-5, nan_ok=True), (key, step, x, y)
    _, run = read_run(resumed)
    assert run.info.status == "FINISHED"


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-ref") / "run"
    proc = run_cli("fit", *SFT, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow  # three CLI runs: ~90 s on a loaded 2-core machine
@pytest.mark.claims  # docs/runs.md: exact resume after SIGKILL
def test_sft_killed_at_a_random_step_resumes_exactly(sft_reference, tmp_path):
    out = tmp_path / "run"
    kill_at = kill_point(range(4, 17))
    kill_after(SFT, out, lambda names: any(n.startswith("00-sft-0") and int(n[-8:]) >= kill_at for n in names))
    proc = run_cli("fit", *SFT, f"output_dir={out}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from:" in proc.stdout
    assert_same_run(out, sft_reference)
    # a resumed run continues its MLflow run: one run, params logged once
    _, run = read_run(out)
    assert run.data.params["trainer.max_steps"] == "24"


@pytest.mark.slow  # three CLI runs: ~90 s on a loaded 2-core machine
@pytest.mark.claims  # docs/runs.md: exact resume after SIGKILL
def test_resume_without_checkpoint_starts_afresh_and_rejects_another_recipe(sft_reference, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("fit", *SFT, f"output_dir={out}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no valid checkpoint" in proc.stdout
    assert_same_run(out, sft_reference)
    proc = run_cli("fit", *SFT, "sft.optimizer.lr=0.01", f"output_dir={out}", "--resume")
    assert proc.returncode == 2
    assert "sft.optimizer.lr" in proc.stderr and "different recipe" in proc.stderr


@pytest.mark.slow
@pytest.mark.claims  # docs/runs.md: exact resume after SIGKILL
def test_sft_then_grpo_killed_in_grpo_resumes_exactly(tmp_path):
    reference = tmp_path / "ref"
    proc = run_cli("fit", *GRPO, f"output_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    kill_at = kill_point([2, 4])
    kill_after(GRPO, out, lambda names: any(n.startswith("01-grpo-0") and int(n[-8:]) >= kill_at for n in names))
    proc = run_cli("fit", *GRPO, f"output_dir={out}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from:" in proc.stdout and "01-grpo" in proc.stdout
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.claims  # docs/runs.md: exact resume after SIGKILL
def test_killed_between_stages_resumes_with_grpo(tmp_path):
    """Killed after SFT's end-of-stage checkpoint: SFT is not run again, GRPO runs from its start."""
    reference = tmp_path / "ref"
    assert run_cli("fit", *GRPO, f"output_dir={reference}").returncode == 0
    out = tmp_path / "run"
    kill_after(GRPO, out, lambda names: "00-sft-done" in names)
    proc = run_cli("fit", *GRPO, f"output_dir={out}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after stage 'sft'" in proc.stdout
    assert_same_run(out, reference)


if __name__ == "__main__":  # pragma: no cover - handy when debugging one case
    sys.exit(pytest.main([__file__, "-q"]))
