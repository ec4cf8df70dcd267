"""Show-o: Phi-1.5 + MAGVIT-v2 image tokens, omni-attention, masked-token prediction and MaskGIT."""

from cmrp.backbones.showo.adapter import ShowoAdapter
from cmrp.backbones.showo.magvit import MagvitConfig, MAGVITv2
from cmrp.backbones.showo.model import Showo, ShowoArch, ShowoVocab, omni_attention_mask

__all__ = ["MAGVITv2", "MagvitConfig", "Showo", "ShowoAdapter", "ShowoArch", "ShowoVocab", "omni_attention_mask"]
