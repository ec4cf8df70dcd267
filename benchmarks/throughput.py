"""SFT and GRPO throughput on a BAGEL card, and how GRPO step time scales, in one run.

    python benchmarks/throughput.py [--card bagel-tiny] [--quick] [--out results.json] [--plot scaling.png]

Emits JSON:
- sft: tokens/s (text) and images/s (t2i) of training steps; peak memory;
- grpo: one iteration's time split sample / reward / train at the default shape;
- scaling: GRPO iteration time vs group size G, image resolution and prompt length;
- flops: every timed step's FLOPs (`cmrp.perf.flops`), achieved FLOP/s and utilisation of the device's peak
  measured in this run (a dense matmul at the benchmark's dtype; MFU on a GPU);
- ratios (each against the naive variant measured in this same run):
  * g_scaling_exponent: slope of log(time) vs log(G) — below 1 means sub-linear (the prefix is encoded
    once per group, and G samples run as one batch);
  * prefix_reuse_speedup at G=8; window2_vs_all_train_cost at 10 steps;
  * async_rewards_speedup: rewards in a thread pool overlapping sampling vs computed after it.
The plot (needs matplotlib) shows the three scaling curves.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_rollout import PROMPT, build_adapter, emit, rollout_rate, train_cost  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sft_throughput(adapter, repeats: int, batch: int = 8, peak: dict | None = None) -> dict[str, float]:
    """Training steps on chat (text) and t2i (image) batches: forward, backward, optimiser step; with their
    FLOPs and utilisation of `peak` when given."""
    from PIL import Image

    from cmrp.data.tasks import Example, Segment

    tmp = Path(__file__).resolve().parent / ".bench_image.png"
    Image.new("RGB", (adapter.image_size, adapter.image_size), (200, 120, 40)).save(tmp)
    text = [Example("chat", [Segment("text", "user", PROMPT), Segment("text", "character", PROMPT, train=True)])
            for _ in range(batch)]
    t2i = [Example("t2i", [Segment("text", "user", "draw me"), Segment("image", "character", image=tmp,
                                                                    generate=True, train=True)])
           for _ in range(batch)]
    adapter.model.train()
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-4)

    def step(examples):
        batch_ = adapter.collate(examples).to(adapter.device)
        losses = adapter.losses(batch_)
        (losses["text"] + losses["image"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch_

    text_batch = adapter.collate(text)
    tokens = int((text_batch.labels != -100).sum())
    t_text = _median_time(lambda: step(text), repeats)
    t_img = _median_time(lambda: step(t2i), repeats)
    out = {"text_tokens_per_s": tokens / t_text, "t2i_images_per_s": batch / t_img, "peak_memory_mb": _peak_mb()}
    if peak is not None:
        from cmrp.perf.device import utilisation
        from cmrp.perf.flops import SFTLayout, Trainable, sft_step_flops

        train = Trainable.from_model(adapter.model)
        for name, examples, seconds in (("text", text, t_text), ("t2i", t2i, t_img)):
            layout = SFTLayout.from_batch(adapter.collate(examples), adapter.arch)
            out[f"{name}_step"] = {"seconds": seconds,
                                   **utilisation(sft_step_flops(adapter.arch, layout, train).total, seconds, peak)}
    tmp.unlink(missing_ok=True)
    adapter.model.eval()
    return out


def grpo_iteration(adapter, *, group: int, steps: int, prompt_repeat: int = 1, asynchronous: bool = True,
                   prompts: int = 2, peak: dict | None = None) -> dict[str, float]:
    """One CharacterGRPOModule iteration (no Lightning Trainer): rollout, sandbox rewards, update; with the
    model FLOPs of sampling and update (rewards not counted) and their utilisation of `peak` when given."""
    from omegaconf import OmegaConf

    from cmrp.config.schema import GRPOConfig
    from cmrp.data.tasks import Example, ImagePrompt, Segment
    from cmrp.rewards import build_reward
    from cmrp.rewards.base import VQAQuestion
    from cmrp.training.grpo import CharacterGRPOModule

    cfg = OmegaConf.structured(GRPOConfig(max_steps=1, prompts_per_step=prompts, group_size=group,
                                          sample_steps=steps, window_size=2, minibatch_size=group,
                                          reward_workers=2))
    preset = {"name": "bench", "terms": {"vqa_consistency": {"weight": 0.4, "kwargs": {}},
                                         "lpips_diversity": {"weight": 0.2, "kwargs": {"net": "pixel"}},
                                         "trainset_penalty": {"weight": 0.4, "kwargs": {"model": "pixel"}}}}
    reward = build_reward(preset, parallel=True)
    refs = torch.rand(4, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(0))
    question = VQAQuestion("What colour is it?", "orange", ["orange", "blue", "green", "red"], 0)
    module = CharacterGRPOModule(adapter, reward, cfg, questions_for=lambda p: [question] * 3,
                                 reference_images=refs)
    for _, p in module._trained_params():  # noqa: SLF001 - benchmark drives the module by hand
        p.grad = None
    optimizer, _ = module.configure_optimizers()["optimizer"], None
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    if asynchronous:
        module.on_train_start()
    text = " ".join([PROMPT] * prompt_repeat)
    batch = [ImagePrompt(Example("t2i", [Segment("text", "user", f"{text} {i}")]), text) for i in range(prompts)]
    t = time.perf_counter()
    module.training_step(batch, 0)
    total = time.perf_counter() - t
    module.on_train_end()
    log = module.last_log
    out = {"iteration_s": total, "sample_s": log["grpo/time_sample_s"], "reward_s": log["grpo/time_reward_s"],
           "train_s": log["grpo/time_train_s"]}
    if peak is not None:
        from cmrp.perf.device import utilisation
        from cmrp.perf.flops import RolloutShape, Trainable, grpo_update_flops, rollout_flops

        prefix = int(adapter.collate([batch[0].context]).input_ids.shape[1])
        shape = RolloutShape(prompts, group, steps, prefix, (adapter.image_size, adapter.image_size))
        sample = rollout_flops(adapter.arch, shape).total
        update = grpo_update_flops(adapter.arch, shape, Trainable.from_model(adapter.model), window=2,
                                   minibatch=group).total
        out["sample"] = utilisation(sample, out["sample_s"], peak)
        out["train"] = utilisation(update, out["train_s"], peak)
    return out


def _slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="SFT/GRPO throughput and GRPO scaling")
    parser.add_argument("--card", default="bagel-tiny")
    parser.add_argument("--quick", action="store_true", help="fewer points and repeats (CI-sized)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    repeats = 2 if args.quick else 3
    from cmrp.perf.device import device_label, measure_matmul_peak

    peak = measure_matmul_peak(device, dtype)
    adapter = build_adapter(args.card, device, dtype)
    result: dict = {"benchmark": "throughput", "card": args.card, "dtype": args.dtype,
                    "device": device_label(device), "peak_matmul": peak}
    result["sft"] = sft_throughput(adapter, repeats, peak=peak)
    result["grpo"] = grpo_iteration(adapter, group=8, steps=10, peak=peak)

    groups = [1, 2, 4, 8, 16] if not args.quick else [1, 4, 16]
    by_g = [grpo_iteration(adapter, group=g, steps=10)["iteration_s"] for g in groups]
    lengths = [1, 4, 8] if not args.quick else [1, 8]
    by_len = [grpo_iteration(adapter, group=8, steps=10, prompt_repeat=n)["iteration_s"] for n in lengths]
    sizes = [adapter.image_size]
    by_res = [result["grpo"]["iteration_s"]]
    try:  # a second resolution: the same architecture at twice the image side
        bigger = build_adapter(args.card, device, dtype, image_size=2 * adapter.image_size)
        sizes.append(bigger.image_size)
        by_res.append(grpo_iteration(bigger, group=8, steps=10)["iteration_s"])
    except Exception as err:  # noqa: BLE001 - report, do not fail the whole benchmark
        result["resolution_error"] = str(err)
    result["scaling"] = {
        "group_size": dict(zip(map(str, groups), by_g, strict=True)),
        "prompt_length_x": dict(zip(map(str, lengths), by_len, strict=True)),
        "image_size": dict(zip(map(str, sizes), by_res, strict=True)),
    }
    sync = grpo_iteration(adapter, group=8, steps=10, asynchronous=False)["iteration_s"]
    asyn = grpo_iteration(adapter, group=8, steps=10, asynchronous=True)["iteration_s"]
    shape = {"prompts": 2, "group": 8, "steps": 10}
    cached = rollout_rate(adapter, reuse=True, repeats=repeats, **shape)
    naive = rollout_rate(adapter, reuse=False, repeats=repeats, **shape)
    w2 = train_cost(adapter, window=2, repeats=repeats, **shape)["iteration_s"]
    wall = train_cost(adapter, window=10, repeats=repeats, **shape)["iteration_s"]
    cfg_on = rollout_rate(adapter, reuse=True, repeats=repeats, cfg_scale=4.0, **shape)
    result["ratios"] = {
        "g_scaling_exponent": _slope(groups, by_g),
        "time_g16_over_g1": by_g[-1] / by_g[0],
        "prefix_reuse_speedup": cached / naive,
        "window2_vs_all_train_cost": wall / w2,
        "async_rewards_speedup": sync / asyn,
        "cfg_off_vs_on_rollout_speed": cached / cfg_on,
    }
    emit(result, args.out)
    if args.plot:
        _plot(result, args.plot)
    return result


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (key, label) in zip(axes, [("group_size", "group size G"), ("prompt_length_x", "prompt length (x)"),
                                       ("image_size", "image side (px)")], strict=True):
        points = result["scaling"][key]
        xs, ys = [float(x) for x in points], list(points.values())
        ax.plot(xs, ys, "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("GRPO iteration (s)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['card']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
