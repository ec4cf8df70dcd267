"""MaskGIT for Show-o: the cosine mask schedule, how many tokens each step commits, and one step of
parallel decoding with the log-probs GRPO needs — with the official Show-o arithmetic, so the same seed
gives the same image as `Showo.t2i_generate`.

A step, given the current image tokens (some still masked) and the guided logits at every position:
1. draw a token at every position from the categorical (temperature applied first) —
   `cmrp.sampling.tokens.token_step`, so the categorical log-prob maths lives in one place. Positions
   already committed keep their token; drawing there too keeps the random stream the official one;
2. rank the masked positions by confidence, log p(drawn token) + tau·Gumbel noise (MaskGIT's "mask by
   random top-k"), and commit the `k` most confident. The choice temperature tau compounds over the
   steps as in the official loop: tau_k = tau_(k-1)·(1 − (k+1)/T), starting from the card's value;
3. the step's log-prob is the mean categorical log-prob of the tokens it committed, under the exact
   distribution they were drawn from (a per-token average, like the flow sampler's per-dimension
   one, so PPO ratios stay well scaled). Re-scoring the same committed tokens from the same state
   under unchanged weights gives the same number.

A rollout stores the final tokens and, per position, the step that committed it: the state before
step s is "tokens committed at steps < s, the rest masked".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cmrp.sampling.tokens import token_step

__all__ = ["MaskGITStep", "choice_temperatures", "commit_counts", "commit_logprob", "cosine_schedule",
           "maskgit_step", "showo_guidance"]


def cosine_schedule(r: torch.Tensor | float) -> torch.Tensor:
    """Fraction of image tokens still masked at progress r in [0, 1]: cos(r·π/2) (1 -> 0), in float32
    exactly as Show-o computes it (its training mask ratios and sampling counts floor/round this value)."""
    return torch.cos(torch.as_tensor(r, dtype=torch.float32) * math.pi * 0.5)


def commit_counts(num_tokens: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps (sums to `num_tokens`), Show-o's rule: after step k,
    max(1, min(still masked − 1, floor(N·cos(π/2·(k+1)/T)))) tokens stay masked (float32 arithmetic),
    and the last step commits all that remain. A step may commit nothing when T is close to N (one
    token left before the end), as in the official loop."""
    if steps < 1:
        raise ValueError("MaskGIT needs at least one step")
    if steps > num_tokens:
        raise ValueError(f"{steps} MaskGIT steps for {num_tokens} image tokens: use at most {num_tokens} steps")
    counts, masked = [], num_tokens
    for k in range(steps):
        if k == steps - 1:
            left = 0
        else:
            left = int((num_tokens * cosine_schedule(1.0 * (k + 1) / steps)).floor())
            left = max(1, min(masked - 1, left))
        counts.append(masked - left)
        masked = left
    return counts


def choice_temperatures(start: float, steps: int) -> list[float]:
    """The Gumbel temperature of each step: Show-o multiplies it by (1 − (k+1)/T) at every step k
    before use, so it compounds (and is 0 at the last step)."""
    out, tau = [], start
    for k in range(steps):
        tau = tau * (1.0 - 1.0 * (k + 1) / steps)
        out.append(tau)
    return out


def showo_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    """Show-o's classifier-free guidance, (1 + g)·cond − g·uncond with g = cfg_scale − 1 (its
    `guidance_scale`), written as the official code does so the float rounding is the same."""
    if uncond is None or cfg_scale == 1.0:
        return cond.float()
    g = cfg_scale - 1.0
    return (1 + g) * cond.float() - g * uncond.float()


@dataclass
class MaskGITStep:
    tokens: torch.Tensor  # [B, N] long: the drawn token at committed positions, the input elsewhere
    committed: torch.Tensor  # [B, N] bool: positions committed by this step
    logprob: torch.Tensor  # [B] fp32 mean log-prob of the committed tokens
    drawn: torch.Tensor  # [B, N] long: the token drawn at every position (Show-o's `sampled_ids`)


def _gumbel(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    u = torch.zeros(shape).uniform_(0, 1, generator=generator)
    return (-torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))).to(device)


def maskgit_step(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, count: int, *,
                 temperature: float = 1.0, choice_temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> MaskGITStep:
    """One MaskGIT step. `logits` [B, N, C] guided logits over the codes, `tokens` [B, N] current codes,
    `masked` [B, N] bool positions still to fill; commits `count` of them per sample (0 allowed)."""
    if bool((masked.sum(1) < count).any()):
        raise ValueError(f"cannot commit {count} tokens: fewer are still masked")
    drawn = token_step(logits, temperature=temperature, generator=generator)  # every position, as Show-o
    confidence = torch.log(drawn.prob.clamp(min=1e-20))
    confidence = confidence + choice_temperature * _gumbel(confidence.shape, generator, confidence.device)
    confidence = confidence.masked_fill(~masked, float("-inf"))
    top = confidence.topk(count, dim=1).indices
    committed = torch.zeros_like(masked).scatter(1, top, True)
    new_tokens = torch.where(committed, drawn.tokens, tokens)
    return MaskGITStep(new_tokens, committed, commit_logprob(drawn.logprob, committed), drawn.tokens)


def commit_logprob(token_logp: torch.Tensor, committed: torch.Tensor) -> torch.Tensor:
    """[B] mean of the per-position log-probs `token_logp` [B, N] over the `committed` [B, N] positions."""
    return (token_logp * committed).sum(1) / committed.sum(1).clamp(min=1)
