"""GRPO throughput on a BAGEL card: rollout images/s and trained transitions/s, with the efficiency
techniques on and off, measured in one run so the ratios compare like with like.

    python benchmarks/grpo_rollout.py [--card bagel-tiny] [--group-size 8] [--steps 10] [--repeats 3] [--out FILE]

Prints one JSON object (and writes it to --out): absolute numbers per variant and the ratios
- prefix_reuse_speedup: rollout time without / with the prefix encoded once per group;
- window2_vs_all_train_cost: GRPO update time per iteration, SDE window of every step / of 2 steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = (
    "You are Lupumo. Stay in character. user: Lupumo, what did you do at the beach today? Tell me everything "
    "and then show me a picture of you there with your favourite hat."
)


def build_adapter(card_name: str, device: str, dtype: torch.dtype):
    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.config import load_backbone_card

    torch.manual_seed(0)
    card = load_backbone_card(card_name)
    adapter = BagelAdapter.build(card, corpus=[PROMPT] * 20, dtype=dtype).to(device)
    torch.nn.init.normal_(adapter.bagel.llm2vae.weight, std=0.02)
    adapter.model.eval()
    adapter.max_text_tokens = 4096  # no truncation: prompt-length scaling must see the whole prompt
    return adapter


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _contexts(prompts: int):
    from cmrp.data.tasks import Example, Segment

    return [Example("t2i", [Segment("text", "user", f"{PROMPT} ({i})")]) for i in range(prompts)]


def rollout_rate(adapter, *, prompts: int, group: int, steps: int, reuse: bool, repeats: int,
                 cfg_scale: float = 1.0) -> float:
    ctx = _contexts(prompts)

    def run():
        with torch.no_grad():
            adapter.sample_images(ctx, n=group, steps=steps, seed=0, noise=0.7, window=(0, 2), reuse_prefix=reuse,
                                  cfg_scale=cfg_scale)

    return prompts * group / _timed(run, repeats)


def train_cost(adapter, *, prompts: int, group: int, steps: int, window: int, repeats: int) -> dict[str, float]:
    """Seconds of the GRPO update (log-prob recomputation + backward over the window) per iteration."""
    from cmrp.training.advantages import ppo_clipped_loss

    rollout = adapter.sample_images(_contexts(prompts), n=group, steps=steps, seed=0, noise=0.7, window=(0, window))
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

    seconds = _timed(run, repeats)
    return {"iteration_s": seconds, "transitions_per_s": len(rollout) * rollout.num_steps / seconds}


def emit(result: dict, out: Path | None) -> None:
    """Print a benchmark's JSON, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="bagel-tiny")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = build_adapter(args.card, device, getattr(torch, args.dtype))
    shape = {"prompts": args.prompts, "group": args.group_size, "steps": args.steps}
    cached = rollout_rate(adapter, reuse=True, repeats=args.repeats, **shape)
    naive = rollout_rate(adapter, reuse=False, repeats=args.repeats, **shape)
    window2 = train_cost(adapter, window=2, repeats=args.repeats, **shape)
    window_all = train_cost(adapter, window=args.steps, repeats=args.repeats, **shape)
    result = {
        "benchmark": "grpo_rollout",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "card": args.card,
        "dtype": args.dtype,
        **shape,
        "rollout_images_per_s": {"prefix_reuse": cached, "no_prefix_reuse": naive},
        "train": {"window_2": window2, f"window_all_{args.steps}": window_all},
        "ratios": {
            "prefix_reuse_speedup": cached / naive,
            "window2_vs_all_train_cost": window_all["iteration_s"] / window2["iteration_s"],
        },
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
