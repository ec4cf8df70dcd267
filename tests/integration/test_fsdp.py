"""FSDP (`trainer.strategy: fsdp`: FSDP2 under Lightning's ModelParallelStrategy) with 2 CPU processes (gloo).

SFT: the weights 2 sharded ranks end with equal those of one process that sees the same global batch per
step (fp32 tolerance), full fine-tuning and LoRA. GRPO (rollouts, log-prob recomputation, the reference
policy, EMA, the reward gather): advantages equal the single-process computation on the gathered rewards,
both ranks end with identical weights, groups never straddle ranks. Each case is one run of fsdp_job.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmrp.training.advantages import group_advantages

JOB = Path(__file__).with_name("fsdp_job.py")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.claims]  # each job: 2 processes, ~30-90 s on a loaded 2-core machine


def run_job(out: Path, strategy: str, mode: str, stage: str) -> list[dict]:
    """Run fsdp_job.py; each rank's record with its trained weights under "weights"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(JOB), str(out), "--strategy", strategy, "--mode", mode,
                           "--stage", stage], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = []
    for r in range(1 if strategy == "single" else 2):
        record = json.loads((out / f"rank{r}.json").read_text())
        record["weights"] = load_file(str(out / f"rank{r}.safetensors"))
        ranks.append(record)
    return ranks


def assert_ranks_agree(ranks: list[dict], kind: str = "DTensor") -> None:
    """Both ranks hold the same weights (under FSDP: gathered from the same slices; under DDP: replicas)."""
    a, b = ranks[0]["weights"], ranks[1]["weights"]
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["parameter_kinds"] == [kind] for r in ranks)  # DTensor: they really trained sharded


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_two_sharded_ranks_equal_one_process_with_the_same_global_batch(tmp_path, mode):
    sharded = run_job(tmp_path / "fsdp", "fsdp", mode, "sft")
    single = run_job(tmp_path / "single", "single", mode, "sft")[0]
    assert_ranks_agree(sharded)
    assert single["parameter_kinds"] == ["Parameter"]
    ours, theirs = sharded[0]["weights"], single["weights"]
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert single["moved"] > 1e-3  # training moved the weights far more than the tolerance below
    assert worst < 1e-5, worst
    if mode == "lora":
        assert all("lora_" in k for k in ours)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_grpo_two_sharded_ranks_equal_two_replicas(tmp_path, mode):
    """Rollouts, log-probs, the reference policy and EMA under sharding give what DDP's replicas give."""
    ranks = run_job(tmp_path / "fsdp", "fsdp", mode, "grpo")
    replicas = run_job(tmp_path / "ddp", "ddp", mode, "grpo")
    assert_ranks_agree(ranks)
    assert_ranks_agree(replicas, kind="Parameter")
    assert ranks[0]["moved"] > 1e-3
    ours, theirs = ranks[0]["weights"], replicas[0]["weights"]
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
    steps = len(ranks[0]["history"])
    assert steps == 2
    for step in range(steps):
        per_rank = [r["history"][step] for r in ranks]
        groups = [set(h["group_ids"]) for h in per_rank]
        assert groups[0] and groups[1] and not groups[0] & groups[1]  # a group is sampled on one rank
        rewards = torch.tensor([v for h in per_rank for v in h["rewards"]])
        group_ids = torch.tensor([g for h in per_rank for g in h["group_ids"]])
        seen = torch.tensor([a for h in per_rank for a in h["advantages"]])
        expected, _ = group_advantages(rewards, group_ids, std="global", eps=1e-4, clip=5.0)
        assert torch.allclose(seen, expected, atol=1e-6)
        local, _ = group_advantages(torch.tensor(per_rank[0]["rewards"]), torch.tensor(per_rank[0]["group_ids"]),
                                    std="global")
        assert not torch.allclose(local, seen[: len(local)], atol=1e-6)  # the gather mattered


# -- checkpoints, through the real `cmrp fit` -----------------------------------------------------------
FSDP_FIT = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_fit_killed_in_grpo_resumes_exactly_and_saves_the_single_process_layout(tmp_path, mode):
    """SFT then GRPO under fsdp, SIGKILLed (both ranks) after a GRPO checkpoint and resumed: the same weights
    and metric history as an uninterrupted fsdp run; the final checkpoint has a one-process run's files."""
    from tests.integration.test_cli_fit import run_cli
    from tests.integration.test_resume import GRPO, assert_same_run, kill_after

    args = [*GRPO, "grpo.max_steps=4", f"finetune.mode={mode}", *FSDP_FIT]
    reference, single = tmp_path / "ref", tmp_path / "single"
    proc = run_cli("fit", *args, f"output_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    kill_after(args, out, lambda names: any(n.startswith("01-grpo-0") and int(n[-8:]) >= 2 for n in names))
    proc = run_cli("fit", *args, f"output_dir={out}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from:" in proc.stdout and "01-grpo" in proc.stdout
    assert_same_run(out, reference)  # the metric history, and the backbone file
    ours, theirs = saved_tensors(out), saved_tensors(reference)  # LoRA: the adapter too
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5

    proc = run_cli("fit", *args[:-len(FSDP_FIT)], "trainer.max_steps=1", "grpo.max_steps=1", f"output_dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = [{k: (tuple(v.shape), v.dtype) for k, v in saved_tensors(d).items()} for d in (out, single)]
    assert layout[0] == layout[1]
    files = [sorted(p.relative_to(d).as_posix() for p in (d / "checkpoint").rglob("*") if p.is_file())
             for d in (out, single)]
    assert files[0] == files[1] and ("checkpoint/adapter/adapter_config.json" in files[0]) == (mode == "lora")


def saved_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of a run's final checkpoint, keyed "file:name"."""
    found = {}
    for path in sorted((run / "checkpoint").rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            found[f"{path.relative_to(run).as_posix()}:{name}"] = tensor.float()
    return found
