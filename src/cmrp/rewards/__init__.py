"""Reward terms for Character-GRPO, usable from other projects with only torch installed.

`from cmrp.rewards import build_reward, RewardContext` — each term imports its model library
(open_clip, lpips, transformers) only when it loads default weights; pass small feature nets
(`encoder=`, `distance=`, `features=`, `answerer=`) to run without them.
"""

from __future__ import annotations

from cmrp.rewards.base import Reward, RewardContext, RewardOutput, VQAQuestion
from cmrp.rewards.brightness import Brightness
from cmrp.rewards.clip import ClipSimilarity
from cmrp.rewards.composite import Composite, build_reward, scalar_metrics
from cmrp.rewards.diversity import LpipsDiversity, pixel_distance
from cmrp.rewards.flow_grpo import as_flow_grpo
from cmrp.rewards.trainset import TrainsetPenalty, pixel_features
from cmrp.rewards.vqa import VqaConsistency

__all__ = [
    "Brightness",
    "ClipSimilarity",
    "Composite",
    "LpipsDiversity",
    "Reward",
    "RewardContext",
    "RewardOutput",
    "TrainsetPenalty",
    "VQAQuestion",
    "VqaConsistency",
    "as_flow_grpo",
    "build_reward",
    "pixel_distance",
    "pixel_features",
    "scalar_metrics",
]
