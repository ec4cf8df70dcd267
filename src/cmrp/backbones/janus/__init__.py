"""Janus / Janus-Pro: SigLIP understanding + Llama + VQ-VAE image tokens (transformers' `JanusForConditionalGeneration`)."""

from cmrp.backbones.janus.adapter import JanusAdapter
from cmrp.backbones.janus.prompting import JanusBatch
from cmrp.backbones.janus.tokenizer import JanusTokenizer

__all__ = ["JanusAdapter", "JanusBatch", "JanusTokenizer"]
