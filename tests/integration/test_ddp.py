"""SFT and GRPO under Lightning's DDP strategy with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmrp.training.advantages import group_advantages

JOB = Path(__file__).with_name("ddp_job.py")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([sys.executable, str(JOB), str(out), "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_all_ranks_end_with_identical_weights(ddp_run):
    a, b = (load_file(str(ddp_run / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ranks = _ranks(ddp_run)
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["changed_by_grpo"] and ranks[0]["changed_by_grpo"] == ranks[1]["changed_by_grpo"]
    assert all("_moe_gen" in k or k.startswith(("time_embedder", "vae2llm", "llm2vae")) for k in ranks[0]["changed_by_grpo"])


def _history_length(ranks) -> int:
    """Both ranks logged every GRPO iteration (a loop over an empty history would check nothing)."""
    length = len(ranks[0]["history"])
    assert length > 0 and all(len(r["history"]) == length for r in ranks)
    return length


def test_each_group_stays_on_one_rank(ddp_run):
    ranks = _ranks(ddp_run)
    for step in range(_history_length(ranks)):
        groups = [set(r["history"][step]["group_ids"]) for r in ranks]
        assert groups[0] and groups[1] and not groups[0] & groups[1]


def test_advantages_equal_the_single_process_computation(ddp_run):
    ranks = _ranks(ddp_run)
    for step in range(_history_length(ranks)):
        rewards = torch.tensor([v for r in ranks for v in r["history"][step]["rewards"]])
        groups = torch.tensor([g for r in ranks for g in r["history"][step]["group_ids"]])
        seen = torch.tensor([a for r in ranks for a in r["history"][step]["advantages"]])
        # the job uses global-std advantages: each rank needed the other's rewards
        expected, _ = group_advantages(rewards, groups, std="global", eps=1e-4, clip=5.0)
        assert torch.allclose(seen, expected, atol=1e-6)
        local = torch.tensor(ranks[0]["history"][step]["rewards"])
        local_only, _ = group_advantages(local, torch.tensor(ranks[0]["history"][step]["group_ids"]), std="global")
        assert not torch.allclose(local_only, seen[: len(local)], atol=1e-6)  # the gather mattered


@pytest.mark.slow
def test_cli_fit_with_ddp_two_processes(tmp_path):
    """The real `cmrp fit` under trainer.strategy=ddp: one MLflow run, rank 0 writes the outputs."""
    from tests.integration.test_cli_fit import FAST_EVAL, read_run, run_cli
    from tests.integration.test_cli_grpo import GRPO_FAST

    out = tmp_path / "ddp"
    proc = run_cli("fit", "recipes/bagel-tiny/sft_grpo.yaml", "trainer.strategy=ddp", "trainer.devices=2",
                   "trainer.accelerator=cpu", *GRPO_FAST, f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("MLflow run:") == 1
    client, run = read_run(out)  # exactly one run
    assert "grpo/ratio_mean" in run.data.metrics and run.data.params["trainer.strategy"] == "ddp"
    assert (out / "checkpoint" / "backbone" / "model.safetensors").is_file()
