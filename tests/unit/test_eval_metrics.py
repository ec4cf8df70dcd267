"""Evaluation metrics on constructed inputs whose answers are known."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cmrp.data.character import Character, CharacterSplit, MultipleChoice, Profile
from cmrp.data.tasks import OPTION_LETTERS, Example, Segment
from cmrp.evaluation import metrics as M
from cmrp.evaluation.features import ColourWordClip, load_feature_set
from cmrp.evaluation.report import clean_numbers, delta_table, png_data_uri


class FlatEncoder:
    """A CLIP-like encoder whose image features are the flattened pixels and text features given per text."""

    def __init__(self, text_features: dict[str, torch.Tensor] | None = None):
        self.text_features = text_features or {}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.text_features[t] for t in texts])


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_identical_images_score_one():
    enc = FlatEncoder()
    same = _images(1).repeat(4, 1, 1, 1)
    assert M.clip_i(enc, same, same[:2]) == pytest.approx(1.0)
    assert M.dino_similarity(lambda x: x.flatten(1) - 0.5, same, same[:1]) == pytest.approx(1.0)
    pixel = load_feature_set("pixel")
    assert M.dino_similarity(pixel.dino, same, same[:1]) == pytest.approx(1.0, abs=1e-5)
    assert M.clip_i(pixel.clip, same, same[:1]) == pytest.approx(1.0, abs=1e-5)


def test_orthogonal_features_score_zero():
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    a[:, 0] = 1.0  # only the red channel
    b[:, 1] = 1.0  # only the green channel
    assert M.clip_i(FlatEncoder(), a, b) == pytest.approx(0.0)
    assert M.dino_similarity(lambda x: x.flatten(1), a, b) == pytest.approx(0.0)


def test_clip_t_pairs_each_image_with_its_own_text():
    imgs = torch.eye(4).view(4, 1, 2, 2).expand(4, 3, 2, 2).contiguous()
    feats = {f"t{i}": imgs[i].flatten() for i in range(4)}
    enc = FlatEncoder(feats)
    assert M.clip_t(enc, imgs, ["t0", "t1", "t2", "t3"]) == pytest.approx(1.0)
    assert M.clip_t(enc, imgs, ["t1", "t2", "t3", "t0"]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        M.clip_t(enc, imgs, ["t0"])
    assert math.isnan(M.clip_i(enc, imgs[:0], imgs))


def test_colour_word_clip_prefers_the_named_colour():
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 220 / 255
    red[:, 1] = red[:, 2] = 40 / 255
    enc = ColourWordClip()
    assert M.clip_t(enc, red, ["a red ball"]) > 0.5
    assert M.clip_t(enc, red, ["a blue ball"]) < 0
    assert M.clip_t(enc, red, ["no colour named"]) == pytest.approx(0.0)


def test_max_reference_similarity_takes_the_closest_reference():
    flat = lambda x: x.flatten(1)  # noqa: E731
    refs = torch.eye(3).reshape(3, 3, 1, 1)  # three orthogonal "images"
    copies = refs[:2].clone()
    assert M.max_reference_similarity(flat, copies, refs) == pytest.approx(1.0)
    between = (refs[0] + refs[1]).unsqueeze(0)  # 45 degrees from two references
    assert M.max_reference_similarity(flat, between, refs) == pytest.approx(2 ** -0.5)
    # the mean similarity to all references is lower than the closest one
    assert M.dino_similarity(flat, between, refs) < M.max_reference_similarity(flat, between, refs)
    assert math.isnan(M.max_reference_similarity(flat, copies, refs[:0]))


def test_within_prompt_diversity():
    dist = lambda a, b: (a - b).abs().flatten(1).mean(dim=1)  # noqa: E731
    same = torch.zeros(4, 3, 4, 4)
    assert M.within_prompt_diversity(dist, same, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)
    # prompt 0: black vs white (distance 1); prompt 1: two identical greys (0) -> mean 0.5
    imgs = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.5),
                        torch.full((3, 4, 4), 0.5)])
    assert M.within_prompt_diversity(dist, imgs, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)
    # singletons have no pairs
    assert math.isnan(M.within_prompt_diversity(dist, imgs, torch.tensor([0, 1, 2, 3])))


def test_distinct_n_and_self_repetition():
    assert M.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert M.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert math.isnan(M.distinct_n([], 1))
    assert M.self_repetition(["la la la la la"], n=2) == pytest.approx(3 / 4)
    assert M.self_repetition(["one two three four"], n=2) == 0.0


def test_catchphrase_and_quirk_rates():
    phrases = ["Oh my whiskers!", "Boop!"]
    texts = ["Hello there. Oh my whiskers!", "boop, said the cat", "nothing here"]
    assert M.catchphrase_rate(texts, phrases) == pytest.approx(2 / 3)
    assert M.quirk_markers("ends every sentence with '~nya'") == ["~nya"]
    assert M.quirk_rate(["I like fish ~nya.", "I like fish."], "ends every sentence with '~nya'") == 0.5
    assert M.quirk_rate(["Kiko likes fish.", "I like fish."], "always speaks about themself in the third person",
                        "Kiko") == 0.5
    assert M.quirk_rate(["H-Hello!", "Hello!"], "stutters on the first word of every reply") == 0.5
    assert math.isnan(M.quirk_rate(["x"], "is very kind"))


def test_persona_stats_reads_the_profile():
    character = Character("Kiko", Profile("profile", {"catchphrases": ["Boop!"],
                                                      "quirk_description": "ends every sentence with '!!'"}),
                          CharacterSplit())
    stats = M.persona_stats(["Boop!! Hi!!", "Hi."], character, references=["Boop!! Hi!!", "Bye."])
    assert stats["catchphrase_rate"] == 0.5
    assert stats["quirk_rate"] == 0.5
    assert stats["token_f1"] == pytest.approx(0.5)
    assert M.token_f1("the red hat", "red hat") == pytest.approx(0.8)


@pytest.mark.parametrize(("text", "expected"), [
    ("B", 1), ("B. blue", 1), ("(C)", 2), ("The answer is D.", 3), ("Answer: a", 0),
    ("I think it is blue", 1), ("A dragon would say green", 2), ("nothing useful", None),
    ("red or blue", None),
])
def test_parse_option(text, expected):
    assert M.parse_option(text, ["red", "blue", "green", "yellow"]) == expected


class PerfectModel:
    """Knows each question's right answer; `score_text` prefers the example whose answer text is right and
    `generate_text` writes the right letter — wherever the options were shuffled to."""

    def __init__(self, truth: dict[str, str]):
        self.truth = truth

    def _question(self, example: Example) -> tuple[str, list[str]]:
        prompt = [s.text for s in example.segments if s.kind == "text" and s.role == "user"][-1]
        lines = prompt.split("\n")
        return lines[0], [line[3:] for line in lines[1:]]

    def score_text(self, examples: list[Example]) -> torch.Tensor:
        scores = []
        for ex in examples:
            question, _ = self._question(ex)
            answer = ex.segments[-1].text.split(". ", 1)[1]
            scores.append(0.0 if answer == self.truth[question] else -5.0)
        return torch.tensor(scores)

    def generate_text(self, contexts: list[Example], max_new_tokens: int = 16) -> list[str]:
        out = []
        for ctx in contexts:
            question, options = self._question(ctx)
            out.append(f"Answer: {OPTION_LETTERS[options.index(self.truth[question])]}")
        return out


def test_mcq_accuracy_unchanged_by_shuffled_options_for_a_perfect_model():
    rng = random.Random(0)
    truth = {f"Question {i}?": f"right {i}" for i in range(6)}
    prefix = [Segment("text", "system", "You are Kiko.")]
    items = [(prefix, MultipleChoice(q, [a, "wrong x", "wrong y", "wrong z"], 0)) for q, a in truth.items()]
    shuffled = []
    for p, item in items:
        options = item.options[:]
        rng.shuffle(options)
        shuffled.append((p, MultipleChoice(item.question, options, options.index(truth[item.question]))))
    model = PerfectModel(truth)
    for batch in (items, shuffled):
        assert M.mcq_accuracy_by_likelihood(model, batch, "knowledge_qa") == 1.0
        assert M.mcq_accuracy_by_generation(model, batch, "knowledge_qa") == (1.0, 1.0)
    assert any(item.answer != 0 for _, item in shuffled)


def test_report_helpers():
    assert clean_numbers({"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(2.0)}) == \
        {"a": None, "b": [1.0, None], "c": 2.0}
    rows = delta_table({"acc": 0.75, "items": 8}, {"acc": 0.5, "items": 8})
    assert rows == [("acc", 0.75, 0.5, 0.25), ("items", 8, 8, None)]
    assert png_data_uri(torch.rand(3, 4, 4)).startswith("data:image/png;base64,")


# --- torchmetrics: CLIPScore, LPIPS, FID / KID; the pretrained feature set ------------------------------


@pytest.mark.filterwarnings("ignore")
def test_clip_t_is_torchmetrics_clipscore_for_a_transformers_clip(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import torchmetrics.functional.multimodal as tm

    from cmrp.rewards.clip import load_hf_clip
    from tests.unit import tiny_hf

    encoder = load_hf_clip(str(tiny_hf.clip_dir(tmp_path)), local_files_only=True)
    calls = []
    real = tm.clip_score
    monkeypatch.setattr(tm, "clip_score", lambda *a, **k: calls.append(1) or real(*a, **k))
    images, texts = _images(3, seed=1), ["a red cat", "blue", "green grass"]
    value = M.clip_t(encoder, images, texts)
    assert calls == [1]
    # torchmetrics (processor preprocessing, floored at 0) equals our encoder's paired cosine
    cosine = M.paired_cosine(encoder.encode_image(images), encoder.encode_text(texts))
    assert value == pytest.approx(max(cosine, 0.0), abs=1e-5)


class PooledFeatures(torch.nn.Module):
    """A tiny FID feature net: 2x2 average-pooled pixels (12 features)."""

    num_features = 12

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID from its definition: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), sample covariances."""
    import numpy as np
    import scipy.linalg

    a, b = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def test_fid_and_kid_through_torchmetrics_with_a_small_sample_guard():
    net = PooledFeatures()
    real, fake = _images(40, seed=2), (_images(30, seed=3) * 0.3 + 0.7)
    same = M.fid_kid(net, real, real)
    out = M.fid_kid(net, real, fake, kid_subsets=10)
    assert same["fid"] == pytest.approx(0.0, abs=1e-4)
    assert out["fid"] == pytest.approx(_frechet(net(real), net(fake)), rel=1e-3) and out["fid"] > 0.01
    assert abs(same["kid_mean"]) < 0.01 * out["kid_mean"]  # KID is unbiased: about 0 for one distribution
    assert (out["fid_real_images"], out["fid_generated_images"]) == (40, 30)
    tiny = M.fid_kid(net, real[:1], fake)
    assert math.isnan(tiny["fid"]) and math.isnan(tiny["kid_mean"]) and "at least 2" in tiny["fid_note"]
    assert math.isfinite(M.fid_kid(net, real[:3], fake[:2])["kid_mean"])  # KID subsets shrink to the smaller set


