"""Pretrained models behind the reward terms: `Composite.check()` lists every missing one at once without
loading anything or touching the network, loaders read local files only when offline, and the loaders of
the UniCharacter models (transformers CLIP, BLIP-VQA, DINOv2) work on tiny random models saved locally."""

from __future__ import annotations

import socket

import pytest
import torch

from cmrp.config import load_reward_preset
from cmrp.errors import WeightsError
from cmrp.rewards import (
    ClipSimilarity,
    LpipsDiversity,
    RewardContext,
    TrainsetPenalty,
    VqaConsistency,
    VQAQuestion,
    build_reward,
)
from cmrp.rewards.pretrained import TORCHVISION_WEIGHTS, hf_model_missing, torch_checkpoints_dir
from tests.unit import tiny_hf

UNICHARACTER_MODELS = ("Salesforce/blip-vqa-base", "openai/clip-vit-large-patch14", "alexnet-owt-7be5be79.pth",
                       "facebook/dinov2-base")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch caches, offline, and any socket connection fails the test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"a socket was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    return tmp_path


@pytest.mark.parametrize("preset", ["unicharacter", "unicharacter_release"])
def test_building_the_paper_reward_without_weights_lists_every_missing_model(empty_caches, preset):
    with pytest.raises(WeightsError) as err:
        build_reward(load_reward_preset(preset))
    message = str(err.value)
    assert message.startswith(f"reward preset {preset!r}: 4 pretrained models not on this machine")
    for model in UNICHARACTER_MODELS:
        assert model in message
    for fix in ("`hf download Salesforce/blip-vqa-base`", "`hf download openai/clip-vit-large-patch14`",
                "`hf download facebook/dinov2-base`", f"into {empty_caches / 'torch' / 'hub' / 'checkpoints'}/"):
        assert fix in message
    assert str(empty_caches / "hf" / "hub") in message


FRESH_BUILD = """
import socket, sys, time
def no_network(*args, **kwargs):
    raise AssertionError("a socket was opened")
socket.socket.connect = socket.socket.connect_ex = no_network
start = time.perf_counter()
from cmrp.config import load_reward_preset
from cmrp.errors import WeightsError
from cmrp.rewards import build_reward
try:
    build_reward(load_reward_preset("unicharacter"))
except WeightsError as err:
    print("listed", str(err).count("  - "))
print("seconds", round(time.perf_counter() - start, 3))
print("loaded", ",".join(m for m in ("transformers", "open_clip", "lpips", "torchvision", "torchmetrics") if m in sys.modules))
"""


