"""GRPO throughput on a BAGEL card: rollout images/s and trained transitions/s, with the efficiency
techniques on and off, measured in one run so the ratios compare like with like; FLOP-accounted.

    python benchmarks/grpo_rollout.py [--card bagel-tiny] [--group-size 8] [--steps 10] [--repeats 3]
                                      [--prefix-lengths 64,128,256,512,1024] [--image-sizes 16,32,64]
                                      [--quick | --smoke] [--out FILE] [--plot FILE.png]

Prints one JSON object (and writes it to --out):
- rollout images/s with and without prefix reuse, update seconds with an SDE window of 2 steps and of
  every step, each with its FLOPs (`cmrp.perf.flops`), achieved FLOP/s and utilisation of the device's
  peak measured in this run (a dense matmul at the benchmark's dtype; MFU on a GPU);
- ratios: prefix_reuse_speedup (rollout time without / with), window2_vs_all_train_cost;
- prefix_scaling: rollout seconds vs prompt length (`--prefix-lengths`), with prefix reuse, without, and
  the bound where the prefix is free (an empty context: latent tokens only), as ratios to that bound —
  measured and predicted from FLOPs; `saving_captured` = (no reuse - reuse) / (no reuse - bound), the
  share of the avoidable prefix cost that reuse removes;
- latent_scaling: the same ratios vs latent tokens per image (`--image-sizes`) at one prompt length.
`--plot` draws rollout cost vs prompt length and vs latent tokens (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cmrp.perf.workload import ROLEPLAY_PROMPT as PROMPT
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec

__all__ = ["PROMPT", "build_adapter", "emit", "rollout_rate", "train_cost"]


def build_adapter(card_name: str, device: str, dtype: torch.dtype, **changes):
    """A random-init adapter of the card (see `cmrp.perf.workload.build_adapter`)."""
    from cmrp.perf.workload import build_adapter as build

    return build(card_name, device=device, dtype=dtype, **changes)


def _contexts(prompts: int):
    from cmrp.data.tasks import Example, Segment

    return [Example("t2i", [Segment("text", "user", f"{PROMPT} ({i})")]) for i in range(prompts)]


def _prefix_len(adapter, contexts) -> int:
    return int(adapter.collate(contexts).input_ids.shape[1])


def _empty_len(adapter) -> int:
    from cmrp.data.tasks import Example, Segment

    return _prefix_len(adapter, [Example("t2i", [Segment("text", "user", "")])])


def _timed(fn, repeats: int, device: str) -> float:
    from cmrp.perf.device import timed

    return timed(fn, device=device, repeats=repeats)


def rollout_seconds(adapter, contexts, *, group: int, steps: int, reuse: bool, repeats: int,
                    cfg_scale: float = 1.0) -> float:
    def run():
        with torch.no_grad():
            spec = SamplerSpec(steps=steps, noise=0.7, window=(0, 2), guidance=Guidance(text_scale=cfg_scale))
            adapter.sample_images(contexts, spec, n=group, seed=0, reuse_prefix=reuse)

    return _timed(run, repeats, str(adapter.device))


def rollout_rate(adapter, *, prompts: int, group: int, steps: int, reuse: bool, repeats: int,
                 cfg_scale: float = 1.0) -> float:
    """Images per second of a rollout of `prompts` contexts x `group` samples."""
    seconds = rollout_seconds(adapter, _contexts(prompts), group=group, steps=steps, reuse=reuse, repeats=repeats,
                              cfg_scale=cfg_scale)
    return prompts * group / seconds


def train_cost(adapter, *, prompts: int, group: int, steps: int, window: int, repeats: int) -> dict[str, float]:
    """Seconds of the GRPO update (log-prob recomputation + backward over the window) per iteration."""
    from cmrp.training.advantages import ppo_clipped_loss

    rollout = adapter.sample_images(_contexts(prompts), SamplerSpec(steps=steps, noise=0.7, window=(0, window)),
                                    n=group,
                                    seed=0)
    params = [p for n, p in adapter.model.named_parameters() if "_moe_gen" in n or "llm2vae" in n]
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    adv = torch.randn(len(rollout))

    def run():
        for k in range(rollout.num_steps):
            logp = adapter.rollout_logprob(rollout, k)
            loss, _ = ppo_clipped_loss(logp, rollout.trajectory.logprobs[:, k].to(logp.device), adv.to(logp.device), 1e-4)
            loss.backward()
        for p in params:
            p.grad = None

    seconds = _timed(run, repeats, str(adapter.device))
    return {"iteration_s": seconds, "transitions_per_s": len(rollout) * rollout.num_steps / seconds}


def _shape(adapter, *, prompts: int, group: int, steps: int, prefix: int, cfg_scale: float = 1.0):
    from cmrp.perf.flops import RolloutShape, guided_steps

    guided = cfg_scale != 1.0
    return RolloutShape(prompts, group, steps, prefix, (adapter.image_size, adapter.image_size),
                        branches=2 if guided else 1,
                        guided=guided_steps(steps, adapter.arch.timestep_shift, (0.0, 1.0)) if guided else 0,
                        uncond_tokens=(_empty_len(adapter),) if guided else ())


def _accounted(flops: float, seconds: float, peak: dict) -> dict[str, float]:
    from cmrp.perf.device import utilisation

    return {"seconds": seconds, **utilisation(flops, seconds, peak)}


def prefix_scaling(adapter, lengths: list[int], *, group: int, steps: int, repeats: int) -> list[dict]:
    """Rollout cost of one prompt of each length: with reuse, without, and with a free prefix (the bound)."""
    from cmrp.perf.flops import rollout_flops
    from cmrp.perf.workload import context_of_tokens

    arch = adapter.arch
    empty, _ = context_of_tokens(adapter, 0)
    bound = rollout_seconds(adapter, [empty], group=group, steps=steps, reuse=True, repeats=repeats)
    rows = []
    for n in lengths:
        context, prefix = context_of_tokens(adapter, n)
        shape = _shape(adapter, prompts=1, group=group, steps=steps, prefix=prefix)
        reuse = rollout_seconds(adapter, [context], group=group, steps=steps, reuse=True, repeats=repeats)
        naive = rollout_seconds(adapter, [context], group=group, steps=steps, reuse=False, repeats=repeats)
        f_bound = rollout_flops(arch, shape, free_prefix=True).total
        f_reuse = rollout_flops(arch, shape, reuse_prefix=True).total
        f_naive = rollout_flops(arch, shape, reuse_prefix=False).total
        rows.append({
            "prefix_tokens": prefix, "reuse_s": reuse, "no_reuse_s": naive, "bound_s": bound,
            "reuse_ratio_to_bound": reuse / bound, "no_reuse_ratio_to_bound": naive / bound,
            "saving_captured": (naive - reuse) / (naive - bound) if naive > bound else float("nan"),
            "flops": {"reuse_ratio_to_bound": f_reuse / f_bound, "no_reuse_ratio_to_bound": f_naive / f_bound,
                      "saving_captured": (f_naive - f_reuse) / (f_naive - f_bound)},
        })
    return rows


def latent_scaling(card: str, device: str, dtype: torch.dtype, sizes: list[int], *, prefix_tokens: int, group: int,
                   steps: int, repeats: int) -> list[dict]:
    """Ratios to the free-prefix bound at one prompt length, for images of each side (latent tokens)."""
    from cmrp.perf.flops import latent_tokens, rollout_flops
    from cmrp.perf.workload import context_of_tokens

    rows = []
    for side in sizes:
        adapter = build_adapter(card, device, dtype, image_size=side)
        empty, _ = context_of_tokens(adapter, 0)
        context, prefix = context_of_tokens(adapter, prefix_tokens)
        shape = _shape(adapter, prompts=1, group=group, steps=steps, prefix=prefix)
        bound = rollout_seconds(adapter, [empty], group=group, steps=steps, reuse=True, repeats=repeats)
        reuse = rollout_seconds(adapter, [context], group=group, steps=steps, reuse=True, repeats=repeats)
        naive = rollout_seconds(adapter, [context], group=group, steps=steps, reuse=False, repeats=repeats)
        f_bound = rollout_flops(adapter.arch, shape, free_prefix=True).total
        rows.append({
            "image_side": side, "latent_tokens": latent_tokens(adapter.arch, (side, side)), "prefix_tokens": prefix,
            "reuse_s": reuse, "no_reuse_s": naive, "bound_s": bound,
            "reuse_ratio_to_bound": reuse / bound, "no_reuse_ratio_to_bound": naive / bound,
            "flops": {"reuse_ratio_to_bound": rollout_flops(adapter.arch, shape).total / f_bound,
                      "no_reuse_ratio_to_bound": rollout_flops(adapter.arch, shape, reuse_prefix=False).total / f_bound},
        })
    return rows


def emit(result: dict, out: Path | None) -> None:
    """Print a benchmark's JSON, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def plot(result: dict, path: Path) -> bool:
    """Rollout seconds vs prompt length (reuse, no reuse, free-prefix bound) and ratios vs latent tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    rows = result["prefix_scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["prefix_tokens"] for r in rows]
    ax = axes[0]
    ax.plot(xs, [r["no_reuse_s"] for r in rows], "o-", label="no prefix reuse")
    ax.plot(xs, [r["reuse_s"] for r in rows], "o-", label="prefix reuse (cmrp)")
    ax.plot(xs, [r["bound_s"] for r in rows], "--", color="grey", label="bound: prefix free (latent only)")
    for key, colour in (("no_reuse_ratio_to_bound", "C0"), ("reuse_ratio_to_bound", "C1")):
        ax.plot(xs, [r["bound_s"] * r["flops"][key] for r in rows], ":", color=colour, alpha=0.7)
    ax.plot([], [], ":", color="black", alpha=0.7, label="predicted from FLOPs (x bound)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"rollout seconds (G={result['group']}, {result['steps']} steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    lat = result.get("latent_scaling") or []
    if lat:
        xs = [r["latent_tokens"] for r in lat]
        ax.plot(xs, [r["no_reuse_ratio_to_bound"] for r in lat], "o-", label="no prefix reuse")
        ax.plot(xs, [r["reuse_ratio_to_bound"] for r in lat], "o-", label="prefix reuse (cmrp)")
        ax.axhline(1.0, ls="--", color="grey", label="bound")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"latent tokens per image (prompt {lat[0]['prefix_tokens']} tokens)")
        ax.set_ylabel("rollout cost / bound")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['card']} on {result['device']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="bagel-tiny")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prefix-lengths", type=_ints, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--image-sizes", type=_ints, default=None,
                        help="image sides for the latent-token sweep (default: 0.5x, 1x, 2x the card's)")
    parser.add_argument("--quick", action="store_true", help="G 4, 5 steps, 1 repeat, 3 prompt lengths")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run at toy sizes (tests)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick or args.smoke:
        args.group_size, args.steps, args.repeats = 4, (2 if args.smoke else 5), 1
        args.prefix_lengths = [16, 64] if args.smoke else [64, 256, 1024]

    from cmrp.perf.device import device_label, measure_matmul_peak
    from cmrp.perf.flops import Trainable, grpo_update_flops, rollout_flops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    peak = measure_matmul_peak(device, dtype, min_seconds=0.05 if args.smoke else 0.5)
    adapter = build_adapter(args.card, device, dtype)
    arch = adapter.arch
    contexts = _contexts(args.prompts)
    shape = _shape(adapter, prompts=args.prompts, group=args.group_size, steps=args.steps,
                   prefix=_prefix_len(adapter, contexts))
    common = {"prompts": args.prompts, "group": args.group_size, "steps": args.steps}
    images = args.prompts * args.group_size
    cached = rollout_seconds(adapter, contexts, group=args.group_size, steps=args.steps, reuse=True, repeats=args.repeats)
    naive = rollout_seconds(adapter, contexts, group=args.group_size, steps=args.steps, reuse=False,
                            repeats=args.repeats)
    windows = {"window_2": 2, f"window_all_{args.steps}": args.steps}
    train = {}
    for name, window in windows.items():
        cost = train_cost(adapter, window=window, repeats=args.repeats, **common)
        flops = grpo_update_flops(arch, shape, Trainable.generation_expert(), window=window).total
        train[name] = {**cost, **_accounted(flops, cost["iteration_s"], peak)}
    result = {
        "benchmark": "grpo_rollout",
        "device": device_label(device),
        "card": args.card,
        "dtype": args.dtype,
        **common,
        "prefix_tokens": shape.prefix_tokens,
        "latent_tokens": shape.latent_tokens(arch),
        "peak_matmul": peak,
        "rollout": {
            "prefix_reuse": {"images_per_s": images / cached,
                             **_accounted(rollout_flops(arch, shape).total, cached, peak)},
            "no_prefix_reuse": {"images_per_s": images / naive,
                                **_accounted(rollout_flops(arch, shape, reuse_prefix=False).total, naive, peak)},
        },
        "train": train,
        "ratios": {
            "prefix_reuse_speedup": naive / cached,
            "window2_vs_all_train_cost": train[f"window_all_{args.steps}"]["iteration_s"] / train["window_2"]["iteration_s"],
        },
    }
    result["prefix_scaling"] = prefix_scaling(adapter, args.prefix_lengths, group=args.group_size, steps=args.steps,
                                              repeats=args.repeats)
    sizes = args.image_sizes or _latent_sizes(adapter, smoke=args.smoke)
    result["latent_scaling"] = latent_scaling(args.card, device, dtype, sizes, prefix_tokens=args.prefix_lengths[-1],
                                              group=args.group_size, steps=args.steps, repeats=args.repeats)
    emit(result, args.out)
    if args.plot:
        plot(result, args.plot)
    return result


def _latent_sizes(adapter, *, smoke: bool) -> list[int]:
    """Half, once and twice the card's image side, each a multiple of what the ViT and latent grid need."""
    from math import lcm

    from cmrp.perf.flops import vae_downsample

    arch = adapter.arch
    step = lcm(arch.vit.patch_size, vae_downsample(arch) * arch.latent_patch_size)
    side = adapter.image_size
    sizes = sorted({max(step, side // 2 // step * step), side, 2 * side // step * step})
    return sizes[:2] if smoke else sizes


if __name__ == "__main__":
    main()
