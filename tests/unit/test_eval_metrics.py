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
