"""Classifier-free guidance of a flow velocity as BAGEL's official sampler does it: text and image guidance, a
guidance interval and renormalisation.

Three velocities are predicted for the same noisy latents:
- `v_c`: the full context;
- `v_t`: the text-free context — the context as it was before its last text segment (earlier text kept;
  the empty context for a one-segment prompt; the whole context when an image follows the last text);
- `v_i`: the image-free context — every text segment, no input image (for a context without input images
  it is the context itself, so `v_i = v_c` and image guidance amplifies the text guidance).

Guidance is on only when the text scale is > 1 (a text scale of 1 switches the image guidance off too);
text guidance first, then image guidance (scale > 1) on top of it:
    v_text = v_t + s_text · (v_c − v_t)
    v_cfg  = v_i + s_img · (v_text − v_i)
then the result is rescaled so its norm never exceeds the conditional one's:
- `global`: one factor per sample, norms over all of its tokens and channels;
- `channel`: one factor per token (norm over the latent channels);
- `text_channel`: only the text-guided velocity is rescaled (per token), before image guidance;
- `none`: no rescaling (plain CFG; not an official type).
The factor is clamp(‖v_c‖ / ‖v‖, renorm_min, 1) (renorm_min = 1 turns renorm off too).
Guidance applies only at times t with lo < t ≤ hi (`interval`, t = 1 is pure noise); elsewhere the
velocity is `v_c` and the unconditional branches need not be computed at all.

Pure tensor maths, shared by every flow-head adapter, so sampling and GRPO's log-prob recomputation
combine the branches identically. `tests/parity/test_bagel_sampling.py` checks it against the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings (`Guidance`) import without torch: chat and the sampler spec read them
    import torch

__all__ = ["RENORM_TYPES", "Guidance", "combine_guidance", "guidance_active"]

RENORM_TYPES = ("global", "channel", "text_channel", "none")
_EPS = 1e-8


@dataclass(frozen=True)
class Guidance:
    """Guidance settings of one sampling call (the recipe's `grpo.cfg_*` keys)."""

    text_scale: float = 1.0
    img_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    renorm_type: str = "global"
    renorm_min: float = 0.0

    def __post_init__(self):
        if self.renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type {self.renorm_type!r}: use one of {', '.join(RENORM_TYPES)}")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval {list(self.interval)}: must be [lo, hi] with 0 <= lo <= hi <= 1")
        if self.text_scale < 1.0 or self.img_scale < 1.0:
            raise ValueError(f"guidance scales must be >= 1 (1 = off); got text {self.text_scale}, "
                             f"image {self.img_scale}")

    @property
    def enabled(self) -> bool:
        """Guidance does anything: the text scale is > 1 (BAGEL guides nothing otherwise, images included)."""
        return self.text_scale > 1.0

    @property
    def image_enabled(self) -> bool:
        """Image guidance applies (on top of text guidance)."""
        return self.enabled and self.img_scale > 1.0

    def active(self, t: float) -> bool:
        """Whether guidance applies at time t (lo < t <= hi) and does anything."""
        return self.enabled and guidance_active(t, self.interval)

    @classmethod
    def from_config(cls, cfg) -> Guidance:
        """From a recipe section holding cfg_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min."""
        lo, hi = (float(v) for v in cfg.cfg_interval)
        return cls(float(cfg.cfg_scale), float(cfg.cfg_img_scale), (lo, hi), str(cfg.cfg_renorm_type),
                   float(cfg.cfg_renorm_min))


def guidance_active(t: float, interval: tuple[float, float]) -> bool:
    """BAGEL's interval test: guidance at times lo < t <= hi."""
    lo, hi = interval
    return lo < float(t) <= hi


def _norm(v: torch.Tensor, per_token: bool) -> torch.Tensor:
    import torch

    if per_token:
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.linalg.vector_norm(v.flatten(1), dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def _rescale(v: torch.Tensor, ref: torch.Tensor, per_token: bool, renorm_min: float) -> torch.Tensor:
    factor = (_norm(ref, per_token) / (_norm(v, per_token) + _EPS)).clamp(min=renorm_min, max=1.0)
    return v * factor


def combine_guidance(
    v_cond: torch.Tensor,
    v_text_free: torch.Tensor | None,
    v_image_free: torch.Tensor | None,
    text_scale: float = 1.0,
    img_scale: float = 1.0,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """The guided velocity of [B, tokens, channels] predictions (see the module docstring): `v_cond` itself
    unless text_scale > 1. A branch may be None only when it is not used (text scale <= 1, image scale <= 1);
    for a context without input images pass `v_cond` as `v_image_free`."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"unknown renorm type {renorm_type!r}; use one of {', '.join(RENORM_TYPES)}")
    v_cond = v_cond.float()
    if text_scale <= 1.0:
        return v_cond
    if v_text_free is None:
        raise ValueError("text guidance needs the text-free velocity")
    v_text = v_text_free.float() + text_scale * (v_cond - v_text_free.float())
    if renorm_type == "text_channel":
        v_text = _rescale(v_text, v_cond, per_token=True, renorm_min=renorm_min)
    if img_scale > 1.0:
        if v_image_free is None:
            raise ValueError("image guidance needs the image-free velocity (v_cond for a context without images)")
        v = v_image_free.float() + img_scale * (v_text - v_image_free.float())
    else:
        v = v_text
    if renorm_type in ("global", "channel"):
        v = _rescale(v, v_cond, per_token=renorm_type == "channel", renorm_min=renorm_min)
    return v
