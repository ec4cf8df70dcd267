"""`SamplerSpec`, the one value every `sample_images` call takes: how GRPO, evaluation and chat build it from a
recipe, what it rejects, and what a token head accepts of its guidance."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cmrp.config.schema import GRPOConfig
from cmrp.errors import ConfigError
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec, recipe_sampling_settings, token_guidance_scale


def test_spec_checks_its_steps_and_window():
    assert SamplerSpec(steps=4, window=[1, 3]).window == (1, 3)  # a recipe's list becomes the tuple
    with pytest.raises(ValueError, match=r"window \(2, 5\).*steps \(4\)"):
        SamplerSpec(steps=4, window=(2, 5))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        SamplerSpec(steps=0)
    spec = SamplerSpec(steps=4)
    assert spec.with_(noise=0.7, window=(0, 2)) == SamplerSpec(steps=4, noise=0.7, window=(0, 2))
    with pytest.raises(AttributeError):
        spec.steps = 5  # frozen: one spec is shared by every call of a run


def test_settings_name_guidance_only_when_a_scale_is_set():
    assert SamplerSpec.from_settings({}, steps=3) == SamplerSpec(steps=3)  # guidance None: the backbone's default
    spec = SamplerSpec.from_settings({"cfg_scale": 2.0, "cfg_renorm_type": "channel", "timestep_shift": 2}, steps=3)
    assert spec.guidance == Guidance(2.0, renorm_type="channel") and spec.timestep_shift == 2.0
    with pytest.raises(ConfigError, match="card.yaml sampling: unknown key\\(s\\) cfg_scael; use cfg_scale"):
        SamplerSpec.from_settings({"cfg_scael": 2.0}, steps=3, where="card.yaml sampling")


def test_grpo_spec_follows_the_recipe(tmp_path):
    """Guidance off in the recipe is no guidance in the spec (so Janus keeps its card's scale, as before)."""
    from cmrp.training.grpo import CharacterGRPOModule

    cfg = OmegaConf.structured(GRPOConfig)
    cfg.sample_steps, cfg.noise_level, cfg.sde, cfg.same_noise = 6, 0.5, "cps", True
    module = CharacterGRPOModule.__new__(CharacterGRPOModule)  # sampler_spec reads only the recipe
    module.__dict__["cfg"] = cfg
    assert module.sampler_spec() == SamplerSpec(steps=6, noise=0.5, sde="cps", same_noise=True)
    cfg.cfg_scale, cfg.cfg_img_scale, cfg.timestep_shift = 3.0, 1.5, 2.0
    spec = module.sampler_spec()
    assert spec.guidance == Guidance(3.0, 1.5) and spec.timestep_shift == 2.0 and spec.window is None
    assert spec == SamplerSpec.from_settings(recipe_sampling_settings(cfg), steps=6).with_(
        noise=0.5, sde="cps", same_noise=True)


def test_token_heads_take_the_text_scale_and_reject_flow_only_guidance():
    assert token_guidance_scale(SamplerSpec(steps=2), 5.0, "Janus") == 5.0
    assert token_guidance_scale(SamplerSpec(steps=2, guidance=Guidance(1.0)), 5.0, "Janus") == 1.0
    assert token_guidance_scale(SamplerSpec(steps=2, guidance=Guidance(2.5)), 5.0, "Janus") == 2.5
    with pytest.raises(ValueError, match="Show-o .* text guidance only.*cfg_img_scale, cfg_interval"):
        token_guidance_scale(SamplerSpec(steps=2, guidance=Guidance(2.0, 1.5, (0.2, 1.0))), 1.0, "Show-o")
