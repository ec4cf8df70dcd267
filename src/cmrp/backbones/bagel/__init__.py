"""BAGEL: Qwen2 Mixture-of-Transformers + SigLIP understanding + rectified-flow generation."""

from cmrp.backbones.bagel.adapter import BagelAdapter
from cmrp.backbones.bagel.model import Bagel, BagelArch

__all__ = ["Bagel", "BagelAdapter", "BagelArch"]
