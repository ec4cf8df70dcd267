"""Samplers shared by training, evaluation and chat: flow ODE/SDE steps and token sampling with
log-probs, the SamplerSpec that configures them, the Rollout they produce, and decoding strategies (chain / joint).

Names are imported on first use, so `cmrp.sampling.decoding` (read by `cmrp ls` and `cmrp validate`)
imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FlowStep",
    "FlowTrajectory",
    "Guidance",
    "Rollout",
    "SamplerSpec",
    "TokenStep",
    "TokenTrajectory",
    "flow_step",
    "gaussian_logprob",
    "guided_logits",
    "sample_flow",
    "sample_token_sequence",
    "sampling_timesteps",
    "sde_window",
    "token_step",
]

_HOMES = {
    **dict.fromkeys(("FlowStep", "FlowTrajectory", "flow_step", "gaussian_logprob", "sample_flow",
                     "sampling_timesteps", "sde_window"), "cmrp.sampling.flow"),
    **dict.fromkeys(("Rollout", "TokenTrajectory"), "cmrp.sampling.rollout"),
    "Guidance": "cmrp.sampling.guidance",
    "SamplerSpec": "cmrp.sampling.spec",
    **dict.fromkeys(("TokenStep", "guided_logits", "sample_token_sequence", "token_step"), "cmrp.sampling.tokens"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cmrp.sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
