"""Issue 20, item 4: what `cmrp validate` accepts, `cmrp fit` runs. Out-of-range numbers and a character with
no training examples fail both commands with the same one line, before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest

from cmrp.sandbox import write_sandbox_character
from tests.faults._helpers import ROOT, TINY, assert_one_line_error, main

OUT_OF_RANGE = [
    ("seed=-1", "key 'seed' must be an integer from 0 to 4294967295, got -1"),
    (f"seed={2**32}", "key 'seed' must be an integer from 0 to 4294967295"),
    (f"trainer.max_steps={10**26}", "trainer.max_steps"),
    ("trainer.max_steps=0", "key 'trainer.max_steps' must be an integer from 1"),
    ("data.batch_size=100000000", "key 'data.batch_size' must be an integer from 1 to 65536"),
    ("grpo.group_size=0", "key 'grpo.group_size'"),
    ("grpo.sample_steps=1000000000", "key 'grpo.sample_steps'"),
    ("sft.optimizer.lr=.inf", "key 'sft.optimizer.lr' must be a number above 0 up to 1e+30"),
    ("sft.optimizer.weight_decay=1e300", "key 'sft.optimizer.weight_decay' must be a number from 0 up to 10"),
    ("grpo.cfg_scale=1e300", "key 'grpo.cfg_scale'"),
    ("sft.optimizer.betas=[0.9, 1.5]", "key 'sft.optimizer.betas'"),
    ("sft.timestep_shift=0", "key 'sft.timestep_shift'"),
    ("eval.sample_steps=0", "key 'eval.sample_steps'"),
    ("checkpoint.keep=0", "key 'checkpoint.keep'"),
    ("trainer.precision=banana", "key 'trainer.precision' is 'banana'"),
    ("trainer.devices=0", "key 'trainer.devices'"),
    ("finetune.targets=[]", "key 'finetune.targets'"),
]


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_fail_validate_and_fit_alike(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    lines = []
    for command in ("validate", "fit"):
        rc, _, err = main(capsys, command, *TINY, override, f"output_dir={out}")
        lines.append(assert_one_line_error(rc, err, command, message).split(": error: ", 1)[1])
    assert lines[0] == lines[1]
    assert not out.exists()


@pytest.fixture
def empty_character(tmp_path):
    """A native character whose train/data.json is `{}` (it loads, with a warning: nothing to train on)."""
    root = write_sandbox_character(5, tmp_path / "char", n_reference_images=2, n_scenes=4)
    (root / "train" / "data.json").write_text("{}")
    shutil.rmtree(root / "train" / "images")
    return root


def test_a_character_without_training_examples_fails_validate_and_fit(tmp_path, capsys, empty_character):
    out = tmp_path / "run"
    counts = "(chat 0, thinking 0, t2i 0, vqa 0, knowledge_qa 0)"
    for command in ("validate", "fit"):
        rc, _, err = main(capsys, command, *TINY, f"data.path={empty_character}", f"output_dir={out}")
        assert_one_line_error(rc, err, command, str(empty_character), "no training examples", counts)
    assert not (out / "checkpoint").exists() and not (out / "mlflow.db").exists()


def test_grpo_without_image_prompts_fails_validate(tmp_path, capsys):
    root = write_sandbox_character(5, tmp_path / "char", n_reference_images=2, n_scenes=4)
    data = json.loads((root / "train" / "data.json").read_text())
    for scene in data["scenes"]:
        for turn in scene["turns"]:
            turn.pop("image_id", None)
    data["t2i"] = []
    (root / "train" / "data.json").write_text(json.dumps(data))
    rc, _, err = main(capsys, "validate", "quickstart", f"data.path={root}", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, "validate", "no image prompts", "stage 'grpo'")


def test_an_mmrole_folder_with_only_test_files_fails_validate(tmp_path, capsys):
    data = shutil.copytree(ROOT / "tests" / "fixtures" / "mmrole" / "data" / "test", tmp_path / "mmrole-test")
    rc, _, err = main(capsys, "validate", *TINY, f"data.path={data}", "data.format=mmrole",
                      "data.character=Iron Man", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, "validate", "holds only MMRole test files", "nothing to train on")


def test_validate_reports_counts_and_this_machines_problems_as_notes(tmp_path, capsys):
    rc, out, err = main(capsys, "validate", "recipes/bagel/qlora/grpo.yaml", f"output_dir={tmp_path / 'run'}")
    assert rc == 0 and out.startswith("OK: ") and not err
    assert "GRPO image prompts: " in out
    # no CUDA in the tests (QLoRA itself runs here: bitsandbytes' CPU backend has NF4 layers)
    assert "note: `cmrp fit` would stop on this machine: trainer.accelerator 'gpu'" in out
    assert "note: `cmrp fit` would stop on this machine: init_from:" in out
    rc, out, err = main(capsys, "validate", *TINY, f"output_dir={tmp_path / 'run'}")
    assert rc == 0 and "training examples: chat " in out and "note:" not in out
    assert not (tmp_path / "run").exists()  # validate writes nothing
