"""Samplers shared by training, evaluation and chat: flow ODE/SDE steps and token sampling with
log-probs, the Rollout they produce, and decoding strategies (chain / joint)."""

from cmrp.sampling.flow import (
    FlowStep,
    FlowTrajectory,
    flow_step,
    gaussian_logprob,
    sample_flow,
    sampling_timesteps,
    sde_window,
)
from cmrp.sampling.rollout import Rollout, TokenTrajectory
from cmrp.sampling.tokens import TokenStep, guided_logits, sample_token_sequence, token_step

__all__ = [
    "FlowStep",
    "FlowTrajectory",
    "Rollout",
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
