"""How a backbone samples images, as one value: the `SamplerSpec` every `sample_images` call takes.

The spec says *how* to sample (steps, which steps are stochastic and how noisy, the time shift, guidance);
the call says *what* (contexts, `n` samples each, the seed). GRPO builds it from the recipe's `grpo:` section
with its SDE window; evaluation, the fit's sample grid, chat and the saved character card build ODE specs
from the recipe's *sampling settings* — the `grpo.cfg_*` / `grpo.timestep_shift` keys that differ from the
defaults, a plain dict that a character card stores as its `sampling:` section.

Flow heads (BAGEL) use every field. Token heads (Janus, Show-o) draw every token stochastically and use
`steps`, `window` and the text guidance scale; `noise`, `sde` and `timestep_shift` do not apply to them
(`token_guidance_scale` rejects the flow-only guidance settings with one clear message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cmrp.errors import ConfigError
from cmrp.sampling.guidance import Guidance

__all__ = ["SAMPLING_SETTINGS", "SamplerSpec", "recipe_sampling_settings", "token_guidance_scale"]

# the recipe `grpo:` keys that decide how an image is drawn outside GRPO's SDE window
SAMPLING_SETTINGS = ("cfg_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
                     "timestep_shift")
_DEFAULT_GUIDANCE = Guidance()


@dataclass(frozen=True)
class SamplerSpec:
    """One image-sampling configuration (see the module docstring).

    `window` ([start, end) step indices): the stochastic steps whose transitions the rollout stores for
    `rollout_logprob` (None: none stored; a flow head then integrates the ODE). `noise`: the SDE noise level
    (eta) inside the window. `sde`: "sde" (Flow-GRPO) or "cps" (coefficients-preserving). `same_noise`: the
    n samples of a context start from the same initial noise. `timestep_shift`: None = the card's.
    `guidance`: None = the backbone's default (no guidance for BAGEL and Show-o, the card's `sampling.cfg_scale`
    for Janus)."""

    steps: int
    noise: float = 0.0
    window: tuple[int, int] | None = None
    sde: str = "sde"
    same_noise: bool = False
    timestep_shift: float | None = None
    guidance: Guidance | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerSpec.steps must be a positive int, got {self.steps!r}")
        if self.window is not None:
            start, end = self.window
            if not 0 <= start <= end <= self.steps:
                raise ValueError(f"SamplerSpec.window {tuple(self.window)}: must be [start, end) with "
                                 f"0 <= start <= end <= steps ({self.steps})")
            object.__setattr__(self, "window", (int(start), int(end)))

    def with_(self, **changes: Any) -> SamplerSpec:
        """A copy with some fields changed (a spec is frozen)."""
        return replace(self, **changes)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], *, steps: int, where: str = "sampling settings") -> SamplerSpec:
        """An ODE spec from sampling settings (`recipe_sampling_settings`, a character card's `sampling:`):
        guidance when they name `cfg_scale`, else the backbone's default. An unknown key (e.g. in a character
        card's `sampling:`) raises one ConfigError naming it and `where`."""
        unknown = sorted(set(settings) - set(SAMPLING_SETTINGS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; use {', '.join(SAMPLING_SETTINGS)}")
        guidance = None
        if "cfg_scale" in settings:
            d = _DEFAULT_GUIDANCE
            guidance = Guidance(float(settings["cfg_scale"]), float(settings.get("cfg_img_scale", d.img_scale)),
                                _pair(settings.get("cfg_interval", d.interval)),
                                str(settings.get("cfg_renorm_type", d.renorm_type)),
                                float(settings.get("cfg_renorm_min", d.renorm_min)))
        shift = settings.get("timestep_shift")
        return cls(steps=steps, timestep_shift=None if shift is None else float(shift), guidance=guidance)


def recipe_sampling_settings(grpo_section: Any) -> dict[str, Any]:
    """The sampling settings of a recipe's `grpo:` section — its guidance (only what differs from the
    defaults, nothing when guidance is off) and timestep shift — so evaluation, the fit's sample grid and chat
    sample images the way the policy was trained to. Plain data: a character card stores it."""
    guidance = Guidance.from_config(grpo_section)
    out: dict[str, Any] = {}
    if guidance.enabled:
        out["cfg_scale"] = guidance.text_scale
        for key, value, base in (("cfg_img_scale", guidance.img_scale, _DEFAULT_GUIDANCE.img_scale),
                                 ("cfg_interval", tuple(guidance.interval), _DEFAULT_GUIDANCE.interval),
                                 ("cfg_renorm_type", guidance.renorm_type, _DEFAULT_GUIDANCE.renorm_type),
                                 ("cfg_renorm_min", guidance.renorm_min, _DEFAULT_GUIDANCE.renorm_min)):
            if value != base:
                out[key] = value
    if grpo_section.get("timestep_shift") is not None:
        out["timestep_shift"] = float(grpo_section.timestep_shift)
    return out


def token_guidance_scale(spec: SamplerSpec, default: float, backbone: str) -> float:
    """The logit-guidance scale of a token head: the spec's text scale, else `default`. Image guidance,
    the guidance interval and renormalisation are flow-head (BAGEL) settings: asking a token head for them
    raises ValueError rather than silently sampling something else."""
    g = spec.guidance
    if g is None:
        return float(default)
    flow_only = [name for name, value, base in (
        ("cfg_img_scale", g.img_scale, _DEFAULT_GUIDANCE.img_scale),
        ("cfg_interval", tuple(g.interval), _DEFAULT_GUIDANCE.interval),
        ("cfg_renorm_min", g.renorm_min, _DEFAULT_GUIDANCE.renorm_min)) if value != base]
    if flow_only:
        raise ValueError(f"{backbone} samples image tokens and supports text guidance only (cfg_scale); "
                         f"{', '.join(flow_only)} apply to flow heads (BAGEL): leave them at their defaults")
    return float(g.text_scale)


def _pair(value: Any) -> tuple[float, float]:
    lo, hi = value
    return float(lo), float(hi)