@pytest.mark.filterwarnings("ignore")
def test_torchmetrics_lpips_distance_per_pair(monkeypatch):
    import torchmetrics.functional.image.lpips as tm_lpips

    from cmrp.evaluation.features import LpipsMetric

    original = tm_lpips._get_tv_model_features  # a random AlexNet instead of ImageNet weights (no download)
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: original(net, False))
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    distance = LpipsMetric(LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True))
    a, b = _images(3, seed=4).repeat_interleave(1, 0), _images(3, seed=5)
    a = torch.nn.functional.interpolate(a, size=32)
    b = torch.nn.functional.interpolate(b, size=32)
    d = distance(a, torch.cat([a[:1], b[1:]]))
    assert d.shape == (3,) and d[0].item() == pytest.approx(0.0, abs=1e-6) and (d[1:] > 0).all()
    ids = torch.tensor([0, 0, 1])
    assert M.within_prompt_diversity(distance, a, ids) == pytest.approx(distance(a[:1], a[1:2]).item(), abs=1e-6)


def test_pretrained_features_without_weights_list_every_missing_model_and_only_real_options(tmp_path, monkeypatch):
    import socket

    from cmrp.errors import WeightsError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    with pytest.raises(WeightsError) as err:
        load_feature_set("pretrained")
    message = str(err.value)
    assert message.startswith("cmrp eval --features pretrained: 3 pretrained models not on this machine")
    for model in ("openai/clip-vit-large-patch14", "facebook/dinov2-small", "alexnet-owt-7be5be79.pth"):
        assert model in message
    assert "`--features sandbox`" in message and "`--features pixel`" in message
    assert "kwarg" not in message  # eval has no term kwargs to set


