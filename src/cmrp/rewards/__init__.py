"""Reward terms for Character-GRPO, usable from other projects with only torch installed.

`from cmrp.rewards import build_reward, RewardContext` — each term imports its model library
(open_clip, lpips, transformers) only when it loads default weights; pass small feature nets
(`encoder=`, `distance=`, `features=`, `answerer=`) to run without them. `as_trl` and `as_flow_grpo`
wrap any reward in TRL's and Flow-GRPO's calling conventions; `Composite.check()` lists every
pretrained model a reward would need and cannot find, without loading anything.
"""

from __future__ import annotations

from cmrp.rewards.adapters import as_flow_grpo, as_trl, context_from_metadata, to_image_tensor
from cmrp.rewards.base import Reward, RewardContext, RewardOutput, VQAQuestion
from cmrp.rewards.brightness import Brightness
from cmrp.rewards.clip import ClipSimilarity
from cmrp.rewards.composite import Composite, build_reward, scalar_metrics
from cmrp.rewards.diversity import LpipsDiversity, pixel_distance
from cmrp.rewards.inputs import RewardInputError, check_inputs
from cmrp.rewards.pretrained import MissingModel
from cmrp.rewards.trainset import TrainsetPenalty, pixel_features
from cmrp.rewards.vqa import VqaConsistency

__all__ = [
    "Brightness",
    "ClipSimilarity",
    "Composite",
    "LpipsDiversity",
    "MissingModel",
    "Reward",
    "RewardContext",
    "RewardInputError",
    "RewardOutput",
    "TrainsetPenalty",
    "VQAQuestion",
    "VqaConsistency",
    "as_flow_grpo",
    "as_trl",
    "build_reward",
    "check_inputs",
    "context_from_metadata",
    "pixel_distance",
    "pixel_features",
    "scalar_metrics",
    "to_image_tensor",
]
