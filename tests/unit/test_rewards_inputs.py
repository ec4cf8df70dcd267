"""The reward boundary: every bad input is one clear one-line error; a missing optional input makes a term
abstain (NaN) and say why once in its info."""

from __future__ import annotations

import math

import pytest
import torch

from cmrp.cli import main
from cmrp.errors import CmrpError
from cmrp.rewards import (
    Brightness,
    ClipSimilarity,
    Composite,
    LpipsDiversity,
    RewardContext,
    RewardInputError,
    TrainsetPenalty,
    VqaConsistency,
    VQAQuestion,
    check_inputs,
)


class MeanColour:
    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, texts):
        return torch.ones(len(texts), 3)


def every_term() -> dict:
    return {
        "brightness": Brightness(),
        "clip_similarity": ClipSimilarity(encoder=MeanColour()),
        "lpips_diversity": LpipsDiversity(net="pixel"),
        "trainset_penalty": TrainsetPenalty(model="pixel"),
        "vqa_consistency": VqaConsistency(answerer=lambda images, questions, options: ["yes"] * len(questions)),
    }


def callers():
    """Each term alone and all of them in a Composite: the same validation everywhere."""
    terms = every_term()
    return [*terms.items(), ("reward", Composite({name: (1.0, term) for name, term in terms.items()}))]


IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([0, 0, 1, 1])
PROMPTS = ["a", "a", "b", "b"]

BAD = {
    "0-255 floats": (IMAGES * 255, PROMPTS, IDS, "float images must be in \\[0, 1\\].*0-255 pixel values: divide by 255"),
    "[-1, 1] floats": (IMAGES * 2 - 1, PROMPTS, IDS, "\\[-1, 1\\] values: map them with \\(x \\+ 1\\) / 2"),
    "NaN image": (torch.where(torch.arange(4).view(4, 1, 1, 1) == 2, torch.nan, IMAGES), PROMPTS, IDS,
                  "1 of 4 images contain NaN or inf values \\(batch indices \\[2\\]\\)"),
    "channels last": (IMAGES.permute(0, 2, 3, 1).contiguous(), PROMPTS, IDS, "channels last: permute\\(0, 3, 1, 2\\)"),
    "int images": (IMAGES.long(), PROMPTS, IDS, "got dtype torch.int64"),
    "too few prompts": (IMAGES, PROMPTS[:3], IDS, "3 prompts for 4 images"),
    "one string": (IMAGES, "a", IDS, "prompts must be a list of 4 strings"),
    "short group ids": (IMAGES, PROMPTS, IDS[:3], "group_ids must have shape \\(4,\\), one id per image, got \\(3,\\)"),
    "fractional group ids": (IMAGES, PROMPTS, IDS.float() + 0.5, "group_ids must be integers, got torch.float32 values"),
    "NaN group ids": (IMAGES, PROMPTS, torch.tensor([0.0, 0.0, 1.0, math.nan]), "group_ids must be integers"),
    "2-d group ids": (IMAGES, PROMPTS, IDS.view(2, 2), "group_ids must have shape \\(4,\\)"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("name, reward", callers(), ids=[name for name, _ in callers()])
def test_bad_inputs_are_one_line_errors_naming_the_fix(case, name, reward):
    images, prompts, ids, pattern = BAD[case]
    with pytest.raises(RewardInputError, match=pattern) as err:
        reward(images, prompts, group_ids=ids, context=RewardContext())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: ")
    assert isinstance(err.value, CmrpError) and isinstance(err.value, ValueError)


def test_uint8_images_and_list_group_ids_are_accepted_and_converted():
    uint8 = (IMAGES * 255).round().to(torch.uint8)
    images, prompts, ids = check_inputs("reward", uint8, tuple(PROMPTS), [0, 0, 1, 1])
    assert images.dtype == torch.float32 and torch.allclose(images, IMAGES, atol=0.5 / 255 + 1e-6)
    assert prompts == PROMPTS and ids.dtype == torch.long
    assert check_inputs("reward", IMAGES, PROMPTS, torch.zeros(4))[2].tolist() == [0, 0, 0, 0]  # whole floats
    reward = Composite({"brightness": (1.0, Brightness())})
    assert torch.allclose(reward(uint8, PROMPTS, group_ids=IDS).scores, Brightness()(IMAGES, PROMPTS, group_ids=IDS).scores,
                          atol=1e-2)
    nearly = check_inputs("reward", IMAGES * 1.0005 - 0.0002, PROMPTS, IDS)[0]  # numeric noise is clamped
    assert nearly.min() >= 0 and nearly.max() <= 1


def test_bad_reference_images_name_the_context_field():
    reward = Composite({"trainset_penalty": (1.0, TrainsetPenalty(model="pixel"))})
    with pytest.raises(RewardInputError, match="^RewardContext.reference_images: .*0-255"):
        reward(IMAGES, PROMPTS, group_ids=IDS, context=RewardContext(reference_images=IMAGES * 255))


def test_missing_optional_inputs_make_terms_abstain_and_say_so_once():
    terms = every_term()
    reward = Composite({name: (1.0, terms[name]) for name in ("vqa_consistency", "trainset_penalty", "brightness")})
    out = reward(IMAGES, PROMPTS, group_ids=IDS, context=RewardContext())
    for name, why in (("vqa_consistency", "no VQA questions"), ("trainset_penalty", "no reference images")):
        entry = out.info[name]
        assert torch.isnan(entry["scores"]).all() and math.isnan(entry["mean"])
        assert why in entry["info"]["abstained"] and entry["info"]["n_abstained"] == 4
    assert torch.allclose(out.scores, out.info["brightness"]["scores"])  # abstaining terms add nothing

    questions = [[VQAQuestion("Is it red?", "yes")], [], [], []]
    part = terms["vqa_consistency"](IMAGES, PROMPTS, group_ids=IDS, context=RewardContext(questions=questions))
    assert part.scores[0] == 1.0 and torch.isnan(part.scores[1:]).all()
    assert part.info["abstained"] == "3 of 4 samples have no VQA questions in RewardContext.questions"
    alone = terms["lpips_diversity"](IMAGES[:3], PROMPTS[:3], group_ids=torch.tensor([0, 0, 1]), context=RewardContext())
    assert math.isnan(alone.scores[2]) and alone.info["n_abstained"] == 1

    clip = ClipSimilarity(encoder=MeanColour(), reference_weight=0.5)
    out = clip(IMAGES, PROMPTS, group_ids=IDS, context=RewardContext())
    assert torch.isfinite(out.scores).all() and "scored on the prompt alone" in out.info["missing"]


def test_the_cli_prints_a_reward_input_error_as_one_line(monkeypatch, capsys):
    """A RewardInputError is a CmrpError: the CLI turns it into one line and exit status 2."""
    import cmrp.config.commands as commands

    def boom(args):
        Brightness()(IMAGES * 255, PROMPTS, group_ids=IDS)

    monkeypatch.setattr(commands, "_validate", boom)
    assert main(["validate", "quickstart"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0-255 pixel values" in err
