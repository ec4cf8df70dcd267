"""BAGEL golden tests, part 4: the training batch (the official packer's token ids, rope positions, labels,
token kinds) and the training losses (CE, flow MSE with the posterior-sampled latents) on four samples:
text-to-image with text after the generated image, understanding, role-play chat, image-conditioned generation."""

from __future__ import annotations

import dataclasses
import functools

import torch

from cmrp.backbones.bagel.model import BagelBatch
from cmrp.data.tasks import Example, Segment
from tests.parity._compare import assert_matches
from tests.parity.test_bagel_checkpoint import MODEL, official_adapter, picture, reference


def _example(plan: list[dict]) -> Example:
    """An official sequence plan as cmrp segments: a `vit_image` is an input image (also given as clean VAE
    latents when the example generates an image, as the official plan lists it), a `vae_image` with loss the
    image to generate."""
    segments = []
    for item in plan:
        if item["type"] == "text":
            segments.append(Segment("text", "user", item["text"], train=bool(item["loss"])))
        elif item["type"] == "vit_image":
            segments.append(Segment("image", "user", pixels=picture(item["image"])))
        elif item["loss"]:
            segments.append(Segment("image", "character", pixels=picture(item["image"]), generate=True, train=True))
    return Example("parity", segments)


@functools.cache
def _batch() -> BagelBatch:
    _, meta = reference()
    return official_adapter().collate([_example(plan) for plan in meta["training"]["samples"]])


def test_packed_sequence_matches_the_official_packer():
    tensors, _ = reference()
    b = _batch()  # indexing [B, L] by a mask concatenates the samples' tokens, as the official packing does
    text = b.valid & ~b.is_vit & ~b.is_gen
    assert_matches(MODEL, "training batch: text token ids", b.input_ids[text], tensors["training/packed_text_ids"])
    assert_matches(MODEL, "training batch: rope positions (none advanced after a generated image)",
                   b.position_ids[b.valid], tensors["training/packed_position_ids"])
    assert_matches(MODEL, "training batch: sample lengths", b.valid.sum(dim=1), tensors["training/sample_lens"])
    index = torch.cumsum(b.valid.flatten().long(), 0).view_as(b.valid) - 1  # packed index of each token
    labelled = b.valid & (b.labels != -100)
    assert_matches(MODEL, "training batch: CE targets", b.labels[labelled], tensors["training/packed_label_ids"])
    assert_matches(MODEL, "training batch: CE positions", index[labelled], tensors["training/ce_loss_indexes"])
    assert_matches(MODEL, "training batch: ViT token positions", index[b.is_vit],
                   tensors["training/packed_vit_token_indexes"])
    assert_matches(MODEL, "training batch: VAE token positions (input and generated)", index[b.is_gen],
                   tensors["training/packed_vae_token_indexes"])
    assert b.vae_noisy.tolist() == [True, False, True]  # generated, input image (clean), generated


def test_training_losses_match_the_official_forward():
    """CE and flow MSE of the official training forward, from the same latents (posterior sample), noise and
    flow times (the reference's standard-normal draws)."""
    tensors, meta = reference()
    adapter = official_adapter()
    batch = dataclasses.replace(_batch(), timestep_draws=tensors["training/timesteps"])
    torch.manual_seed(meta["training"]["seed"])
    with torch.no_grad():
        out = adapter.losses(batch, timestep_shift=meta["training"]["timestep_shift"])
    assert_matches(MODEL, "training loss: CE (mean over targets)", out["text"], tensors["training/ce"].mean())
    assert_matches(MODEL, "training loss: flow MSE (posterior-sampled latents)", out["image"],
                   tensors["training/mse"].mean())
