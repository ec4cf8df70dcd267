"""The sandbox's trained models: the attribute probe (evaluation oracle), its image features, the CLIP-style
dual encoder, and their use by the rewards and evaluation. Loads the shipped assets; never retrains except
a few-step smoke of each training function."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from cmrp.errors import ConfigError
from cmrp.sandbox import ATTRIBUTE_VALUES, IDENTITY_ATTRIBUTES, build_character, describe
from cmrp.sandbox.clip import evaluate_clip, load_sandbox_clip, train_clip
from cmrp.sandbox.nets import ASSETS, random_attrs, render_batch
from cmrp.sandbox.probe import (
    attribute_matches,
    chance_identity_fidelity,
    chance_prompt_faithfulness,
    evaluate_probe,
    identity_fidelity,
    image_features,
    load_probe,
    prompt_faithfulness,
    read_attributes,
    train_probe,
)
from cmrp.sandbox.templates import read_description


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _character_images(seed: int, n: int = 10) -> tuple[dict[str, str], torch.Tensor]:
    character = build_character(seed, Path("/nonexistent"), n_reference_images=n, n_scenes=1)
    attrs = [image.attributes for image in character.train.images.values()]
    return character.profile.fields["identity"], render_batch(attrs)


# ------------------------------------------------------------------------------------------------ assets
def test_shipped_assets_are_small_and_described():
    import json

    for name in ("probe", "clip"):
        weights, manifest = ASSETS / f"{name}.safetensors", json.loads((ASSETS / f"{name}.json").read_text())
        assert weights.stat().st_size < 500_000
        assert manifest["seed"] == 0 and manifest["training"]["steps"] > 0 and manifest["git_commit"]
        assert manifest["vocab"]
    probe = json.loads((ASSETS / "probe.json").read_text())
    assert set(probe["vocab"]) == set(ATTRIBUTE_VALUES) and probe["vocab"] == ATTRIBUTE_VALUES
    assert min(probe["heldout"]["accuracy_clean"].values()) >= 0.95


# ------------------------------------------------------------------------------------------------ probe
def test_probe_reads_fresh_renders_per_attribute():
    accuracy = evaluate_probe(load_probe(), n=400, seed=2024)
    assert set(accuracy) == set(ATTRIBUTE_VALUES)
    assert min(accuracy.values()) >= 0.9, accuracy


def test_probe_reading_has_no_accessory_colour_without_an_accessory():
    attrs = [{**random_attrs(random.Random(i)), "accessory": "none"} for i in range(16)]
    readings = read_attributes(render_batch(attrs))
    assert sum(r["accessory"] == "none" for r in readings) >= 14
    assert all(r["accessory_color"] is None for r in readings if r["accessory"] == "none")


def test_identity_fidelity_own_references_high_other_character_near_chance():
    own, other, chances = [], [], []
    for seed in range(6):
        identity, images = _character_images(seed)
        own.append(identity_fidelity(images, identity))
        other_identity, _ = _character_images(seed + 100)
        other.append(identity_fidelity(images, other_identity))
        chances.append(chance_identity_fidelity(other_identity))
    assert min(own) >= 0.9, own
    mean_other, chance = sum(other) / len(other), sum(chances) / len(chances)
    assert 0.1 < chance < 0.3
    assert abs(mean_other - chance) < 0.15 and mean_other < 0.5, (other, chance)


def test_prompt_faithfulness_matched_high_shuffled_low():
    rng = random.Random(7)
    attrs = [random_attrs(rng) for _ in range(48)]
    images = render_batch(attrs)
    assert prompt_faithfulness(images, attrs) >= 0.93
    shuffled = attrs[1:] + attrs[:1]
    low = prompt_faithfulness(images, shuffled)
    assert low < 0.45 and abs(low - chance_prompt_faithfulness(shuffled)) < 0.15
    # one mapping applies to every image; only the keys it names count
    assert prompt_faithfulness(images[:1], {"scene": attrs[0]["scene"]}) == 1.0
    assert math.isnan(prompt_faithfulness(images[:0], attrs[:0]))
    with pytest.raises(ValueError, match="attribute sets"):
        prompt_faithfulness(images, attrs[:3])


def test_chance_levels_and_matching_rules():
    identity = {"body_shape": "circle", "body_color": "red", "eyes": "dot", "accessory": "none",
                "accessory_color": "blue"}
    assert chance_identity_fidelity(identity) == pytest.approx((1 / 5 + 1 / 8 + 1 / 3 + 1 / 5) / 4)
    with_hat = {**identity, "accessory": "hat"}
    assert chance_identity_fidelity(with_hat) == pytest.approx((1 / 5 + 1 / 8 + 1 / 3 + 1 / 5 + 0.8 / 6) / 5)
    reading = {**with_hat, "accessory": "none", "accessory_color": None}
    assert attribute_matches(reading, with_hat) == {"body_shape": True, "body_color": True, "eyes": True,
                                                    "accessory": False, "accessory_color": False}
    assert "accessory_color" not in attribute_matches(reading, identity)
    with pytest.raises(ValueError, match="unknown attribute values"):
        attribute_matches(reading, {"body_color": "mauve"})
    with pytest.raises(ValueError, match="identity_attrs"):
        identity_fidelity(torch.zeros(1, 3, 32, 32), {"scene": "beach"})


def test_probe_reads_other_image_sizes():
    rng = random.Random(3)
    attrs = [random_attrs(rng) for _ in range(24)]
    big = torch.nn.functional.interpolate(render_batch(attrs), size=(64, 64), mode="bilinear", align_corners=False)
    assert prompt_faithfulness(big, attrs) >= 0.85


def test_image_features_copy_same_character_other_character():
    identity, refs = _character_images(1)
    _, own_new = _character_images(1, 14)
    _, other = _character_images(2)
    f_refs, f_own, f_other = image_features(refs), image_features(own_new[10:]), image_features(other)
    assert f_refs.shape == (10, load_probe().dim)
    assert torch.allclose(f_refs.norm(dim=1), torch.ones(10), atol=1e-5)
    copy = (f_refs @ f_refs.T).max(dim=1).values
    assert torch.all(copy > 0.999)
    own_max = (f_own @ f_refs.T).max(dim=1).values.mean()
    other_max = (f_other @ f_refs.T).max(dim=1).values.mean()
    assert own_max > other_max + 0.1, (own_max, other_max)


# ------------------------------------------------------------------------------------------------ CLIP
def test_sandbox_clip_ranks_the_matching_description_first():
    stats = evaluate_clip(load_sandbox_clip(), n=128, candidates=64, seed=77)
    assert stats["text_to_image_top1"] >= 0.8 and stats["image_to_text_top1"] >= 0.8, stats
    assert stats["matched_cosine_mean"] > stats["mismatched_cosine_mean"] + 0.3
    # fine details too: the true caption beats the same caption with one attribute changed
    assert min(stats["true_caption_beats_one_attribute_changed"].values()) >= 0.85, stats


def test_read_description_inverts_describe():
    rng = random.Random(11)
    for _ in range(300):
        attrs = random_attrs(rng)
        expected = {k: v for k, v in attrs.items() if not (k == "accessory_color" and attrs["accessory"] == "none")}
        assert read_description(describe(attrs)) == expected
        identity = {k: expected[k] for k in IDENTITY_ATTRIBUTES if k in expected}
        assert read_description(f"Draw {describe(attrs, identity_only=True)}.") == identity
        scene = {k: attrs[k] for k in ("expression", "scene", "pose")}
        assert read_description(describe(attrs, name="Moki")) == scene
    assert read_description("a picture of the sea") == {}


# ------------------------------------------------------------------------------------------------ rewards + eval
def test_reward_terms_take_the_sandbox_models_by_name():
    from cmrp.rewards import ClipSimilarity, RewardContext, TrainsetPenalty

    identity, refs = _character_images(4)
    rng = random.Random(5)
    attrs = [{**identity, **{k: rng.choice(ATTRIBUTE_VALUES[k]) for k in ("expression", "pose", "scene")}}
             for _ in range(8)]
    images = render_batch(attrs)
    context = RewardContext(reference_images=refs)
    clip = ClipSimilarity(encoder="sandbox-clip")
    matched = clip(images, [describe(a) for a in attrs], group_ids=torch.zeros(8), context=context).scores
    wrong = clip(images, [describe(a) for a in attrs[1:] + attrs[:1]], group_ids=torch.zeros(8), context=context)
    assert matched.mean() > wrong.scores.mean() + 0.2
    penalty = TrainsetPenalty(features="sandbox-image", tau_low=0.3, tau_high=0.95)
    out = penalty(refs[:4], [""] * 4, group_ids=torch.zeros(4), context=context)
    assert torch.all(out.info["max_similarity"] > 0.999) and torch.all(out.scores < 0)
    with pytest.raises(ConfigError, match="sandbox-clip"):
        ClipSimilarity(encoder="sandbox-clipp")


def test_sandbox_reward_preset_uses_the_sandbox_models():
    from cmrp.config import load_reward_preset

    terms = load_reward_preset("sandbox")["terms"]
    assert terms["clip_similarity"]["kwargs"]["encoder"] == "sandbox-clip"
    assert terms["trainset_penalty"]["kwargs"]["features"] == "sandbox-image"


def test_eval_feature_set_sandbox():
    from cmrp.evaluation.features import FEATURE_SETS, load_feature_set

    assert {"pixel", "sandbox", "pretrained"} <= set(FEATURE_SETS)
    feats = load_feature_set("sandbox")
    rng = random.Random(9)
    attrs = [random_attrs(rng) for _ in range(6)]
    images = render_batch(attrs)
    sims = feats.clip.encode_image(images) @ feats.clip.encode_text([describe(a) for a in attrs]).T
    assert torch.equal(sims.argmax(dim=1), torch.arange(6))
    assert feats.dino(images).shape == (6, load_probe().dim)


def test_eval_oracle_numbers_for_sandbox_and_other_characters(tmp_path):
    from cmrp.data.character import Character, CharacterSplit, Profile
    from cmrp.evaluation.oracle import chance_levels, image_oracle_numbers, prompt_attributes

    character = build_character(3, tmp_path, n_reference_images=6, n_scenes=1)
    identity = character.profile.fields["identity"]
    prompts = [item.caption for item in character.test.t2i]  # what evaluation scores against
    assert all(item.caption and character.name not in item.caption for item in character.test.t2i)
    attrs = [prompt_attributes(p) for p in prompts]
    assert all(a and {k: a[k] for k in IDENTITY_ATTRIBUTES if k in a} ==
               {k: v for k, v in identity.items() if not (k == "accessory_color" and identity["accessory"] == "none")}
               for a in attrs)
    images = render_batch([{**identity, **{k: a[k] for k in ("expression", "pose", "scene")}} for a in attrs])
    numbers = image_oracle_numbers(character, images, attrs)
    assert numbers["identity_fidelity"] >= 0.9 and numbers["prompt_faithfulness"] >= 0.9
    noise = torch.rand(len(attrs), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert image_oracle_numbers(character, noise, attrs)["identity_fidelity"] < 0.6
    levels = chance_levels(character, attrs)
    assert 0.1 < levels["chance_identity_fidelity"] < 0.3 and 0.1 < levels["chance_prompt_faithfulness"] < 0.3
    assert min(levels["probe_heldout_accuracy"].values()) >= 0.95
    other = Character("Nobody", Profile("text"), CharacterSplit())
    assert image_oracle_numbers(other, images, attrs) == {} and chance_levels(other, attrs) is None


def test_text_image_agreement_reads_the_reply_and_checks_the_picture(tmp_path):
    from cmrp.data.character import Character, CharacterSplit, Profile
    from cmrp.evaluation.oracle import reply_agreement
    from cmrp.sandbox.templates import image_sentence

    character = build_character(3, tmp_path, n_reference_images=6, n_scenes=1)
    identity = character.profile.fields["identity"]
    rng = random.Random(0)
    shown = [{**identity, **{k: rng.choice(ATTRIBUTE_VALUES[k]) for k in ("expression", "pose", "scene")}}
             for _ in range(12)]
    images = render_batch(shown)
    said = [f"Right now I'm {image_sentence(a, accessory=True)}. Boop!" for a in shown]
    true = reply_agreement(character, images, said)
    assert true["text_image_agreement"] >= 0.95 and true["reply_states_picture"] == 1.0
    # scene, pose and expression said of other pictures (each reply paired with another one): near chance
    plain = [f"Look, here I am {image_sentence(a)}." for a in shown]
    assert reply_agreement(character, images, plain)["text_image_agreement"] >= 0.95
    assert reply_agreement(character, images, plain[6:] + plain[:6])["text_image_agreement"] < 0.5
    assert 0.15 < true["text_image_agreement_chance"] < 0.3  # 1/4 expression, 1/5 pose and scene, ...
    # a reply that states nothing about a picture is left out, and counted
    mixed = reply_agreement(character, images[:2], [said[0], "I love gardening, I could do it for hours."])
    assert mixed["reply_states_picture"] == 0.5 and mixed["agreement_items"] == 1
    assert math.isnan(reply_agreement(character, images[:1], ["Hello!"])["text_image_agreement"])
    assert reply_agreement(Character("Nobody", Profile("text"), CharacterSplit()), images, said) == {}
    with pytest.raises(ValueError, match="2 replies for 12 images"):
        reply_agreement(character, images, said[:2])


# ------------------------------------------------------------------------------------------------ training
def test_training_functions_lower_the_loss_and_round_trip(tmp_path):
    probe, manifest = train_probe(tmp_path, steps=12, batch_size=32, lr=1e-2, eval_n=40, log=None)
    assert manifest["training"]["final_loss"] < manifest["training"]["first_loss"]
    loaded = load_probe(tmp_path)
    images = render_batch([random_attrs(random.Random(i)) for i in range(8)])
    with torch.no_grad():
        for key, logits in probe(images).items():
            assert torch.allclose(loaded(images)[key], logits, atol=0.05), key
    assert set(manifest["heldout"]["accuracy_clean"]) == set(ATTRIBUTE_VALUES)
    _, clip_manifest = train_clip(tmp_path, steps=12, batch_size=32, lr=1e-2, eval_n=64, log=None)
    assert clip_manifest["training"]["final_loss"] < clip_manifest["training"]["first_loss"]
    assert load_sandbox_clip(tmp_path).encode_text(["a red round creature"]).shape == (1, 64)


def test_cli_train_probe_writes_weights_and_manifest(tmp_path, capsys):
    from cmrp.cli import main

    out = tmp_path / "p"
    assert main(["sandbox", "train-probe", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--heldout", "20", "--threads", "1"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert (out / "probe.safetensors").is_file() and (out / "probe.json").is_file()
    assert load_probe(out).dim == load_probe().dim
    assert main(["sandbox", "train-features", "--out", str(out), "--lr", "0"]) == 2
    assert "--lr 0.0: must be positive" in capsys.readouterr().err


def test_a_preset_naming_an_unknown_feature_model_fails_validation(tmp_path):
    from cmrp.config import load_reward_preset

    text = (Path(__file__).resolve().parents[2] / "rewards" / "sandbox.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("features: sandbox-image", "features: sandbox-imag"))
    with pytest.raises(ConfigError, match="unknown feature model 'sandbox-imag'; registered: sandbox-clip, sandbox-image"):
        load_reward_preset(bad)
