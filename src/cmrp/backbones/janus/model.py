"""Janus's module layout as transformers' `JanusForConditionalGeneration` names it: LoRA targets, the
parameter groups a recipe can train, and the geometry a config must satisfy."""

from __future__ import annotations

from typing import Any

from cmrp.errors import ConfigError

__all__ = ["DEFAULT_LORA_TARGETS"]

_LM_LINEAR = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_GEN_LINEAR = r"model\.(generation_head\.(proj_out|vision_head)|generation_aligner\.(fc1|hidden_layers\.\d+))"
_UND_LINEAR = r"model\.aligner\.(fc1|hidden_layers\.\d+)"
DEFAULT_LORA_TARGETS = {
    "default": [_LM_LINEAR, _GEN_LINEAR],
    "generation": [_GEN_LINEAR],
    "understanding": [_LM_LINEAR, _UND_LINEAR],
}
_GEN_PARAMS = r"model\.(generation_embeddings|generation_aligner|generation_head)\..*"
_UND_PARAMS = r"(model\.(vision_model|aligner|language_model)\.|lm_head\.).*"


def _check_geometry(config: Any, where: str) -> None:
    """The VQ grid must have as many tokens as the generation head is asked to predict (image_size /
    patch_size per side) and the embeddings must meet the language model's width."""
    vision, vq, text = config.vision_config, config.vq_config, config.text_config
    side = int(vision.image_size) // int(vision.patch_size)
    down = 2 ** (len(vq.channel_multiplier) - 1)
    if int(vision.image_size) // down != side:
        raise ConfigError(f"{where}: the VQ-VAE downsamples {vision.image_size} px by {down} "
                          f"(len(vq_config.channel_multiplier) - 1 halvings), but the image-token grid is "
                          f"{side}x{side} (vision_config.image_size / patch_size); make them agree")
    for key, value in (("vision_config.projection_dim", vision.projection_dim),
                       ("vq_config.projection_dim", vq.projection_dim),
                       ("vq_config.image_token_embed_dim", vq.image_token_embed_dim)):
        if int(value) != int(text.hidden_size):
            raise ConfigError(f"{where}: {key}={value} must equal text_config.hidden_size={text.hidden_size}")

