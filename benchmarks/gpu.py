"""The one-shot benchmark for a lent GPU (`benchmarks/gpu.sh` runs it): one JSON with, for `bagel-mid` and a
BAGEL-7B-shaped slice (the real widths of backbones/bagel-7b-mot.yaml, a few layers, random init), in bf16
(fp32 master weights + bf16 autocast, as the recipes' `bf16-mixed`):
- SFT step time, tokens/s, model FLOPs, MFU / HFU and peak memory (measured, and `cmrp plan`'s estimate next
  to it), full fine-tuning vs LoRA (r 64, both experts) x gradient checkpointing on/off, with PyTorch SDPA;
  plus SDPA's reference (math) kernel, flash-attn's kernel when the package is installed, and QLoRA (the
  same LoRA on a bitsandbytes NF4 base, checkpointed) when bitsandbytes is installed;
- GRPO: rollout images/s (G = 8, 15 steps, CFG 4, one 256-token prompt) and the update's time (SDE window of
  3 steps, generation expert trained), each with FLOPs, MFU and peak memory.
MFU = model FLOPs (`cmrp.perf.flops`, no recomputation) / time / the peak of a dense bf16 matmul measured in
this same run; HFU also counts what gradient checkpointing recomputes.

Every case runs in a worker process; a case that fails (out of memory, an error, a crash, a timeout) is
recorded with its reason and the rest still run. A time budget (default 450 s) skips what would not fit.

    python benchmarks/gpu.py [--out FILE] [--budget S] [--image-size PX] [--only SUBSTRING]
    python benchmarks/gpu.py --smoke      # tiny cards on the CPU in under a minute: the test suite runs this
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULT = "GPU_BENCH_RESULT "
SLICE_LAYERS = 4  # decoder and SigLIP layers of the 7B-shaped slice
LORA = {"r": 64, "alpha": 128, "dropout": 0.0, "targets": "default"}


def models(smoke: bool, image_size: int) -> dict[str, dict[str, Any]]:
    """name -> card, architecture changes, text tokens per SFT sequence and GRPO prompt."""
    if smoke:
        return {
            "bagel-tiny": {"card": "bagel-tiny", "changes": {}, "text": 24, "prompt": 24, "batch": 4},
            "bagel-tiny-slice": {"card": "bagel-tiny", "changes": {"llm_layers": 2, "vit_layers": 1}, "text": 24,
                                 "prompt": 24, "batch": 4},
        }
    return {
        "bagel-mid": {"card": "bagel-mid", "changes": {}, "text": 256, "prompt": 256, "batch": 4},
        "bagel-7b-slice": {"card": "bagel-7b-mot",
                           "changes": {"llm_layers": SLICE_LAYERS, "vit_layers": SLICE_LAYERS, "image_size": image_size,
                                       "vit_resize": [224, image_size]},
                           "text": 512, "prompt": 256, "batch": 4},
    }


def cases(smoke: bool, image_size: int, flash: bool, nf4: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "peak_matmul", "kind": "peak"}]
    for model in models(smoke, image_size):
        slim = smoke and model.endswith("slice")
        for mode in ("full", "lora"):
            for ckpt in (False, True):
                if slim and (mode, ckpt) != ("full", False):
                    continue  # the smoke run checks the slice path once
                out.append({"name": f"{model}/sft/{mode}/{'ckpt' if ckpt else 'no-ckpt'}/sdpa", "kind": "sft",
                            "model": model, "mode": mode, "checkpointing": ckpt, "attention": "sdpa"})
        if slim:
            continue
        out.append({"name": f"{model}/sft/lora/ckpt/math", "kind": "sft", "model": model, "mode": "lora",
                    "checkpointing": True, "attention": "math"})
        if flash:
            out.append({"name": f"{model}/sft/lora/ckpt/flash_attn", "kind": "sft", "model": model, "mode": "lora",
                        "checkpointing": True, "attention": "flash_attn"})
        else:
            out.append({"name": f"{model}/sft/lora/ckpt/flash_attn", "kind": "skip",
                        "reason": "flash_attn is not installed"})
        qlora = f"{model}/sft/qlora/ckpt/sdpa"
        if nf4:
            out.append({"name": qlora, "kind": "sft", "model": model, "mode": "qlora", "checkpointing": True,
                        "attention": "sdpa"})
        else:
            out.append({"name": qlora, "kind": "skip", "reason": "bitsandbytes is not installed"})
        out.append({"name": f"{model}/grpo", "kind": "grpo", "model": model})
    return out


# -- the worker: runs cases, prints one result line per case ----------------------------------------------
def _setup(args):
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return torch, device, dtype


def _peak_case(args) -> dict:
    from cmrp.perf.device import device_label, measure_matmul_peak

    torch, device, dtype = _setup(args)
    out = measure_matmul_peak(device, dtype, min_seconds=0.05 if args.smoke else 1.0)
    return {"device": device_label(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if device == "cuda" else None, **out}


def _measure(torch, device, fn, repeats: int, tensors) -> tuple[float, float]:
    """Median seconds of fn() after one warm-up, and the peak memory of one steady-state call."""
    from cmrp.perf.device import timed

    seconds = timed(fn, device=device, repeats=repeats, warmup=1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return seconds, float(torch.cuda.max_memory_allocated())
    from cmrp.perf.memtrack import LiveTensorBytes

    with LiveTensorBytes(tensors()) as live:
        fn()
    return seconds, float(live.peak)


def _autocast(torch, device, dtype):
    return torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)


def _sft_case(args, case) -> dict:
    from omegaconf import OmegaConf

    from cmrp.perf.flops import SFTLayout, Trainable, sft_step_flops
    from cmrp.perf.memory import Precision, SequenceShape, Strategy, estimate_memory
    from cmrp.perf.model import LoraSpec, model_counts, planned_counts
    from cmrp.perf.workload import build_adapter, sft_examples
    from cmrp.training.peft import apply_finetune

    torch, device, dtype = _setup(args)
    spec = models(args.smoke, args.image_size)[case["model"]]
    adapter = build_adapter(spec["card"], device=device, dtype=torch.float32, **spec["changes"])
    if case["attention"] == "flash_attn":
        adapter.model.to(dtype)  # flash-attn's kernel needs bf16 tensors: the whole model in bf16
    planned = None
    if case["mode"] == "qlora":  # counted before the NF4 layers pack two weights a byte
        planned, _ = planned_counts(adapter, mode="qlora", lora=LoraSpec(LORA["r"], LORA["targets"], quantized=True))
    apply_finetune(adapter, OmegaConf.create({"mode": case["mode"], **LORA,
                                              "gradient_checkpointing": case["checkpointing"]}))
    adapter.model.train()
    batch = adapter.collate(sft_examples(adapter, batch=spec["batch"], text_tokens=spec["text"],
                                         tasks=("t2i", "vqa", "chat", "t2i"))).to(device)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95))
    kernel = _sdpa_context(torch, case["attention"])

    def step():
        with kernel():  # backward too: checkpointing recomputes the forward there, with the same kernel
            with _autocast(torch, device, dtype):
                losses = adapter.losses(batch)
                loss = 0.25 * losses["text"] + losses["image"]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def tensors():
        states = [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s)]
        return [*adapter.model.parameters(), *adapter.model.buffers(), *adapter.bagel.vae.parameters(), *states,
                *(v for v in batch.__dict__.values() if torch.is_tensor(v))]

    seconds, peak = _measure(torch, device, step, args.repeats, tensors)
    arch = adapter.arch
    train = Trainable.from_model(adapter.model)
    layout = SFTLayout.from_batch(batch, arch)
    counts = planned or model_counts(adapter)[0]
    shape = SequenceShape.from_batch(batch, arch)
    precision = Precision.parse("bf16-mixed" if dtype != torch.float32 else "32-true")
    if case["attention"] == "flash_attn":
        precision = Precision.parse("bf16-true")
    estimate = estimate_memory(arch, counts, shape, precision=precision, strategy=Strategy("single", 1), train=train)
    return {
        "seconds": seconds, "tokens": layout.und_tokens + layout.gen_tokens,
        "tokens_per_s": (layout.und_tokens + layout.gen_tokens) / seconds,
        "batch": {"sequences": shape.batch, "padded_length": shape.length, "gen_tokens": shape.gen_tokens,
                  "vit_tokens": sum(shape.vit_patches)},
        "parameters": counts.total, "trainable": counts.trainable,
        "model_flops": sft_step_flops(arch, layout, train).total,
        "hardware_flops": sft_step_flops(arch, layout, train, checkpointing=case["checkpointing"]).total,
        "peak_memory": peak, "estimated_peak_memory": estimate.peak(case["checkpointing"]),
    }


def _sdpa_context(torch, attention: str):
    import contextlib

    if attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return lambda: sdpa_kernel([SDPBackend.MATH])
    if attention == "flash_attn":
        import flash_attn  # noqa: F401 - fail the case clearly when it is missing
    return contextlib.nullcontext


def _grpo_case(args, case) -> dict:
    from cmrp.data.tasks import Example, Segment
    from cmrp.perf.flops import RolloutShape, Trainable, grpo_update_flops, guided_steps, rollout_flops
    from cmrp.perf.memory import Precision, Strategy, estimate_memory, grpo_update_shape
    from cmrp.perf.model import model_counts
    from cmrp.perf.workload import build_adapter, context_of_tokens
    from cmrp.sampling.guidance import Guidance
    from cmrp.sampling.spec import SamplerSpec
    from cmrp.training.advantages import ppo_clipped_loss
    from cmrp.training.peft import freeze_to_groups

    torch, device, dtype = _setup(args)
    spec = models(args.smoke, args.image_size)[case["model"]]
    adapter = build_adapter(spec["card"], device=device, dtype=torch.float32, **spec["changes"])
    adapter.set_gradient_checkpointing(True)  # as the recipes train (the update's image blocks are long)
    group, steps, window = (4, 4, 2) if args.smoke else (8, 15, 3)
    context, prefix = context_of_tokens(adapter, spec["prompt"])
    empty = int(adapter.collate([Example("t2i", [Segment("text", "user", "")])]).input_ids.shape[1])
    cfg = 4.0

    def rollout():
        with _autocast(torch, device, dtype):
            spec = SamplerSpec(steps=steps, noise=0.7, window=(0, window), guidance=Guidance(text_scale=cfg))
            return adapter.sample_images([context], spec, n=group, seed=0)

    def model_tensors():
        return [*adapter.model.parameters(), *adapter.model.buffers(), *adapter.bagel.vae.parameters()]

    roll_s, roll_peak = _measure(torch, device, rollout, args.repeats, model_tensors)
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    freeze_to_groups(adapter, ["generation"])
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    sample = rollout()
    adv = torch.randn(group, device=device)

    def update():
        for k in range(sample.num_steps):
            with _autocast(torch, device, dtype):
                logp = adapter.rollout_logprob(sample, k)
                loss, _ = ppo_clipped_loss(logp, sample.trajectory.logprobs[:, k].to(logp.device), adv, 1e-5)
            (loss / sample.num_steps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def update_tensors():
        states = [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s)]
        return [*model_tensors(), *states]

    upd_s, upd_peak = _measure(torch, device, update, args.repeats, update_tensors)
    arch = adapter.arch
    hw = (adapter.image_size, adapter.image_size)
    shape = RolloutShape(1, group, steps, prefix, hw, branches=2,
                         guided=guided_steps(steps, arch.timestep_shift, (0.0, 1.0)), uncond_tokens=(empty,))
    train = Trainable.from_model(adapter.model)
    counts, _ = model_counts(adapter)
    precision = Precision.parse("bf16-mixed" if dtype != torch.float32 else "32-true")
    estimate = estimate_memory(arch, counts, grpo_update_shape(arch, minibatch=group, branches=2, prefix_tokens=prefix,
                                                               image_hw=hw),
                               precision=precision, strategy=Strategy("single", 1), train=train)
    return {
        "group": group, "steps": steps, "cfg_scale": cfg, "window": window, "prefix_tokens": prefix,
        "latent_tokens": shape.latent_tokens(arch),
        "rollout": {"seconds": roll_s, "images_per_s": group / roll_s, "model_flops": rollout_flops(arch, shape).total,
                    "peak_memory": roll_peak},
        "update": {"seconds": upd_s, "checkpointing": True,
                   "model_flops": grpo_update_flops(arch, shape, train, window=window).total,
                   "peak_memory": upd_peak, "estimated_peak_memory": estimate.peak(True)},
    }


def _run_case(args, case) -> dict:
    failures = dict(item.rsplit(":", 1) for item in (args.simulate_failure or "").split(",") if item)
    if case["name"] in failures:
        if failures[case["name"]] == "crash":
            os._exit(139)  # the worker dies without a word, like a segfault
        raise MemoryError("simulated out-of-memory (--simulate-failure)")
    kind = case["kind"]
    if kind == "peak":
        return _peak_case(args)
    if kind == "sft":
        return _sft_case(args, case)
    if kind == "grpo":
        return _grpo_case(args, case)
    raise ValueError(f"unknown case kind {kind!r}")


def worker(args) -> None:
    """Read case specs (one JSON per line) from stdin; print one result line per case."""
    import gc

    for line in sys.stdin:
        case = json.loads(line)
        start = time.perf_counter()
        try:
            result = {"status": "ok", **_run_case(args, case)}
        except Exception as err:  # noqa: BLE001 - every failure is recorded, the next case still runs
            oom = type(err).__name__ in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(err).lower()
            result = {"status": "oom" if oom else "error", "error": f"{type(err).__name__}: {str(err)[:500]}"}
        result["wall_s"] = time.perf_counter() - start
        print(RESULT + json.dumps({"name": case["name"], **result}), flush=True)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


# -- the driver: a worker per batch of cases, failures recorded, a time budget ------------------------------
def _start_worker(args) -> tuple[subprocess.Popen, queue.Queue]:
    cmd = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats), "--image-size", str(args.image_size)]
    cmd += ["--smoke"] * args.smoke + ["--cpu"] * args.cpu
    if args.simulate_failure:
        cmd += ["--simulate-failure", args.simulate_failure]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    lines: queue.Queue = queue.Queue()

    def pump(stream, tag):
        for line in stream:
            lines.put((tag, line))
        lines.put((tag, None))

    threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True).start()
    return proc, lines


def _await(proc, lines: queue.Queue, timeout: float) -> tuple[dict | None, str]:
    """The next result line, or None (and the worker's last stderr) when it died or ran out of time."""
    deadline = time.monotonic() + timeout
    err_tail: list[str] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, "timeout"
        try:
            tag, line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                return None, "".join(err_tail[-20:])
            continue
        if line is None:
            if proc.poll() is not None and tag == "out":
                return None, "".join(err_tail[-20:])
            continue
        if tag == "err":
            err_tail.append(line)
        elif line.startswith(RESULT):
            return json.loads(line[len(RESULT):]), ""


def drive(args) -> dict:
    try:
        import flash_attn

        flash = getattr(flash_attn, "__version__", "installed")
    except ImportError:
        flash = None
    todo = cases(args.smoke, args.image_size, bool(flash), nf4=importlib.util.find_spec("bitsandbytes") is not None)
    if args.only:
        todo = [c for c in todo if c["kind"] == "peak" or args.only in c["name"]]
    start = time.monotonic()
    results: list[dict] = []
    proc = lines = None
    per_process = args.cases_per_process or (len(todo) if args.smoke else 1)
    ran = 0
    for case in todo:
        if case["kind"] == "skip":
            results.append({"name": case["name"], "status": "skipped", "reason": case["reason"]})
            continue
        elapsed = time.monotonic() - start
        if elapsed > args.budget:
            results.append({"name": case["name"], "status": "skipped", "reason": f"time budget of {args.budget:.0f} s spent"})
            continue
        if proc is None or proc.poll() is not None or ran >= per_process:
            if proc is not None:
                _stop(proc)
            proc, lines = _start_worker(args)
            ran = 0
        proc.stdin.write(json.dumps(case) + "\n")
        proc.stdin.flush()
        ran += 1
        timeout = min(args.case_timeout, max(1.0, args.budget + args.case_timeout - elapsed))
        result, why = _await(proc, lines, timeout)
        if result is None:
            _stop(proc)
            code, proc = proc.returncode, None
            status = "timeout" if why == "timeout" else ("oom" if "out of memory" in why.lower() else "crashed")
            result = {"name": case["name"], "status": status, "error": why[-1500:] or f"worker exit code {code}"}
        results.append({**case, **result})
        print(f"[gpu bench] {case['name']}: {result['status']} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    if proc is not None:
        _stop(proc)
    return _report(results, time.monotonic() - start, flash, args)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()  # our own worker, by its handle
            proc.wait()


def _report(results: list[dict], total_s: float, flash, args) -> dict:
    """The JSON: per case its measures plus achieved FLOP/s, MFU / HFU against the measured matmul peak."""
    peak_case = next((r for r in results if r.get("kind") == "peak" and r["status"] == "ok"), None)
    peak = peak_case["flops_per_s"] if peak_case else None
    for r in results:
        if r.get("status") != "ok" or not peak:
            continue
        if r.get("kind") == "sft":
            r["achieved_flops_per_s"] = r["model_flops"] / r["seconds"]
            r["mfu"] = r["achieved_flops_per_s"] / peak
            r["hfu"] = r["hardware_flops"] / r["seconds"] / peak
            r["estimate_over_measured"] = r["estimated_peak_memory"] / r["peak_memory"]
        elif r.get("kind") == "grpo":
            for part in ("rollout", "update"):
                r[part]["achieved_flops_per_s"] = r[part]["model_flops"] / r[part]["seconds"]
                r[part]["mfu"] = r[part]["achieved_flops_per_s"] / peak
            r["update"]["estimate_over_measured"] = r["update"]["estimated_peak_memory"] / r["update"]["peak_memory"]
    return {
        "benchmark": "gpu", "smoke": args.smoke,
        "device": peak_case["device"] if peak_case else None,
        "torch": peak_case.get("torch") if peak_case else None, "cuda": peak_case.get("cuda") if peak_case else None,
        "flash_attn": flash, "precision": "bf16-mixed (fp32 weights, bf16 autocast)" if not args.smoke else "fp32",
        "peak_matmul": {k: peak_case[k] for k in ("flops_per_s", "matmul_size", "dtype")} if peak_case else None,
        "slice": f"bagel-7b-mot widths, {SLICE_LAYERS} decoder + {SLICE_LAYERS} SigLIP layers, {args.image_size} px images",
        "total_s": total_s, "budget_s": args.budget,
        "cases": results,
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny cards, CPU-sized, under a minute")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    parser.add_argument("--budget", type=float, default=None, help="seconds for all cases (default 450; smoke 50)")
    parser.add_argument("--case-timeout", type=float, default=None, help="seconds per case (default 150; smoke 40)")
    parser.add_argument("--image-size", type=int, default=1008,
                        help="the 7B slice's image side (generated and largest understood); a multiple of 112")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measure (default 3; smoke 1)")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--cases-per-process", type=int, default=None,
                        help="cases a worker runs before a fresh one starts (default: 1 on GPU, all in --smoke)")
    parser.add_argument("--cpu", action="store_true", help="ignore the GPU")
    # tests: "CASE:oom,CASE:crash" makes those cases fail in the worker (an exception / the process dying)
    parser.add_argument("--simulate-failure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.worker:
        worker(args)
        return None
    args.budget = args.budget if args.budget is not None else (50.0 if args.smoke else 450.0)
    args.case_timeout = args.case_timeout if args.case_timeout is not None else (40.0 if args.smoke else 150.0)
    report = drive(args)
    text = json.dumps(report, indent=2)
    args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
