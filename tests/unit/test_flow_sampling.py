"""The maths of the flow sampler: SDE/CPS step densities, windows, noise 0 == ODE."""

from __future__ import annotations

import math

import pytest
import torch

from cmrp.sampling.flow import flow_step, gaussian_logprob, sample_flow, sampling_timesteps, sde_window


def test_gaussian_logprob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    mean, x = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0])
    expected = torch.distributions.Normal(mean, std[:, None, None]).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(gaussian_logprob(x, mean, std), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_step_logprob_is_the_density_of_the_drawn_sample(kind):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    step = flow_step(x, v, 0.6, 0.5, eta=0.8, kind=kind, generator=g)
    direct = torch.distributions.Normal(step.mean, step.std[:, None, None]).log_prob(step.next).flatten(1).mean(1)
    assert torch.allclose(step.logprob, direct, atol=1e-5)
    # recomputing with the stored sample gives the same value (ratio 1 on-policy)
    again = flow_step(x, v, 0.6, 0.5, eta=0.8, kind=kind, next_sample=step.next)
    assert torch.equal(again.logprob, step.logprob)


def test_sde_step_formula():
    x, v = torch.full((1, 2), 0.5), torch.full((1, 2), -1.0)
    t, tn, eta = 0.8, 0.6, 0.5
    step = flow_step(x, v, t, tn, eta=eta, kind="sde", next_sample=x)
    sigma = eta * math.sqrt(t / (1 - t))
    dt = tn - t
    mean = 0.5 * (1 + sigma**2 / (2 * t) * dt) + (-1.0) * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    assert torch.allclose(step.mean, torch.full((1, 2), mean))
    assert math.isclose(float(step.std), sigma * math.sqrt(-dt), rel_tol=1e-6)


def test_cps_keeps_the_noise_level():
    # CPS: mean = x0_hat (1 - t') + noise_hat sqrt(t'^2 - std^2); with x = (1-t) x0 + t n and v = n - x0 exact,
    # the step's mean plus its noise has total noise variance t'^2
    x0, n = torch.zeros(1, 1), torch.ones(1, 1)
    t, tn = 0.7, 0.4
    x, v = (1 - t) * x0 + t * n, n - x0
    step = flow_step(x, v, t, tn, eta=0.5, kind="cps", next_sample=x)
    std = float(step.std)
    coef = (float(step.mean) - (1 - tn) * 0.0) / 1.0
    assert math.isclose(coef**2 + std**2, tn**2, rel_tol=1e-6)


def test_noise_zero_reproduces_the_ode_exactly():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=g)

    def velocity(x, t):
        return torch.tanh(x @ w) * t[:, None]

    x = torch.randn(3, 8, generator=g)
    ts = sampling_timesteps(10, 3.0)
    ode = x
    for i in range(10):
        ode = ode + (ts[i + 1] - ts[i]) * velocity(ode, ts[i].expand(3))
    traj = sample_flow(velocity, x, ts, window=(2, 5), eta=0.0)
    assert torch.equal(traj.final, ode)
    noisy = sample_flow(velocity, x, ts, window=(2, 5), eta=0.7, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(noisy.final, ode)
    assert noisy.states.shape == (3, 3, 8) and noisy.logprobs.shape == (3, 3)
    assert torch.allclose(noisy.times[:, 0], ts[2:5])


def test_window_only_stores_window_transitions_and_ode_outside():
    ts = sampling_timesteps(6)
    traj = sample_flow(lambda x, t: -x, torch.ones(2, 3), ts, window=(1, 3), eta=0.5,
                       generator=torch.Generator().manual_seed(0))
    assert traj.states.shape[1] == 2
    # the first state stored is the ODE result of step 0 (deterministic)
    assert torch.allclose(traj.states[:, 0], torch.ones(2, 3) * (1 - (ts[1] - ts[0])))


def test_sde_window_placement():
    g = torch.Generator().manual_seed(0)
    starts = {sde_window(10, 2, 0.0, 0.5, generator=g)[0] for _ in range(200)}
    assert starts == {0, 1, 2, 3}
    assert sde_window(10, 20) == (0, 10)
    assert sde_window(10, 3, 0.9, 1.0, generator=g) == (7, 10)
