"""MaskGIT for Show-o: the cosine mask schedule, how many tokens each step commits, and one step of
parallel decoding with the log-probs GRPO needs.

A step, given the current image tokens (some still masked) and the guided logits at every position:
1. draw a token at every masked position from the categorical (temperature applied first) —
   `cmrp.sampling.tokens.token_step`, so the categorical log-prob maths lives in one place;
2. rank the masked positions by confidence, log p(drawn token) + tau·Gumbel noise (tau anneals to 0
   over the schedule: MaskGIT's "mask by random top-k"), and commit the `k` most confident;
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

__all__ = ["MaskGITStep", "commit_counts", "commit_logprob", "cosine_schedule", "maskgit_step"]


def cosine_schedule(r: torch.Tensor | float) -> torch.Tensor:
    """Fraction of image tokens still masked at progress r in [0, 1]: cos(r·π/2) (1 -> 0)."""
    return torch.cos(torch.as_tensor(r, dtype=torch.float64) * math.pi / 2)


def commit_counts(num_tokens: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps (sums to `num_tokens`). After step k,
    floor(N·cos(π/2·(k+1)/steps)) tokens stay masked, but every step commits at least one token and
    the last step commits all that remain (Show-o's / MaskGIT's rule)."""
    if steps < 1:
        raise ValueError("MaskGIT needs at least one step")
    if steps > num_tokens:
        raise ValueError(f"{steps} MaskGIT steps for {num_tokens} image tokens: each step must commit a token")
    counts, masked = [], num_tokens
    for k in range(steps):
        if k == steps - 1:
            left = 0
        else:
            left = int(math.floor(num_tokens * float(cosine_schedule((k + 1) / steps))))
            left = max(steps - 1 - k, min(masked - 1, left))  # >= 1 per later step, >= 1 committed now
        counts.append(masked - left)
        masked = left
    return counts


@dataclass
class MaskGITStep:
    tokens: torch.Tensor  # [B, N] long: the drawn token at committed positions, the input elsewhere
    committed: torch.Tensor  # [B, N] bool: positions committed by this step
    logprob: torch.Tensor  # [B] fp32 mean log-prob of the committed tokens


def _gumbel(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-20, 1.0)
    return (-torch.log((-torch.log(u)).clamp(min=1e-20))).to(device)


def maskgit_step(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, count: int, *,
                 temperature: float = 1.0, choice_temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> MaskGITStep:
    """One MaskGIT step. `logits` [B, N, C] guided logits over the codes, `tokens` [B, N] current codes,
    `masked` [B, N] bool positions still to fill; commits `count` of them per sample."""
    if bool((masked.sum(1) < count).any()):
        raise ValueError(f"cannot commit {count} tokens: fewer are still masked")
    drawn = token_step(logits[masked], temperature=temperature, generator=generator)  # masked positions only
    sampled = torch.zeros_like(tokens).masked_scatter(masked, drawn.tokens)
    logp = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device).masked_scatter(masked, drawn.logprob)
    confidence = logp.clone()
    if choice_temperature > 0:
        confidence = confidence + choice_temperature * _gumbel(confidence.shape, generator, confidence.device)
    confidence = confidence.masked_fill(~masked, float("-inf"))
    top = confidence.topk(count, dim=1).indices
    committed = torch.zeros_like(masked).scatter(1, top, True)
    new_tokens = torch.where(committed, sampled, tokens)
    return MaskGITStep(new_tokens, committed, commit_logprob(logp, committed))


def commit_logprob(token_logp: torch.Tensor, committed: torch.Tensor) -> torch.Tensor:
    """[B] mean of the per-position log-probs `token_logp` [B, N] over the `committed` [B, N] positions."""
    return (token_logp * committed).sum(1) / committed.sum(1).clamp(min=1)
