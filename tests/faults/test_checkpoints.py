"""Issue 20, items 1 and 2: a checkpoint damaged in place (same size, changed bytes) is never resumed from:
it is skipped with a warning naming the file and the one before it is used, so the run ends with the weights
of a run never interrupted. Damaged files give one clear line, never torch's advice to load unsafely."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from cmrp.errors import CmrpError
from cmrp.training.checkpointing import (
    ResumePoint,
    capture_rng,
    find_resume_point,
    load_weights,
    write_checkpoint,
)
from tests.faults._helpers import TINY, flip_bytes, run_cli

FILES = ("weights.safetensors", "state.pt", "manifest.json")


def _write(root, batches, done=False):
    model = torch.nn.Linear(4, 3)
    state = {"optimizers": [torch.optim.AdamW(model.parameters()).state_dict()], "rng": capture_rng()}
    manifest = {"stage": "sft", "stage_index": 0, "batches": batches, "done": done, "step": batches}
    return write_checkpoint(root, dict(model.named_parameters()), state, manifest, keep=5)


@pytest.mark.parametrize("file", FILES)
def test_a_damaged_file_is_skipped_with_a_warning_and_the_previous_is_used(tmp_path, capsys, file):
    older = _write(tmp_path, 2)
    newer = _write(tmp_path, 4)
    size = (newer / file).stat().st_size
    flip_bytes(newer / file)
    assert (newer / file).stat().st_size == size
    assert find_resume_point(tmp_path).path == older
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("cmrp: resume: skipping ") and str(newer / file) in warning[0]


def test_when_every_checkpoint_is_damaged_the_error_says_so(tmp_path, capsys):
    for batches in (2, 4):
        flip_bytes(_write(tmp_path, batches) / "weights.safetensors")
    with pytest.raises(CmrpError, match=r"none of its 2 checkpoint\(s\) passed verification"):
        find_resume_point(tmp_path)
    assert capsys.readouterr().err.count("cmrp: resume: skipping") == 2
    assert find_resume_point(tmp_path / "nothing-here") is None  # no checkpoint at all: a fresh start


def test_a_damaged_header_or_pickle_is_one_clear_error(tmp_path):
    point = _write(tmp_path, 2)
    header = bytearray((point / "weights.safetensors").read_bytes())
    header[10:40] = b"\xff" * 30  # inside the JSON header: invalid UTF-8
    (point / "weights.safetensors").write_bytes(bytes(header))
    with pytest.raises(CmrpError, match=r"weights\.safetensors: not a weights file cmrp can read \(SafetensorError\)"):
        load_weights(torch.nn.Linear(4, 3), point, ["weight", "bias"])

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (point / "state.pt").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(CmrpError) as err:
        ResumePoint(point, json.loads((point / "manifest.json").read_text())).state()
    assert "state.pt: not a state file cmrp can read" in str(err.value)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


# -- end to end: the real CLI, a damaged newest checkpoint, `--resume` -------------------------------------------
RUN = [*TINY, "trainer.max_steps=6", "checkpoint.every_n_steps=2", "checkpoint.keep=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt-ref") / "run"
    proc = run_cli("fit", *RUN, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow  # two CLI runs per damaged file: ~1 min each on a loaded 2-core machine
@pytest.mark.parametrize("file", FILES)
def test_resume_skips_the_damaged_checkpoint_and_ends_with_the_uninterrupted_weights(reference, tmp_path, file):
    out = tmp_path / "run"
    proc = run_cli("fit", *RUN, f"output_dir={out}")  # the run whose newest checkpoint gets damaged
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = out / "resume" / "00-sft-done"
    flip_bytes(newest / file)
    before = (out / "checkpoint" / "backbone" / "model.safetensors").read_bytes()
    proc = run_cli("fit", RUN[0], "--resume", *RUN[1:], f"output_dir={out}")  # overrides after the flag, too
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cmrp: resume: skipping {newest / file}" in proc.stderr
    assert "resuming at step 4 of stage 'sft'" in proc.stdout
    got = load_file(str(out / "checkpoint" / "backbone" / "model.safetensors"))
    want = load_file(str(reference / "checkpoint" / "backbone" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert before == (out / "checkpoint" / "backbone" / "model.safetensors").read_bytes()
