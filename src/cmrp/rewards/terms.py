"""Imports every built-in reward term so its `@REWARDS.register` runs (the registry's built-in list)."""

from __future__ import annotations

from cmrp.rewards.brightness import Brightness
from cmrp.rewards.clip import ClipSimilarity
from cmrp.rewards.diversity import LpipsDiversity
from cmrp.rewards.trainset import TrainsetPenalty
from cmrp.rewards.vqa import VqaConsistency

__all__ = ["Brightness", "ClipSimilarity", "LpipsDiversity", "TrainsetPenalty", "VqaConsistency"]
