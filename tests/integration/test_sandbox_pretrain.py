"""`cmrp sandbox pretrain` through the real console script on a tiny world, the base it writes used by
`cmrp fit`, and the clear errors around bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli_fit import FAST_EVAL, read_run, run_cli

TINY_WORLD = ["world.characters=3", "world.reference_images=4", "world.scenes=6", "world.heldout_characters=1",
              "trainer.max_steps=12", "data.batch_size=4", "eval.images_per_prompt=1", "eval.sample_steps=3",
              "eval.max_items=8"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pretrain")
    proc = run_cli("sandbox", "pretrain", *TINY_WORLD, f"output_dir={run}", "--out", str(run / "base"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base:" in proc.stdout and "(held-out characters)" in proc.stdout
    return run


def test_pretrain_writes_a_loadable_base_with_its_manifest(tiny_base):
    from cmrp.backbones.bagel import BagelAdapter

    base = tiny_base / "base"
    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["world"]["train_seeds"] == [1000, 1002] and manifest["world"]["heldout_seeds"] == [1003, 1003]
    assert manifest["recipe"]["trainer"]["max_steps"] == 12 and manifest["seed"] == 0
    assert manifest["training"]["loss_last"] < manifest["training"]["loss_first"]
    for when in ("untrained", "pretrained"):
        assert set(manifest["heldout"][when]) == {
            "knowledge_mcq_acc", "vqa_mcq_acc", "identity_fidelity_name_prompt", "identity_fidelity_described",
            "prompt_faithfulness_described"}
    # every task of the world is there, text-to-image twice per reference image (name and description)
    per_task = manifest["world"]["examples_per_task"]
    assert min(per_task.values()) > 0 and per_task["t2i"] >= 2 * 3 * 4
    adapter = BagelAdapter.from_pretrained(base)
    assert adapter.tokenizer.decode(adapter.tokenizer.encode("Moki, happy, on the beach")) == "Moki, happy, on the beach"
    # the run is tracked like any other
    _, run = read_run(tiny_base)
    assert "train/loss" in run.data.metrics and "eval/after/vqa_mcq_acc" in run.data.metrics
    assert run.info.status == "FINISHED"


def test_fit_starts_from_a_pretrained_base_folder(tiny_base, tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text(f"name: my-base\nadapter: bagel\nweights: {tiny_base / 'base'}\n")
    out = tmp_path / "run"
    proc = run_cli("fit", "recipes/sandbox/sft.yaml", f"backbone={card}", "trainer.max_steps=2",
                   "data.batch_size=4", f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    start = load_file(str(tiny_base / "base" / "model.safetensors"))
    end = load_file(str(out / "checkpoint" / "backbone" / "model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not (start[k] == end[k]).all() for k in start)  # it trained from the base's weights


def test_lora_run_on_a_card_with_weights_evaluates_from_the_card(tiny_base, tmp_path):
    """A LoRA run on a card's pretrained weights saves only the adapter; `cmrp eval` rebuilds the base from the card."""
    card = tmp_path / "card.yaml"
    card.write_text(f"name: my-base\nadapter: bagel\nweights: {tiny_base / 'base'}\n")
    out = tmp_path / "lora"
    proc = run_cli("fit", "recipes/sandbox/sft.yaml", f"backbone={card}", "finetune.mode=lora", "trainer.max_steps=2",
                   "data.batch_size=4", f"output_dir={out}", *FAST_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint" / "adapter").is_dir() and not (out / "checkpoint" / "backbone").exists()
    proc = run_cli("eval", str(out), "--features", "pixel", "--baseline", "none", "--max-items", "4", "--samples", "1",
                   "--steps", "2", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert 0.0 <= report["model"]["numbers"]["knowledge_qa"]["mcq_acc_likelihood"] <= 1.0


def test_bad_bases_fail_clearly(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text("name: nope\nadapter: bagel\nweights: sandbox://nope\n")
    proc = run_cli("fit", "recipes/sandbox/sft.yaml", f"backbone={card}", f"output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "sandbox://nope" in proc.stderr and "shipped: base" in proc.stderr and "cmrp sandbox pretrain" in proc.stderr
    proc = run_cli("sandbox", "pretrain", "finetune.mode=lora", f"output_dir={tmp_path / 'p'}")
    assert proc.returncode != 0 and "finetune.mode=full" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("sandbox", "pretrain", "backbone=bagel-sandbox", f"output_dir={tmp_path / 'p'}")
    assert proc.returncode != 0 and "random-init" in proc.stderr and "Traceback" not in proc.stderr