def test_the_check_loads_no_model_library_in_a_fresh_process(tmp_path):
    """Why failing is fast: the check reads file names only — no model library is even imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", FRESH_BUILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in proc.stdout.splitlines())
    assert lines["listed"] == "4" and lines["loaded"] == ""  # `seconds`: printed for the curious, not asserted


def test_check_passes_once_the_files_are_in_the_caches(empty_caches):
    hub = empty_caches / "hf" / "hub"
    for repo in ("Salesforce/blip-vqa-base", "openai/clip-vit-large-patch14"):
        tiny_hf.fake_hub_cache(hub, repo, files=("config.json", "model.safetensors", "preprocessor_config.json"))
    tiny_hf.fake_hub_cache(hub, "facebook/dinov2-base", files=("config.json", "model.safetensors"))
    reward = build_reward(load_reward_preset("unicharacter"), check=False)
    assert [m.who for m in reward.missing_weights()] == ["lpips_diversity"]
    checkpoints = torch_checkpoints_dir()
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    reward.check()  # nothing missing; nothing was loaded
    assert reward.terms["clip_similarity"][1].encoder is None


def test_a_partial_download_still_counts_as_missing(empty_caches):
    hub = empty_caches / "hf" / "hub"
    tiny_hf.fake_hub_cache(hub, "openai/clip-vit-large-patch14", files=("config.json", "model.safetensors"))
    assert hf_model_missing("openai/clip-vit-large-patch14", processor=True)  # no preprocessor config
    assert not hf_model_missing("openai/clip-vit-large-patch14")
    assert hf_model_missing(str(empty_caches / "nowhere"))
    assert hf_model_missing("not a valid/hub/id")


def test_injected_nets_and_weight_free_options_need_nothing(empty_caches):
    reward = build_reward(
        load_reward_preset("unicharacter"),
        term_kwargs={"vqa_consistency": {"answerer": lambda i, q, o: ["yes"] * len(q)},
                     "clip_similarity": {"encoder": object()},
                     "lpips_diversity": {"net": "pixel"},
                     "trainset_penalty": {"model": "pixel"}},
    )
    assert reward.missing_weights() == []
    for name in ("sandbox", "brightness"):
        build_reward(load_reward_preset(name))


def test_lpips_backbone_is_never_downloaded_offline(empty_caches):
    pytest.importorskip("lpips")
    from cmrp.rewards.diversity import load_lpips

    term = LpipsDiversity(net="alex")
    with pytest.raises(WeightsError, match="offline: download https://download.pytorch.org/models/alexnet-owt"):
        term(torch.rand(2, 3, 16, 16), ["a", "a"], group_ids=torch.tensor([0, 0]), context=RewardContext())
    with pytest.raises(WeightsError, match="not in the torch hub cache"):
        load_lpips("squeeze")


def test_hub_models_are_read_from_local_files_only_offline(empty_caches):
    pytest.importorskip("transformers")
    term = TrainsetPenalty(model="dinov2-base")
    with pytest.raises(WeightsError, match="facebook/dinov2-base.*`hf download facebook/dinov2-base`"):
        term(torch.rand(1, 3, 28, 28), ["a"], group_ids=torch.tensor([0]),
             context=RewardContext(reference_images=torch.rand(1, 3, 28, 28)))
    with pytest.raises(WeightsError, match="BLIP VQA model 'Salesforce/blip-vqa-base'"):
        VqaConsistency(model="Salesforce/blip-vqa-base")(
            torch.rand(1, 3, 8, 8), ["a"], group_ids=torch.tensor([0]),
            context=RewardContext(questions=[[VQAQuestion("Is it red?", "yes")]]))


def test_torchvision_weight_urls_match_torchvision():
    models = pytest.importorskip("torchvision.models")
    enums = {"alex": models.AlexNet_Weights, "vgg": models.VGG16_Weights, "squeeze": models.SqueezeNet1_1_Weights}
    for net, enum in enums.items():
        assert TORCHVISION_WEIGHTS[net] == enum.IMAGENET1K_V1.url


# --- the UniCharacter models' loaders on tiny local models --------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_transformers_clip_scores_logits_over_30_like_the_release(tmp_path):
    pytest.importorskip("transformers")
    folder = tiny_hf.clip_dir(tmp_path)
    term = ClipSimilarity(library="transformers", model=str(folder), interpolation="bilinear", scale=100 / 30)
    assert term.missing_weights() == []
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "blue sky"]
    out = term(images, prompts, group_ids=torch.tensor([0, 1]), context=RewardContext())

    # the release's computation: CLIPModel(...).logits_per_image.diagonal() / 30 on tensor-resized pixels
    from transformers import CLIPModel, CLIPProcessor

    from cmrp.rewards._ops import fit_square, normalise

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    model.logit_scale.data.fill_(torch.log(torch.tensor(100.0)))  # OpenAI CLIP's logit scale
    texts = processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
    pixels = normalise(fit_square(images, 32, "shortest", "bilinear", crop=32), processor.image_processor.image_mean,
                       processor.image_processor.image_std)
    with torch.no_grad():
        logits = model(pixel_values=pixels, **texts).logits_per_image.diagonal() / 30
    assert out.scores.tolist() == pytest.approx(logits.tolist(), abs=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_blip_vqa_answerer_loads_locally_and_answers_each_question_about_its_image(tmp_path):
    pytest.importorskip("transformers")
    folder = tiny_hf.blip_dir(tmp_path)
    term = VqaConsistency(model=str(folder), max_length=6)
    assert term.missing_weights() == []
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    questions = [[VQAQuestion("what colour is it ?", "red"), VQAQuestion("is it red ?", "yes")],
                 [VQAQuestion("is it red ?", "no")]]
    out = term(images, ["a", "b"], group_ids=torch.tensor([0, 1]), context=RewardContext(questions=questions))
    answers = out.info["answers"]
    assert [len(a) for a in answers] == [2, 1] and all(isinstance(a, str) for row in answers for a in row)

    # the same answers, one question at a time, as the release asks them
    answerer = term.answerer
    for b, row in enumerate(questions):
        for k, q in enumerate(row):
            assert answerer.answer(images[b:b + 1], [q.question], [None]) == [answers[b][k]]
    exact = VqaConsistency(answerer=answerer, exact_match=True)
    scored = exact(images, ["a", "b"], group_ids=torch.tensor([0, 1]), context=RewardContext(questions=questions))
    expected = [sum(a == q.answer for a, q in zip(answers[b], questions[b], strict=True)) / len(questions[b])
                for b in range(2)]
    assert scored.scores.tolist() == pytest.approx(expected)


def test_vqa_fallback_question_and_exact_match():
    asked = []

    def answerer(images, questions, options):
        asked.extend(questions)
        return ["Yes" if "cat" in q else "yes." for q in questions]

    term = VqaConsistency(answerer=answerer, exact_match=True,
                          fallback_question="Does this image accurately depict: {prompt}?")
    context = RewardContext(questions=[[], [VQAQuestion("Is it grey?", "yes")]])
    out = term(torch.rand(2, 3, 8, 8), ["a cat", "a dog"], group_ids=torch.tensor([0, 1]), context=context)
    assert asked == ["Does this image accurately depict: a cat?", "Is it grey?"]
    assert out.scores.tolist() == [1.0, 0.0]  # "Yes" == "yes" after lower-casing; "yes." is not exact
    with pytest.raises(Exception, match="must contain \\{prompt\\}"):
        VqaConsistency(fallback_question="Is it right?")


def test_dinov2_preprocessing_resizes_to_256_then_crops_224_like_its_processor():
    from cmrp.rewards.trainset import Dinov2Features

    class Record(torch.nn.Module):
        def forward(self, pixel_values):
            self.shape = tuple(pixel_values.shape)
            return type("Out", (), {"last_hidden_state": pixel_values.flatten(2).transpose(1, 2)})()

    net = Record()
    Dinov2Features(net)(torch.rand(1, 3, 300, 400))
    assert net.shape == (1, 3, 224, 224)
    assert Dinov2Features(net, image_size=28).resize_size == 32


def test_lpips_group_assignment_gives_every_member_the_group_mean():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.3, 1.0, 0.5, 0.5)])
    ids = torch.tensor([0, 0, 0, 1, 1])
    per_sample = LpipsDiversity(net="pixel")(images, [""] * 5, group_ids=ids, context=RewardContext())
    grouped = LpipsDiversity(net="pixel", assign="group")(images, [""] * 5, group_ids=ids, context=RewardContext())
    pair_mean = (0.3 + 1.0 + 0.7) / 3
    assert grouped.scores.tolist() == pytest.approx([pair_mean] * 3 + [0.0, 0.0], abs=1e-6)
    assert per_sample.scores[:3].mean().item() == pytest.approx(pair_mean, abs=1e-6)
    assert per_sample.scores[0].item() != pytest.approx(per_sample.scores[1].item())


def test_the_paper_presets_use_the_release_models_and_cite_their_source():
    from cmrp import resources

    paper, release = load_reward_preset("unicharacter")["terms"], load_reward_preset("unicharacter_release")["terms"]
    assert {n: t["weight"] for n, t in paper.items()} == {
        "vqa_consistency": 0.3, "clip_similarity": 0.45, "lpips_diversity": 0.1, "trainset_penalty": 0.15}
    assert {n: t["weight"] for n, t in release.items()} == {
        "vqa_consistency": 0.3, "clip_similarity": 0.2, "lpips_diversity": 0.2, "trainset_penalty": 0.1}
    for terms, tau_low in ((paper, 0.5), (release, 0.3)):
        assert terms["vqa_consistency"]["kwargs"]["model"] == "Salesforce/blip-vqa-base"
        assert terms["clip_similarity"]["kwargs"]["model"] == "openai/clip-vit-large-patch14"
        assert terms["clip_similarity"]["kwargs"]["scale"] == pytest.approx(100 / 30)
        assert terms["lpips_diversity"]["kwargs"] == {"net": "alex", "assign": "group"}
        penalty = terms["trainset_penalty"]["kwargs"]
        assert (penalty["model"], penalty["tau_low"], penalty["tau_high"], penalty["penalty_scale"]) == (
            "facebook/dinov2-base", tau_low, 0.9, 2.0)
    assert release["vqa_consistency"]["kwargs"]["exact_match"] is True
    for name in ("unicharacter", "unicharacter_release"):
        text = (resources.asset_dir("rewards") / f"{name}.yaml").read_text()
        assert "Tangc03/UniCharacter @ bb50c54" in text and "config/grpo.py:179-186" in text


def test_cmrp_validate_lists_missing_reward_weights_without_failing(empty_caches, capsys):
    from cmrp.cli import main

    assert main(["validate", "recipes/bagel/sft_grpo.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: ") and "note: `cmrp fit` would stop on this machine: reward preset 'unicharacter': " \
        "4 pretrained models" in out
    assert "`hf download facebook/dinov2-base`" in out
    assert main(["validate", "quickstart"]) == 0
    assert "note:" not in capsys.readouterr().out  # the sandbox reward needs no downloads
