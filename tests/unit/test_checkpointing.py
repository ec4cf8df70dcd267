"""Resume checkpoints: atomic, validated by their manifest, RNG states round-trip, the non-finite guard."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cmrp.errors import ConfigError
from cmrp.training.checkpointing import (
    NonFiniteError,
    NonFiniteGuard,
    capture_rng,
    check_fingerprint,
    find_resume_point,
    load_weights,
    recipe_fingerprint,
    restore_rng,
    write_checkpoint,
)
from cmrp.training.sharding import grads_finite


def _manifest(stage_index=0, stage="sft", batches=5, done=False):
    return {"stage": stage, "stage_index": stage_index, "batches": batches, "done": done, "step": batches}


def _write(root, batches, stage_index=0, keep=5, value=1.0, done=False):
    weights = {"w": torch.full((3, 2), value), "b": torch.arange(4.0)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    state = {"optimizers": [opt.state_dict()], "rng": capture_rng(), "module": {"ema": {"w": torch.zeros(2)}}}
    return write_checkpoint(root, weights, state, _manifest(stage_index, batches=batches, done=done), keep)


def test_latest_valid_checkpoint_is_found_and_state_loads_with_weights_only(tmp_path):
    _write(tmp_path, 5)
    _write(tmp_path, 10, value=2.0)
    _write(tmp_path, 0, stage_index=1)  # a later stage beats a larger step of an earlier one
    point = find_resume_point(tmp_path)
    assert point.path.name == "01-sft-00000000" and point.stage_index == 1
    state = point.state()  # torch.load(weights_only=True) inside
    assert state["optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert torch.equal(state["module"]["ema"]["w"], torch.zeros(2))
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["no_manifest", "truncated_weights", "bad_json", "tmp_dir", "wrong_format"])
def test_half_written_or_damaged_checkpoint_is_never_picked(tmp_path, damage):
    good = _write(tmp_path, 5)
    bad = _write(tmp_path, 10)
    if damage == "no_manifest":
        (bad / "manifest.json").unlink()
    elif damage == "truncated_weights":
        data = (bad / "weights.safetensors").read_bytes()
        (bad / "weights.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad_json":
        (bad / "manifest.json").write_text('{"stage": "sft", ')
    elif damage == "wrong_format":
        manifest = json.loads((bad / "manifest.json").read_text())
        (bad / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    elif damage == "tmp_dir":  # what a crash in the middle of write_checkpoint leaves
        bad.rename(tmp_path / ".tmp-00-sft-00000010-123")
    assert find_resume_point(tmp_path).path == good
    if damage == "tmp_dir":
        _write(tmp_path, 15)
        assert not list(tmp_path.glob(".tmp-*"))  # leftovers are cleaned on the next save


def test_only_the_newest_are_kept(tmp_path):
    for batches in (2, 4, 6, 8):
        _write(tmp_path, batches, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-sft-00000006", "00-sft-00000008"]


def test_weights_round_trip_and_mismatch_is_named(tmp_path):
    model = torch.nn.Linear(2, 3)
    names = [n for n, _ in model.named_parameters()]
    saved = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    point = write_checkpoint(tmp_path, saved, {"rng": capture_rng()}, _manifest(), keep=2)
    fresh = torch.nn.Linear(2, 3)
    load_weights(fresh, point, names)
    for n, p in fresh.named_parameters():
        assert torch.equal(p.data, saved[n])
    with pytest.raises(ConfigError, match=r"weights\.safetensors.*missing \['extra'\]"):
        load_weights(fresh, point, [*names, "extra"])


def test_rng_states_round_trip():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.rand(7), np.random.rand(2), random.random()
    restore_rng(state)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_state_file_is_plain_enough_for_weights_only(tmp_path):
    """Optimiser, scheduler and RNG states load with `weights_only=True` (no pickled classes)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    torch.save({"o": opt.state_dict(), "s": sched.state_dict(), "r": capture_rng()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt2.load_state_dict(loaded["o"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    sched2.load_state_dict(loaded["s"])
    assert sched2.last_epoch == 1


def test_guard_skips_counts_and_stops_after_n_in_a_row(capsys):
    guard = NonFiniteGuard(3, "sft")
    assert guard.step(True, 1)
    assert not guard.step(False, 2) and not guard.step(False, 3)
    assert guard.step(True, 4)  # a finite step resets the run of bad ones
    assert not guard.step(False, 5) and not guard.step(False, 6)
    with pytest.raises(NonFiniteError, match=r"sft: 3 steps in a row \(up to step 7\).*nonfinite_stop_after: 3"):
        guard.step(False, 7)
    assert guard.total == 5
    assert "step 2: non-finite" in capsys.readouterr().out
    never = NonFiniteGuard(0, "grpo")
    assert not any(never.step(False, i) for i in range(50))


def test_grads_finite():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    assert grads_finite([a, b])  # no gradients yet
    a.grad = torch.tensor([1.0, 2.0])
    assert grads_finite([a, b])
    b.grad = torch.tensor([float("inf"), 0.0])
    assert not grads_finite([a, b])


def test_fingerprint_names_what_changed(tmp_path):
    recipe = {"name": "x", "seed": 0, "sft": {"optimizer": {"lr": 0.001}}, "output_dir": "a", "resume": "never"}
    digest, flat = recipe_fingerprint(recipe)
    moved = {**recipe, "output_dir": "b", "resume": "auto"}  # where and whether: not part of the numbers
    assert recipe_fingerprint(moved)[0] == digest
    point = write_checkpoint(tmp_path, {"w": torch.ones(1)}, {}, {**_manifest(), "fingerprint": digest,
                                                                  "recipe": flat}, keep=1)
    found = find_resume_point(point.parent)
    check_fingerprint(found, digest, flat)
    changed = {**recipe, "sft": {"optimizer": {"lr": 0.01}}}
    with pytest.raises(ConfigError, match=r"sft\.optimizer\.lr: '0\.001' -> '0\.01'"):
        check_fingerprint(found, *recipe_fingerprint(changed))
