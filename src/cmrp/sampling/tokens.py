"""Sampling discrete image tokens with the log-probs GRPO needs (token heads: Janus, Show-o).

The log-prob of a sampled token must come from exactly the distribution it was drawn from:
classifier-free guidance, temperature and top-k are applied first, then the categorical is
sampled and scored. Recomputing with the stored tokens (`tokens=`) under unchanged weights gives
the same log-probs, so GRPO's ratio is 1 on-policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["TokenStep", "guided_logits", "sample_token_sequence", "token_step"]


@dataclass
class TokenStep:
    tokens: torch.Tensor  # [B, ...] long
    logprob: torch.Tensor  # [B, ...] fp32 log-prob of each token under the sampling distribution
    prob: torch.Tensor | None = None  # [B, ...] its probability as the sampler saw it (softmax, not exp(logprob))


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + s·(cond − uncond) (s = 1: the conditional logits)."""
    if uncond is None or cfg_scale == 1.0:
        return cond.float()
    return uncond.float() + cfg_scale * (cond.float() - uncond.float())


def _sampling_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Temperature, then top-k (transformers' warper order, after guidance)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for a sampling policy with log-probs (use argmax for greedy)")
    scaled = logits.float() / temperature
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled


def token_step(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    tokens: torch.Tensor | None = None,
) -> TokenStep:
    """Draw one token per position from `logits` [..., V] (already guided), or score given `tokens`.
    Draws `multinomial(softmax(logits))` over all positions at once (rows in order, on the CPU
    generator), the call the reference samplers make, so a seed gives their tokens."""
    scaled = _sampling_logits(logits, temperature, top_k)
    probs = torch.softmax(scaled, dim=-1)
    if tokens is None:
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1]).to(logits.device)
    index = tokens[..., None].long()
    logp = torch.log_softmax(scaled, dim=-1).gather(-1, index)[..., 0]
    return TokenStep(tokens, logp, probs.gather(-1, index)[..., 0])


def sample_token_sequence(
    next_logits: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    batch: int,
    length: int,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    tokens: torch.Tensor | None = None,
    device=None,
) -> TokenStep:
    """Autoregressive sampling of `length` tokens. `next_logits(prefix [B, i]) -> (cond, uncond | None)`,
    each [B, V] for position i. With `tokens` [B, length], scores that sequence instead (teacher forcing)."""
    out = torch.zeros(batch, length, dtype=torch.long, device=device)
    logps = torch.zeros(batch, length, dtype=torch.float32, device=device)
    for i in range(length):
        cond, uncond = next_logits(out[:, :i])
        given = tokens[:, i] if tokens is not None else None
        step = token_step(guided_logits(cond, uncond, cfg_scale), temperature=temperature, top_k=top_k,
                          generator=generator, tokens=given)
        out[:, i] = step.tokens
        logps[:, i] = step.logprob
    return TokenStep(out, logps)
