"""The pretrained sandbox base shipped in the package (`backbones/bagel-sandbox.yaml`, weights: sandbox://base):
small, documented, and — measured again here on a character it never saw — able to draw what a description
says, but not to know that character's facts or what its name looks like."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmrp.config import load_backbone_card
from cmrp.resources import shipped_base
from cmrp.sandbox.pretrain import BASE_MANIFEST, heldout_numbers

BASE = Path(__file__).resolve().parents[2] / "src" / "cmrp" / "sandbox" / "assets" / "base"


def test_shipped_base_is_small_and_has_its_manifest():
    assert shipped_base("base") == BASE
    files = {p.name: p.stat().st_size for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", BASE_MANIFEST} <= set(files)
    assert sum(files.values()) < 12 * 2**20
    manifest = json.loads((BASE / BASE_MANIFEST).read_text())
    assert manifest["recipe"]["name"] == "sandbox-pretrain" and isinstance(manifest["seed"], int)
    assert manifest["git_commit"] and manifest["timings_s"]["total_s"] > 0
    assert manifest["training"]["loss_last"] < 0.5 * manifest["training"]["loss_first"]
    # the characters the quickstart and the tests customize were never part of pretraining
    first, last = manifest["world"]["train_seeds"]
    assert not any(first <= seed <= last for seed in (7, 10, 11))


@pytest.fixture(scope="module")
def base_adapter():
    from cmrp.backbones.bagel import BagelAdapter

    return BagelAdapter.build(load_backbone_card("bagel-sandbox"))


def test_base_draws_descriptions_but_not_unseen_characters(base_adapter, tmp_path):
    from omegaconf import OmegaConf

    from cmrp.sandbox import make_character

    manifest = json.loads((BASE / BASE_MANIFEST).read_text())
    seed = manifest["world"]["heldout_seeds"][0]
    character = make_character(seed, out_dir=tmp_path / "c")
    settings = OmegaConf.create({"images_per_prompt": 2, "sample_steps": 12, "max_items": 48})
    numbers = heldout_numbers(base_adapter, [character], settings, seed=0)
    # learned in pretraining: drawing what a description says (scene, pose, expression; chance ~0.2)
    assert numbers["prompt_faithfulness_described"] >= 0.35, numbers
    # what only customization can teach: the character's facts, and what its name looks like (chance ~0.2)
    assert numbers["knowledge_mcq_acc"] <= 0.5, numbers
    assert numbers["identity_fidelity_name_prompt"] <= 0.4, numbers


def test_pretraining_lowered_the_loss_measured_again(base_adapter, tmp_path):
    """The manifest's `loss_last < 0.5 * loss_first`, measured here rather than read: on dialogue of world
    characters it was pretrained on, the base's text loss is under half a uniform guess over its vocabulary
    (ln V, about where a random init starts: the manifest's first loss is above it)."""
    import math

    import torch

    from cmrp.data.tasks import build_examples
    from cmrp.sandbox import make_character

    manifest = json.loads((BASE / BASE_MANIFEST).read_text())
    first, _ = manifest["world"]["train_seeds"]
    uniform = math.log(base_adapter.bagel.language_model.lm_head.out_features)
    assert manifest["training"]["loss_first"] > uniform
    base_adapter.model.eval()
    for seed in (first, first + 1):
        chat = build_examples(make_character(seed, out_dir=tmp_path / str(seed)), decoding="chain")["chat"][:8]
        with torch.no_grad():
            ce = float(base_adapter.losses(base_adapter.collate(chat))["text"])
        assert ce < 0.5 * uniform, (seed, ce, uniform)


def test_sandbox_weights_that_do_not_exist_fail_clearly():
    from cmrp.errors import WeightsError

    with pytest.raises(WeightsError, match="cmrp sandbox pretrain"):
        shipped_base("nope")
    with pytest.raises(WeightsError, match="not a base shipped"):
        shipped_base("../assets")
