"""BAGEL golden tests, part 3: the flow head's velocity under the official attention mask, and the full
sampling loop with text + image guidance (interval, each renorm type) from the same seed."""

from __future__ import annotations

import pytest
import torch

from cmrp.data.tasks import Example
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec
from tests.parity._compare import assert_matches
from tests.parity.test_bagel_checkpoint import MODEL, official_adapter, reference, segment


@pytest.mark.parametrize("name", ["text", "image"])
def test_velocity_after_a_context(name):
    """One prediction after a text context, and after an input image (clean VAE latents + ViT tokens) and text."""
    tensors, meta = reference()
    case = meta["velocity"][name]
    adapter = official_adapter()
    context = Example("t2i", [segment(item) for item in case["inputs"]])
    x = tensors[f"velocity/{name}/x"][None]
    with torch.no_grad():
        prefix = adapter._encode_prefix([context], image_output=True,  # noqa: SLF001
                                        generator=torch.Generator().manual_seed(case["posterior_seed"]))
        v = adapter._velocity_fn(prefix)(x, torch.full((1,), case["t"]))  # noqa: SLF001
    label = "velocity after text" if name == "text" else "velocity after an input image (VAE + ViT) and text"
    assert_matches(MODEL, label, v[0], tensors[f"velocity/{name}/v"])


CHECKS = {
    "t2i_global": "sampling: text + image CFG, interval (0.4, 1], renorm global",
    "t2i_channel": "sampling: text + image CFG, renorm channel (min 0.2)",
    "t2i_text_channel": "sampling: text + image CFG, interval (0, 0.8], renorm text_channel",
    "text_scale_one": "sampling: text scale 1 turns guidance off (input image, image scale 2)",
    "dialogue": "sampling: text-free branch keeps the earlier text segments",
    "image_conditioned": "sampling: input image (VAE + ViT), text + image CFG",
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_sampling_loop_matches_the_official_latent(name):
    tensors, meta = reference()
    case = meta["sampling"][name]
    context = Example("t2i", [segment(item) for item in case["inputs"]])
    guidance = Guidance(text_scale=case["cfg_text_scale"], img_scale=case["cfg_img_scale"],
                        interval=tuple(case["cfg_interval"]), renorm_type=case["cfg_renorm_type"],
                        renorm_min=case["cfg_renorm_min"])
    spec = SamplerSpec(steps=case["num_timesteps"] - 1, timestep_shift=case["timestep_shift"], guidance=guidance)
    rollout = official_adapter().sample_images([context], spec, n=1, seed=case["seed"])
    assert_matches(MODEL, CHECKS[name], rollout.trajectory.final[0], tensors[f"sampling/{name}/latent"])
