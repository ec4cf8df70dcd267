"""Token-head sampling: log-probs come from the distribution actually sampled (CFG, temperature, top-k)."""

from __future__ import annotations

import math

import pytest
import torch

from cmrp.sampling.tokens import guided_logits, sample_token_sequence, token_step


def test_logprob_is_that_of_the_guided_tempered_distribution():
    cond = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    uncond = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    guided = guided_logits(cond, uncond, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond))
    step = token_step(guided, temperature=0.5, tokens=torch.tensor([2]))
    expected = torch.log_softmax(guided / 0.5, dim=-1)[0, 2]
    assert math.isclose(float(step.logprob[0]), float(expected), rel_tol=1e-6)


def test_sampling_frequencies_match_the_scored_probabilities():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    step = token_step(logits, temperature=0.7, generator=g)
    freq = torch.bincount(step.tokens, minlength=3).float() / 20000
    probs = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 0.7, dim=0)
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.allclose(step.logprob, probs.log()[step.tokens], atol=1e-6)


def test_top_k_never_samples_outside_and_scores_inside():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(2000, 4)
    step = token_step(logits, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(step.tokens.tolist()) <= {0, 1}
    assert torch.isfinite(step.logprob).all()


def test_sequence_rescoring_reproduces_logprobs():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(7, 7, generator=g)

    def next_logits(prefix):
        last = prefix[:, -1] if prefix.shape[1] else torch.zeros(prefix.shape[0], dtype=torch.long)
        return table[last], table[(last + 1) % 7]

    sampled = sample_token_sequence(next_logits, 4, 6, cfg_scale=2.0, temperature=0.9, generator=g)
    rescored = sample_token_sequence(next_logits, 4, 6, cfg_scale=2.0, temperature=0.9, tokens=sampled.tokens)
    assert torch.equal(rescored.tokens, sampled.tokens)
    assert torch.allclose(rescored.logprob, sampled.logprob)


def test_zero_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        token_step(torch.zeros(1, 3), temperature=0.0)
