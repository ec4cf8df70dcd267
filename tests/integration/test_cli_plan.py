"""`cmrp plan` through the real CLI: the shipped BAGEL-7B recipes offline (meta device, no weights, no GPU),
numbers checked against independent arithmetic on the card's sizes, and one-line errors."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from cmrp import cli

ROOT = Path(__file__).resolve().parents[2]
# BAGEL-7B-MoT (backbones/bagel-7b-mot.yaml): per decoder layer and expert, the 7 projections' (in + out)
D, KV, FFN, LAYERS = 3584, 4 * 128, 18944, 28
LORA_IN_OUT = (D + D) + (D + KV) + (D + KV) + (D + D) + 2 * (D + FFN) + (FFN + D)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def gb(text: str, label: str) -> float:
    m = re.search(rf"^\s+{re.escape(label)}\s+([0-9.,]+) GB$", text, re.M)
    assert m, f"no line {label!r} in:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_plan_bagel_sft_full_fsdp(capsys):
    start = time.monotonic()
    code, out, err = run(capsys, "plan", str(ROOT / "recipes/bagel/sft.yaml"))
    assert code == 0, err
    assert time.monotonic() - start < 120  # the 7B model is never materialised
    assert "backbone bagel-7b-mot, finetune full, bf16-mixed, fsdp over 8 GPUs" in out
    assert "trainer.devices is 'auto': assuming 8 GPUs per node" in out
    total = float(re.search(r"parameters: ([0-9.]+) B", out).group(1))
    assert total == pytest.approx(14.61, abs=0.01)  # the card's comment: ~14.7 B with the ViT's last layer
    # FSDP over 8: fp32 master weights sharded, the frozen autoencoder (84 M) replicated
    assert gb(out, "weights") == pytest.approx(total * 4 / 8 + 0.084 * 4, abs=0.15)
    assert gb(out, "optimiser states") == pytest.approx(2 * gb(out, "gradients"), rel=0.02)
    assert gb(out, "activations, checkpointing off") > 5 * gb(out, "activations, checkpointing on")
    assert re.search(r"peak with checkpointing on: +[0-9.]+ GB per GPU, fits in 80.0 GB   <- the recipe's setting", out)
    assert re.search(r"peak with checkpointing off: [0-9.,]+ GB per GPU, does NOT fit in 80.0 GB", out)
    assert re.search(r"compute: [0-9,.]+ TFLOP per GPU per step", out)


def test_plan_bagel_lora_sft_json(capsys):
    code, out, err = run(capsys, "plan", str(ROOT / "recipes/bagel/lora/sft.yaml"), "--json", "--gpus", "8")
    assert code == 0, err
    plan = json.loads(out)
    assert (plan["finetune"], plan["strategy"], plan["gpus"], plan["precision"]) == ("lora", "ddp", 8, "bf16-mixed")
    (sft,) = plan["stages"]
    assert sft["stage"] == "sft"
    # LoRA r 64 on the 7 projections of both experts in all 28 layers
    assert sft["trainable"] == 64 * LORA_IN_OUT * 2 * LAYERS
    memory = sft["memory"]
    # DDP replicates the fp32 base (and LoRA) on every GPU
    assert memory["weights"] == pytest.approx((plan["parameters"] + plan["autoencoder_parameters"]) * 4
                                              + sft["trainable"] * 4, rel=1e-6)
    assert memory["optimizer"] == sft["trainable"] * 8
    assert memory["peak_checkpointed"] < memory["peak"]
    assert sft["fits"] == (memory["peak_checkpointed"] <= 80e9)


def test_plan_scales_with_gpus_and_answers_for_a_given_card(capsys):
    base = str(ROOT / "recipes/bagel-tiny/sft_grpo.yaml")
    code, out, _ = run(capsys, "plan", base, "trainer.strategy=fsdp", "--gpus", "2", "--json")
    two = json.loads(out)
    code, out, _ = run(capsys, "plan", base, "trainer.strategy=fsdp", "--gpus", "4", "--nodes", "2", "--json",
                       "--gpu-memory", "1MB")
    eight = json.loads(out)
    assert code == 0 and [s["stage"] for s in eight["stages"]] == ["sft", "grpo"]
    w2, w8 = two["stages"][0]["memory"]["optimizer"], eight["stages"][0]["memory"]["optimizer"]
    assert w2 == pytest.approx(4 * w8)
    assert eight["gpu_memory"] == 1e6 and not eight["stages"][0]["fits"] and two["stages"][0]["fits"]


@pytest.mark.parametrize("argv,message", [
    (["bagel/sft", "--gpu-memory", "eighty"], "--gpu-memory 'eighty': give a size such as 80GB"),
    (["janus/sft"], "`cmrp plan` estimates BAGEL backbones (adapter 'bagel')"),
    (["bagel/sft", "trainer.strategy=deepspeed_stage_3"], "trainer.strategy: 'deepspeed_stage_3' cannot be estimated"),
    (["bagel/sft", "--gpus", "0"], "--gpus and --nodes must be at least 1"),
    (["bagel/sft", "trainer.precison=bf16-true"], "trainer.precison"),
])
def test_plan_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, "plan", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
