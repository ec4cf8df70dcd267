"""Reward terms, the composite and the Flow-GRPO adapter, on hand-built inputs with known answers."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch

from cmrp import resources
from cmrp.config import load_reward_preset
from cmrp.errors import ConfigError, WeightsError
from cmrp.registry import REWARDS
from cmrp.rewards import (
    Brightness,
    ClipSimilarity,
    Composite,
    LpipsDiversity,
    RewardContext,
    RewardOutput,
    TrainsetPenalty,
    VqaConsistency,
    VQAQuestion,
    as_flow_grpo,
    build_reward,
    scalar_metrics,
)
from cmrp.rewards._ops import IdentityCache, fit_square
from cmrp.rewards.diversity import pixel_distance
from cmrp.rewards.trainset import pixel_features
from cmrp.rewards.vqa import match_option, normalise_answer, token_f1

CTX = RewardContext()


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def solid(*levels: float, size: int = 8) -> torch.Tensor:
    """One grey image per level."""
    return torch.stack([torch.full((3, size, size), level) for level in levels])


class TableEncoder:
    """CLIP stand-in: image embedding = its mean colour; text embedding looked up in a table."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.image_calls = 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        return images.mean(dim=(2, 3))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.table[t] for t in texts])


def coloured(*rgbs: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    return torch.stack([torch.tensor(rgb).view(3, 1, 1).expand(3, size, size) for rgb in rgbs]).float()


# --- clip_similarity -------------------------------------------------------------------------------


def test_clip_identical_and_orthogonal_embeddings():
    encoder = TableEncoder({"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0]})
    term = ClipSimilarity(encoder=encoder)
    out = term(coloured((1, 0, 0), (1, 0, 0)), ["red", "green"], group_ids=ids(0, 0), context=CTX)
    assert out.scores.dtype == torch.float32
    assert out.scores.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_clip_scale_offset_and_reference_mix():
    encoder = TableEncoder({"red": [1.0, 0.0, 0.0]})
    term = ClipSimilarity(encoder=encoder, scale=2.0, offset=-0.5, reference_weight=0.25)
    refs = coloured((0, 1, 0), (1, 0, 0))  # cos to the image: 0 and 1 -> mean 0.5
    context = RewardContext(reference_images=refs)
    out = term(coloured((1, 0, 0)), ["red"], group_ids=ids(0), context=context)
    cos = 0.75 * 1.0 + 0.25 * 0.5
    assert out.scores.item() == pytest.approx(2.0 * cos - 0.5)
    assert out.info["cos_reference"] == pytest.approx(0.5)
    calls = encoder.image_calls
    term(coloured((1, 0, 0)), ["red"], group_ids=ids(0), context=context)
    assert encoder.image_calls == calls + 1  # reference embeddings came from the cache
    no_refs = term(coloured((1, 0, 0)), ["red"], group_ids=ids(0), context=CTX)
    assert no_refs.scores.item() == pytest.approx(2.0 * 1.0 - 0.5)  # text only without references


def test_clip_missing_local_weights_names_the_model(tmp_path):
    pytest.importorskip("open_clip")
    term = ClipSimilarity(model="ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(WeightsError, match="ViT-B-32") as err:
        term(solid(0.5), ["x"], group_ids=ids(0), context=CTX)
    assert "missing.bin" in str(err.value) and "pretrained" in str(err.value)


def test_clip_without_open_clip_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name == "open_clip" or name.startswith("open_clip."):
            raise ImportError("No module named 'open_clip'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(WeightsError, match="pip install open_clip_torch") as err:
        ClipSimilarity()(solid(0.5), ["x"], group_ids=ids(0), context=CTX)
    assert "ViT-B-32" in str(err.value) and "encoder=" in str(err.value)


def test_clip_bad_reference_weight():
    with pytest.raises(ConfigError, match="reference_weight"):
        ClipSimilarity(reference_weight=1.5)


def test_fit_square_resizes_and_crops():
    images = torch.rand(2, 3, 30, 60)
    assert fit_square(images, 16).shape == (2, 3, 16, 16)
    assert fit_square(images, 16, mode="longest").shape == (2, 3, 16, 16)
    assert fit_square(images, 16, mode="squash").shape == (2, 3, 16, 16)


# --- vqa_consistency -------------------------------------------------------------------------------


class ScriptedAnswerer:
    """Returns the scripted answers in order and records each call."""

    def __init__(self, answers: list[str]):
        self.answers = answers
        self.calls: list[tuple[tuple[int, ...], list[str], list]] = []

    def answer(self, images, questions, options):
        self.calls.append((tuple(images.shape), list(questions), list(options)))
        assert len(questions) == len(self.answers)
        return list(self.answers)


MCQ = VQAQuestion("Hair colour?", "red", options=["blue", "red", "green"], answer_index=1)
YES = VQAQuestion("Is she smiling?", "yes")
OPEN = VQAQuestion("What colour is the ball?", "red")


def vqa(questions, answers, images=None):
    answerer = ScriptedAnswerer(answers)
    images = images if images is not None else solid(*[0.5] * len(questions))
    context = RewardContext(questions=questions, backbone=answerer)
    return VqaConsistency()(
        images, [""] * len(questions), group_ids=ids(*range(len(questions))), context=context
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("red", 1.0),
        ("Red.", 1.0),
        ("B", 1.0),
        ("B.", 1.0),
        ("(b)", 1.0),
        ("B. red", 1.0),
        ("A", 0.0),
        ("blue", 0.0),
        ("The answer is red", 1.0),
        ("purple", 0.0),
    ],
)
def test_vqa_mcq(answer, expected):
    assert vqa([[MCQ]], [answer]).scores.item() == expected


def test_vqa_mcq_without_answer_index_uses_answer_text():
    question = VQAQuestion("Hair colour?", "Green", options=["blue", "red", "green"])
    assert vqa([[question], [question]], ["C", "red"]).scores.tolist() == [1.0, 0.0]


def test_vqa_yes_no_and_open_f1():
    out = vqa(
        [[YES], [YES], [OPEN], [OPEN], [OPEN]],
        ["Yes, she is.", "No.", "The ball is bright red.", "blue", "red"],
    )
    scores = out.scores.tolist()
    assert scores[:2] == [1.0, 0.0]
    assert 0 < scores[2] < 1 and scores[2] == pytest.approx(token_f1("The ball is bright red.", "red"))
    assert scores[2] == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))  # "ball is bright red" vs "red"
    assert scores[3:] == [0.0, 1.0]


def test_vqa_weighted_mean_nan_without_questions_and_one_call():
    heavy = VQAQuestion("Is she smiling?", "yes", weight=3.0)
    answerer = ScriptedAnswerer(
        ["yes", "red", "no"]
    )  # sample 0: heavy right, OPEN right; sample 2: YES wrong
    context = RewardContext(questions=[[heavy, OPEN], [], [YES]], backbone=answerer)
    images = torch.rand(3, 3, 8, 8)
    out = VqaConsistency()(images, ["", "", ""], group_ids=ids(0, 0, 1), context=context)
    assert out.scores[0].item() == 1.0 and math.isnan(out.scores[1].item()) and out.scores[2].item() == 0.0
    assert len(answerer.calls) == 1
    shape, questions, options = answerer.calls[0]
    assert shape == (3, 3, 8, 8) and questions == [
        "Is she smiling?",
        "What colour is the ball?",
        "Is she smiling?",
    ]
    assert options == [None, None, None]

    weighted = ScriptedAnswerer(["yes", "blue"])  # heavy right (3), OPEN wrong (1) -> 0.75
    context = RewardContext(questions=[[heavy, OPEN]], backbone=weighted)
    assert VqaConsistency()(images[:1], [""], group_ids=ids(0), context=context).scores.item() == 0.75


def test_vqa_answerer_kwarg_overrides_backbone_and_images_are_per_question():
    seen = {}

    def answerer(images, questions, options):  # a plain callable is accepted too
        seen["means"] = images.mean(dim=(1, 2, 3)).tolist()
        return ["B", "yes", "yes"]

    context = RewardContext(questions=[[MCQ], [YES, YES]], backbone=object())
    out = VqaConsistency(answerer=answerer)(solid(0.2, 0.8), ["", ""], group_ids=ids(0, 1), context=context)
    assert out.scores.tolist() == [1.0, 1.0]
    assert seen["means"] == pytest.approx([0.2, 0.8, 0.8])


def test_vqa_without_answerer_or_questions():
    context = RewardContext(questions=[[YES]])
    with pytest.raises(ConfigError, match="answerer"):
        VqaConsistency()(solid(0.5), [""], group_ids=ids(0), context=context)
    out = VqaConsistency()(solid(0.5, 0.5), ["", ""], group_ids=ids(0, 0), context=CTX)
    assert torch.isnan(out.scores).all()


def test_answer_normalisation_helpers():
    assert normalise_answer("The  Ball, is RED!") == "ball is red"
    assert match_option("dark red", ["red", "dark red"]) == 1
    assert match_option("red or blue", ["red", "blue"]) is None  # ambiguous
    assert token_f1("", "") == 1.0 and token_f1("red", "") == 0.0


# --- lpips_diversity -------------------------------------------------------------------------------


def test_diversity_identical_group_is_zero_and_singleton_is_nan():
    term = LpipsDiversity(net="pixel")
    out = term(solid(0.3, 0.3, 0.3, 0.9), ["p"] * 4, group_ids=ids(0, 0, 0, 1), context=CTX)
    assert out.scores[:3].tolist() == [0.0, 0.0, 0.0] and math.isnan(out.scores[3].item())
    assert out.info["n_pairs"] == 3 and out.info["singleton_groups"] == 1


def test_diversity_mean_equals_mean_pairwise_and_groups_do_not_mix():
    torch.manual_seed(0)
    images = torch.rand(7, 3, 8, 8)
    groups = ids(0, 1, 0, 1, 0, 1, 0)
    calls = []

    def distance(a, b):
        calls.append(a.shape[0])
        return pixel_distance(a, b)

    out = LpipsDiversity(distance=distance, pair_batch_size=4)(
        images, [""] * 7, group_ids=groups, context=CTX
    )
    assert sum(calls) == 6 + 3 and max(calls) <= 4  # only i<j pairs within groups, in chunks of 4
    for group in (0, 1):
        members = (groups == group).nonzero().flatten().tolist()
        pairs = [
            pixel_distance(images[i : i + 1], images[j : j + 1]).item()
            for k, i in enumerate(members)
            for j in members[k + 1 :]
        ]
        assert out.scores[members].mean().item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
        for i in members:
            others = [pixel_distance(images[i : i + 1], images[j : j + 1]).item() for j in members if j != i]
            assert out.scores[i].item() == pytest.approx(sum(others) / len(others), rel=1e-5)


def test_diversity_bad_net():
    with pytest.raises(ConfigError, match="pixel"):
        LpipsDiversity(net="resnet")


# --- trainset_penalty ------------------------------------------------------------------------------


def unit(cos: float) -> list[float]:
    """A 2-d unit vector whose cosine to e0 = (1, 0) is `cos`."""
    return [cos, math.sqrt(1 - cos * cos)]


class LevelFeatures:
    """Features looked up by an image's mean grey level (rounded to 0.1); counts images embedded."""

    def __init__(self, table: dict[float, list[float]]):
        self.table, self.calls = table, []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        return torch.tensor([self.table[round(img.mean().item(), 1)] for img in images])


def test_trainset_band_penalty_with_constructed_features():
    # reference: e0; images: cosine 0.3 (below), 0.5 / 0.7 / 0.9 (inside, edges included), 0.95 (above)
    table = {0.0: [1.0, 0.0], 0.1: unit(0.3), 0.2: unit(0.5), 0.3: unit(0.7), 0.4: unit(0.9), 0.5: unit(0.95)}
    term = TrainsetPenalty(features=LevelFeatures(table), tau_low=0.5, tau_high=0.9, penalty_scale=2.0)
    context = RewardContext(reference_images=solid(0.0))
    out = term(solid(0.1, 0.2, 0.3, 0.4, 0.5), [""] * 5, group_ids=ids(0, 0, 0, 0, 0), context=context)
    assert out.info["max_similarity"].tolist() == pytest.approx([0.3, 0.5, 0.7, 0.9, 0.95], abs=1e-6)
    assert out.scores.tolist() == pytest.approx(
        [-(0.5 - 0.3) * 2, 0.0, 0.0, 0.0, -(0.95 - 0.9) * 2], abs=1e-6
    )
    assert out.info["frac_below"] == pytest.approx(0.2)


def test_trainset_uses_the_closest_reference_and_caches_reference_features():
    # references e0 and e1; the image is at cosine 0.3 to e0 and 0.954 to e1 -> max 0.954 (above)
    features = LevelFeatures({0.0: [1.0, 0.0], 0.1: [0.0, 1.0], 0.2: unit(0.3)})
    term = TrainsetPenalty(features=features)
    context = RewardContext(reference_images=solid(0.0, 0.1))
    out = term(solid(0.2), [""], group_ids=ids(0), context=context)
    assert out.info["max_similarity"].item() == pytest.approx(math.sqrt(1 - 0.09), abs=1e-6)
    assert out.scores.item() == pytest.approx(-(math.sqrt(1 - 0.09) - 0.9), abs=1e-6)
    term(solid(0.2, 0.2), ["", ""], group_ids=ids(0, 0), context=context)
    assert features.calls == [2, 1, 2]  # references embedded once for this context
    without = term(solid(0.2), [""], group_ids=ids(0), context=CTX)  # no references: abstain, say why
    assert math.isnan(without.scores.item()) and "RewardContext.reference_images" in without.info["abstained"]
    with pytest.raises(ConfigError, match="tau_low"):
        TrainsetPenalty(tau_low=0.9, tau_high=0.5)


def test_trainset_pixel_model_and_missing_dinov2(tmp_path):
    torch.manual_seed(0)
    refs = torch.rand(3, 3, 32, 32)
    term = TrainsetPenalty(model="pixel")
    out = term(refs[:1].clone(), [""], group_ids=ids(0), context=RewardContext(reference_images=refs))
    assert out.info["max_similarity"].item() == pytest.approx(1.0, abs=1e-5)  # an exact copy
    assert out.scores.item() == pytest.approx(-0.1, abs=1e-5)
    assert pixel_features(refs).shape == (3, 16 * 16 * 3)
    missing = TrainsetPenalty(model=str(tmp_path / "dinov2"))
    with pytest.raises(WeightsError, match="dinov2") as err:
        missing(refs[:1], [""], group_ids=ids(0), context=RewardContext(reference_images=refs))
    assert "model:" in str(err.value) and "HF_HOME" in str(err.value)


def test_identity_cache_invalidates_on_in_place_edit():
    cache, tensor = IdentityCache(), torch.zeros(2)
    assert cache.get(tensor, lambda t: t.sum().item()) == 0.0
    tensor += 1
    assert cache.get(tensor, lambda t: t.sum().item()) == 2.0
    assert cache.get(tensor, lambda t: -1.0) == 2.0


# --- brightness -------------------------------------------------------------------------------------


def test_brightness():
    images = coloured((1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0.5, 0.5))
    assert Brightness()(
        images, [""] * 4, group_ids=ids(0, 0, 0, 0), context=CTX
    ).scores.tolist() == pytest.approx([0.299, 0.587, 0.114, 0.5])
    target = Brightness(target=0.5)(images, [""] * 4, group_ids=ids(0, 0, 0, 0), context=CTX)
    assert target.scores.tolist() == pytest.approx([-0.201, -0.087, -0.386, 0.0])


# --- composite -------------------------------------------------------------------------------------


class Fixed:
    def __init__(self, values: list[float]):
        self.values = values

    def __call__(self, images, prompts, *, group_ids, context):
        return RewardOutput(torch.tensor(self.values, dtype=torch.float32), {"note": len(self.values)})


@pytest.mark.parametrize("parallel", [True, False])
def test_composite_weighted_sum_and_nan_semantics(parallel):
    nan = float("nan")
    composite = Composite(
        {"a": (0.5, Fixed([1.0, nan, 2.0, nan])), "b": (2.0, Fixed([1.0, 3.0, nan, nan]))}, parallel=parallel
    )
    out = composite(torch.rand(4, 3, 4, 4), [""] * 4, group_ids=ids(0, 0, 1, 1), context=CTX)
    assert out.scores[:3].tolist() == [0.5 + 2.0, 6.0, 1.0] and math.isnan(out.scores[3].item())
    assert out.info["a"]["mean"] == pytest.approx(1.5) and out.info["a"]["std"] == pytest.approx(0.5)
    assert out.info["b"]["mean"] == pytest.approx(2.0) and out.info["b"]["weight"] == 2.0
    assert torch.equal(out.info["b"]["scores"][:2], torch.tensor([1.0, 3.0]))
    assert out.info["a"]["info"] == {"note": 4} and out.info["a"]["time_s"] >= 0
    metrics = scalar_metrics(out.info)
    assert metrics["reward/a/mean"] == pytest.approx(1.5) and metrics["reward/a/note"] == 4.0


def test_composite_all_terms_abstain_gives_nan():
    nan = float("nan")
    out = Composite({"a": (1.0, Fixed([nan, nan]))})(torch.rand(2, 3, 4, 4), ["", ""], group_ids=ids(0, 0))
    assert torch.isnan(out.scores).all() and math.isnan(out.info["a"]["mean"])


def small_nets():
    """Injected stand-ins for every feature net the paper preset would download."""
    encoder = TableEncoder({"a cat": [1.0, 0.0, 0.0], "a dog": [0.0, 1.0, 0.0]})
    return {
        "clip_similarity": {"encoder": encoder},
        "lpips_diversity": {"distance": pixel_distance},
        "trainset_penalty": {
            "features": torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
        },
        "vqa_consistency": {"answerer": ScriptedAnswerer(["yes", "no"])},
    }


def test_build_reward_from_the_paper_preset_with_injected_nets():
    preset = load_reward_preset("unicharacter")
    reward = build_reward(preset, term_kwargs=small_nets())
    assert reward.weights == {
        "vqa_consistency": 0.3,
        "clip_similarity": 0.45,
        "lpips_diversity": 0.1,
        "trainset_penalty": 0.15,
    }
    assert reward.terms["trainset_penalty"][1].tau_high == 0.9
    images = coloured((1, 0, 0), (0, 1, 0), (1, 0, 0), (0, 1, 0))
    context = RewardContext(reference_images=coloured((1, 0, 0)), questions=[[YES], [], [], [YES]])
    out = reward(images, ["a cat", "a cat", "a dog", "a dog"], group_ids=ids(0, 0, 1, 1), context=context)
    terms = {name: out.info[name]["scores"] for name in reward.terms}
    expected = torch.zeros(4)
    for name, weight in reward.weights.items():
        expected += weight * torch.nan_to_num(terms[name], nan=0.0)
    assert torch.allclose(out.scores, expected)
    # logits_per_image / 30 with OpenAI CLIP's logit scale 100: cosine * 100 / 30
    assert terms["clip_similarity"].tolist() == pytest.approx([100 / 30, 0.0, 0.0, 100 / 30], abs=1e-5)
    assert terms["vqa_consistency"][0].item() == 1.0 and terms["vqa_consistency"][3].item() == 0.0


def test_build_reward_skips_zero_weights_and_ignores_injections_for_absent_terms():
    preset = {
        "name": "p",
        "terms": {
            "brightness": {"weight": 1.0, "kwargs": {}},
            "lpips_diversity": {"weight": 0.0, "kwargs": {"net": "pixel"}},
        },
    }
    reward = build_reward(
        preset, term_kwargs={"brightness": {"target": 0.5}, "clip_similarity": {"encoder": 1}}
    )
    assert list(reward.terms) == ["brightness"] and reward.terms["brightness"][1].target == 0.5


def test_build_reward_errors():
    with pytest.raises(ConfigError, match="Did you mean 'clip_similarity'") as err:
        build_reward({"name": "p", "terms": {"clip_similarty": {"weight": 1.0, "kwargs": {}}}})
    assert "reward preset 'p'" in str(err.value)
    with pytest.raises(ConfigError, match="unknown kwarg 'tau_lo' \\(did you mean 'tau_low'\\?\\)"):
        build_reward({"name": "p", "terms": {"trainset_penalty": {"weight": 1.0, "kwargs": {"tau_lo": 0.1}}}})
    with pytest.raises(ConfigError, match="net must be one of"):
        build_reward({"name": "p", "terms": {"lpips_diversity": {"weight": 1.0, "kwargs": {"net": "x"}}}})


def test_every_shipped_preset_builds_without_loading_weights():
    for path in sorted(resources.asset_dir("rewards").glob("*.yaml")):
        preset = load_reward_preset(path)
        reward = build_reward(preset, check=False)  # the check itself: test_rewards_models.py
        assert set(reward.terms) == {n for n, s in preset["terms"].items() if s["weight"] != 0}
        assert all(name in REWARDS for name in reward.terms)


def test_sandbox_preset_scores_without_downloads():
    # clip_similarity and trainset_penalty load the sandbox models shipped in the package, by name
    nets = small_nets()
    reward = build_reward(load_reward_preset("sandbox"), term_kwargs={"vqa_consistency": nets["vqa_consistency"]})
    torch.manual_seed(0)
    context = RewardContext(reference_images=torch.rand(2, 3, 16, 16), questions=[[YES], [OPEN]])
    out = reward(torch.rand(2, 3, 16, 16), ["", ""], group_ids=ids(0, 0), context=context)
    assert torch.isfinite(out.scores).all()


# --- Flow-GRPO adapter -----------------------------------------------------------------------------


def test_as_flow_grpo_uint8_nhwc_and_metadata_groups():
    levels = np.array([0, 255, 51, 51], dtype=np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (4, 8, 6, 3)).copy()  # NHWC uint8
    fn = as_flow_grpo(
        build_reward(
            {
                "name": "p",
                "terms": {
                    "lpips_diversity": {"weight": 1.0, "kwargs": {"net": "pixel"}},
                    "brightness": {"weight": 0.0, "kwargs": {}},
                },
            }
        )
    )
    metadata = [{"group_id": "x"}, {"group_id": "x"}, {"group_id": 7}, {"group_id": 7}]
    scores, info = fn(images, ["a", "b", "c", "d"], metadata)
    assert isinstance(scores, np.ndarray) and scores.shape == (4,)
    assert scores.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert "lpips_diversity" in info
    by_prompt, _ = fn(images, ["a", "b", "a", "b"], [{}, {}, {}, {}])  # no group ids: identical prompts
    assert by_prompt.tolist() == pytest.approx([0.2, 0.8, 0.2, 0.8])


def test_as_flow_grpo_other_image_forms():
    fn = as_flow_grpo(Brightness())
    nchw = torch.full((2, 3, 5, 5), 255, dtype=torch.uint8)
    assert fn(nchw, ["a", "b"], None)[0].tolist() == pytest.approx([1.0, 1.0])
    floats = torch.full((1, 3, 5, 5), 0.5)
    assert fn(floats, ["a"], None)[0].tolist() == pytest.approx([0.5])
    PIL = pytest.importorskip("PIL.Image")
    pil = [PIL.new("RGB", (6, 4), (255, 0, 0)), PIL.new("L", (6, 4), 0)]
    assert fn(pil, ["a", "b"], None)[0].tolist() == pytest.approx([0.299, 0.0], abs=1e-3)


# --- default-net wrappers (random or fake nets: no downloads) --------------------------------------


def test_open_clip_wrapper_resizes_and_normalises_tensors():
    from cmrp.rewards.clip import OpenClipEncoder

    class FakeClip(torch.nn.Module):
        def encode_image(self, pixels):
            self.pixels = pixels
            return pixels.flatten(1)[:, :4]

        def encode_text(self, tokens):
            return tokens.float()

    model = FakeClip()
    encoder = OpenClipEncoder(
        model, lambda texts: torch.ones(len(texts), 4), {"size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    )
    encoder.encode_image(torch.full((2, 3, 40, 80), 0.75))
    assert model.pixels.shape == (2, 3, 32, 32) and torch.allclose(
        model.pixels, torch.ones(1)
    )  # (0.75-0.5)/0.25
    assert encoder.encode_text(["a", "b"]).shape == (2, 4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision `pretrained=` inside lpips
def test_lpips_wrapper_with_a_random_backbone():
    lpips = pytest.importorskip("lpips")
    from cmrp.rewards.diversity import LpipsDistance

    distance = LpipsDistance(lpips.LPIPS(net="squeeze", pnet_rand=True, verbose=False))
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    out = LpipsDiversity(distance=distance)(images, [""] * 3, group_ids=ids(0, 0, 1), context=CTX)
    assert out.scores[0].item() == pytest.approx(out.scores[1].item()) and out.scores[0].item() > 0
    assert math.isnan(out.scores[2].item())


def test_trainset_penalty_loads_dinov2_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    )
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dino")
    term = TrainsetPenalty(model=str(tmp_path / "dino"), image_size=28)
    refs = torch.rand(2, 3, 40, 30)
    out = term(refs[:1].clone(), [""], group_ids=ids(0), context=RewardContext(reference_images=refs))
    assert out.info["max_similarity"].item() == pytest.approx(1.0, abs=1e-4)  # a copy of a reference
    assert out.scores.item() == pytest.approx(-0.1, abs=1e-4)
