"""`bash benchmarks/gpu.sh --smoke`: the GPU benchmark at tiny size on the CPU, so it never rots. Two cases are
made to fail (an out-of-memory error inside the worker, and the worker process dying) to show that a failure is
recorded and the remaining cases still run. No timing is asserted; what is checked is that every measure exists,
is consistent with the FLOP accounting, and that `cmrp plan`'s memory estimate meets the measured peaks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OOM = "bagel-tiny/sft/lora/no-ckpt/sdpa"
CRASH = "bagel-tiny/sft/full/ckpt/sdpa"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(out),
         "--simulate-failure", f"{OOM}:oom,{CRASH}:crash"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "gpu" and report["smoke"] and report["device"].startswith("cpu")
    cases = {c["name"]: c for c in report["cases"]}
    assert cases[OOM]["status"] == "oom" and "simulated" in cases[OOM]["error"]
    assert cases[CRASH]["status"] == "crashed"
    skipped = cases["bagel-tiny/sft/lora/ckpt/flash_attn"]
    assert skipped["status"] == "skipped" and "flash_attn" in skipped["reason"]
    ok = [c for c in report["cases"] if c["status"] == "ok"]
    # everything else ran, the cases after the crash included (a fresh worker took over)
    expected = {"peak_matmul", "bagel-tiny/sft/full/no-ckpt/sdpa", "bagel-tiny/sft/lora/ckpt/sdpa",
                "bagel-tiny/sft/lora/ckpt/math", "bagel-tiny/grpo", "bagel-tiny-slice/sft/full/no-ckpt/sdpa"}
    qlora = "bagel-tiny/sft/qlora/ckpt/sdpa"  # bitsandbytes' CPU backend: the NF4 base runs here too
    if importlib.util.find_spec("bitsandbytes") is not None:
        expected.add(qlora)
    else:
        assert cases[qlora]["status"] == "skipped" and "bitsandbytes" in cases[qlora]["reason"]
    assert {c["name"] for c in ok} == expected, {c["name"]: c.get("error") for c in report["cases"]}
    assert report["peak_matmul"]["flops_per_s"] > 0
    for case in ok:
        if case["kind"] == "sft":
            assert case["seconds"] > 0 and case["tokens"] > 0 and case["peak_memory"] > 0
            assert 0 < case["mfu"] <= case["hfu"]
            assert case["hardware_flops"] >= case["model_flops"]
            # cmrp plan's estimate against this step's measured peak (live tensor bytes on the CPU)
            assert 0.75 <= case["estimate_over_measured"] <= 1.25, case
    lora, math = cases["bagel-tiny/sft/lora/ckpt/sdpa"], cases["bagel-tiny/sft/lora/ckpt/math"]
    assert lora["model_flops"] == math["model_flops"]  # the kernel changes the time, not the work
    assert lora["trainable"] < cases["bagel-tiny/sft/full/no-ckpt/sdpa"]["trainable"]
    if qlora in expected:  # the same adapters and work on a 4-bit base (counted before packing)
        q = cases[qlora]
        assert (q["trainable"], q["parameters"], q["model_flops"]) == (lora["trainable"], lora["parameters"],
                                                                        lora["model_flops"])
    slice_ = cases["bagel-tiny-slice/sft/full/no-ckpt/sdpa"]
    assert slice_["parameters"] < cases["bagel-tiny/sft/full/no-ckpt/sdpa"]["parameters"]
    grpo = cases["bagel-tiny/grpo"]
    assert grpo["rollout"]["images_per_s"] > 0 and grpo["rollout"]["mfu"] > 0
    assert grpo["update"]["model_flops"] > 0 and grpo["update"]["peak_memory"] > 0
    assert 0.75 <= grpo["update"]["estimate_over_measured"] <= 1.25, grpo["update"]