@pytest.mark.filterwarnings("ignore")
def test_pretrained_feature_set_loads_local_models_and_notes_missing_inception(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import cmrp.evaluation.features as F
    from cmrp.rewards.clip import HfClipEncoder
    from cmrp.rewards.trainset import Dinov2Features
    from tests.unit import tiny_hf

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "hf" / "hub"
    tiny_hf.fake_hub_cache(hub, "openai/clip-vit-large-patch14", tiny_hf.clip_dir(tmp_path))
    tiny_hf.fake_hub_cache(hub, "facebook/dinov2-small", tiny_hf.dinov2_dir(tmp_path))
    monkeypatch.setattr("cmrp.rewards.diversity.lpips_backbone_missing", lambda net: None)
    monkeypatch.setattr(F, "load_lpips_metric", lambda net: F.LpipsMetric(torch.nn.Identity()))
    feats = load_feature_set("pretrained")
    assert isinstance(feats.clip, HfClipEncoder) and feats.clip.interpolation is None
    assert isinstance(feats.dino, Dinov2Features) and feats.inception is None
    assert feats.notes and "FID/KID not computed" in feats.notes[0] and "weights-inception" in feats.notes[0]


def test_t2i_reports_fid_and_kid_when_the_feature_set_has_an_inception_net():
    from types import SimpleNamespace

    from cmrp.data.tasks import ImagePrompt
    from cmrp.evaluation.features import FeatureSet
    from cmrp.evaluation.runner import EvalOptions, ModelEval, _t2i
    from cmrp.rewards.diversity import pixel_distance
    from cmrp.rewards.trainset import pixel_features

    class Sampler:
        def sample_images(self, contexts, spec, *, n, seed):
            return SimpleNamespace(images=_images(len(contexts) * n, seed=seed + 7))

    character = SimpleNamespace(train=SimpleNamespace(images={}), test=SimpleNamespace(images={}),
                                profile=SimpleNamespace(fields={}))
    prompts = [ImagePrompt(Example("t2i", [Segment("text", "user", f"draw {i}")]), f"a red thing {i}") for i in range(3)]
    refs = _images(5, seed=9)
    numbers = {}
    for inception in (None, PooledFeatures()):
        result = ModelEval()
        feats = FeatureSet("pixel", ColourWordClip(), pixel_features, pixel_distance, inception)
        _t2i(Sampler(), character, prompts, feats, refs, EvalOptions(samples=2, batch_size=8), result)
        numbers[inception is None] = result.numbers["t2i"]
    assert "fid" not in numbers[True]
    got = numbers[False]
    assert (got["fid_real_images"], got["fid_generated_images"]) == (5, 6)
    assert got["fid"] == pytest.approx(_frechet(PooledFeatures()(refs), PooledFeatures()(_images(6, seed=7))), rel=1e-3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_inception_loads_from_the_torch_hub_cache_only(tmp_path, monkeypatch):
    """FID's InceptionV3 is read from $TORCH_HOME/hub/checkpoints (a random-weights file of the right layout
    here) and never downloaded; without the file FID/KID are skipped with the fix."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    import socket

    from cmrp.evaluation.features import INCEPTION_URL, inception_missing, load_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    assert INCEPTION_URL.rsplit("/", 1)[-1] in inception_missing().fix
    with monkeypatch.context() as patch:  # build the network without its weights, to write a file of its layout
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        layout = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(layout.state_dict(), checkpoints / INCEPTION_URL.rsplit("/", 1)[-1])
    assert inception_missing() is None
    net = load_inception()
    images = _images(4, seed=11)
    features = net(images)
    assert features.shape == (4, 2048)
    out = M.fid_kid(net, images, torch.flip(images, dims=[0]))
    assert out["fid"] == pytest.approx(0.0, abs=1e-3)  # the same four images in another order
