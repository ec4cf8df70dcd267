"""Euler steps of a rectified-flow sampler, deterministic (ODE) or stochastic (SDE) with log-probs.

Convention (BAGEL's): x_t = (1 - t)·x0 + t·noise, t runs from 1 (noise) to 0 (image) and the model
predicts the velocity v = noise - x0, so an ODE step is x_{t'} = x_t + (t' - t)·v.

GRPO needs a policy with a density, so inside a window of steps the sampler takes SDE steps
x_{t'} ~ N(mean, std²) and records the Gaussian log-prob of the sample it took:
- `sde`: the Flow-GRPO SDE, whose marginals match the ODE's; std = eta·sqrt(t / (1 - t))·sqrt(t - t').
- `cps`: coefficients-preserving sampling; std = eta'·t' with eta' = sin(eta·π/2), and the mean mixes
  the predicted clean image and noise so the noise level of x_{t'} stays exactly t'.
With eta = 0 both reduce to the ODE step, computed by the same expression, so a noise-free
rollout reproduces the ODE sample exactly. Log-probs are computed in fp32 and averaged over the
non-batch dimensions (a per-dimension log density, as Flow-GRPO does, so ratios stay well scaled).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "SDE_KINDS",
    "FlowStep",
    "FlowTrajectory",
    "flow_step",
    "gaussian_logprob",
    "sample_flow",
    "sampling_timesteps",
    "sde_window",
    "window_starts",
]

SDE_KINDS = ("sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class FlowStep:
    """One Euler step: the state it moved to, the mean and std of that move, and its log-prob."""

    next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # [B]: the step's Gaussian std (0 for an ODE step)
    logprob: torch.Tensor | None  # [B], None for an ODE step


def sampling_timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """`steps + 1` times from 1 (noise) to 0 (image), shifted toward noise like training timesteps."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std²) per element, averaged over every dimension but the first (fp32)."""
    sample, mean = sample.float(), mean.float()
    std = std.float().reshape(-1, *([1] * (sample.dim() - 1)))
    logp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return logp.flatten(1).mean(dim=1)


def _sde_mean_std(x, v, t, t_next, eta: float, kind: str, t_cap: float):
    dt = t_next - t
    if kind == "sde":
        tc = min(t, t_cap)  # sqrt(t / (1 - t)) diverges at t = 1
        sigma = eta * math.sqrt(tc / (1 - tc))
        mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
        std = sigma * math.sqrt(-dt)
    elif kind == "cps":
        std = t_next * math.sin(eta * math.pi / 2)
        x0_hat = x - t * v
        noise_hat = x + (1 - t) * v
        mean = x0_hat * (1 - t_next) + noise_hat * math.sqrt(max(t_next**2 - std**2, 0.0))
    else:
        raise ValueError(f"unknown SDE kind {kind!r}; use one of {SDE_KINDS}")
    return mean, std


def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: float,
    t_next: float,
    *,
    eta: float = 0.0,
    kind: str = "sde",
    generator: torch.Generator | None = None,
    next_sample: torch.Tensor | None = None,
    t_cap: float = 0.99,
) -> FlowStep:
    """One step from time `t` to `t_next` < t given the predicted velocity `v`.

    With `next_sample`, no noise is drawn: the log-prob of that given sample is returned (used to
    recompute a stored transition's log-prob under new weights).
    """
    t, t_next = float(t), float(t_next)
    batch = x.shape[0]
    if eta == 0:
        mean = x + (t_next - t) * v
        zero = torch.zeros(batch, device=x.device)
        return FlowStep(mean if next_sample is None else next_sample, mean, zero, None)
    xf, vf = x.float(), v.float()
    mean, std = _sde_mean_std(xf, vf, t, t_next, eta, kind, t_cap)
    std_t = torch.full((batch,), std, device=x.device)
    if next_sample is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        next_sample = (mean + std * noise.to(mean.device)).to(x.dtype)
    return FlowStep(next_sample, mean, std_t, gaussian_logprob(next_sample, mean, std_t))


def window_starts(steps: int, size: int, lo: float = 0.0, hi: float = 1.0) -> tuple[int, int]:
    """The first and last step index an SDE window of `size` steps may start at (see `sde_window`)."""
    if size >= steps:
        return 0, 0
    first = min(int(math.floor(lo * steps)), steps - size)
    return first, max(first, min(int(math.ceil(hi * steps)) - size, steps - size))


def sde_window(steps: int, size: int, lo: float = 0.0, hi: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[int, int]:
    """[start, end) step indices of an SDE window of `size` steps whose start is drawn uniformly from
    the fraction [lo, hi] of the schedule (e.g. the first half: lo 0, hi 0.5). size >= steps: all steps."""
    if size >= steps:
        return 0, steps
    first, last = window_starts(steps, size, lo, hi)
    start = first + int(torch.randint(0, last - first + 1, (1,), generator=generator))
    return start, start + size


@dataclass
class FlowTrajectory:
    """The end of a sampled trajectory plus, for the window's steps, what GRPO needs to recompute
    each transition's log-prob: the state before and after, and the times."""

    final: torch.Tensor  # [B, ...] x at t = 0
    states: torch.Tensor  # [B, K, ...] x_t before each window step
    next_states: torch.Tensor  # [B, K, ...] x_{t'} after it
    times: torch.Tensor  # [K, 2] (t, t') per window step
    logprobs: torch.Tensor  # [B, K] fp32 log-prob of each window transition when sampled


def sample_flow(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    window: tuple[int, int] | None = None,
    eta: float = 0.0,
    kind: str = "sde",
    generator: torch.Generator | None = None,
) -> FlowTrajectory:
    """Integrate from timesteps[0] to timesteps[-1]: ODE steps outside `window`, SDE steps inside it.

    `velocity(x, t)` takes a batch and per-sample times [B]. Only window transitions are stored.
    """
    steps = len(timesteps) - 1
    start, end = window if window is not None else (0, 0)
    if not 0 <= start <= end <= steps:
        raise ValueError(f"window {window} outside 0..{steps}")
    t_cap = float(timesteps[1]) if steps > 1 and float(timesteps[0]) >= 1.0 else 0.99
    states, next_states, logps, times = [], [], [], []
    b = x.shape[0]
    for i in range(steps):
        t, t_next = float(timesteps[i]), float(timesteps[i + 1])
        v = velocity(x, timesteps[i].expand(b))
        in_window = start <= i < end
        step = flow_step(x, v, t, t_next, eta=eta if in_window else 0.0, kind=kind, generator=generator,
                         t_cap=t_cap)
        if in_window:
            states.append(x)
            next_states.append(step.next)
            times.append((t, t_next))
            logps.append(step.logprob if step.logprob is not None else torch.zeros(b, device=x.device))
        x = step.next
    empty = x.new_zeros((b, 0, *x.shape[1:]))
    return FlowTrajectory(
        final=x,
        states=torch.stack(states, 1) if states else empty,
        next_states=torch.stack(next_states, 1) if next_states else empty,
        times=torch.tensor(times, dtype=torch.float32).reshape(-1, 2),
        logprobs=torch.stack(logps, 1) if logps else x.new_zeros((b, 0)),
    )
