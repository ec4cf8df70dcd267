"""The Janus adapter: sequence layout, the official checkpoint layout round trip, clear weight errors,
classifier-free guidance and decoding strategies on the tiny card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.backbones.janus import JanusAdapter
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["hello there, I am a tiny test creature", "what colour is it? it is red", "draw me on the beach"] * 5


def card(**arch):
    c = OmegaConf.to_container(OmegaConf.load(ROOT / "backbones" / "janus-tiny.yaml"))
    c["architecture"].update(arch)
    return c


@pytest.fixture()
def adapter() -> JanusAdapter:
    torch.manual_seed(0)
    return JanusAdapter.build(card(), corpus=CORPUS)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    from PIL import Image

    p = tmp_path_factory.mktemp("janus") / "red.png"
    img = Image.new("RGB", (40, 40), (220, 20, 20))
    img.paste((255, 255, 255), (5, 5, 20, 20))
    img.save(p)
    return p


def t(role, body, train=False):
    return Segment("text", role, body, train=train)


def examples(path):
    return [
        Example("chat", [t("system", "You are Rex."), t("user", "hello"), t("character", "hi there", True)]),
        Example("vqa", [Segment("image", image=path), t("user", "what colour is it?"), t("character", "red", True)]),
        Example("t2i", [t("user", "draw me on the beach"), Segment("image", "character", image=path, generate=True,
                                                                   train=True)]),
    ]


def test_sequence_layout_labels_and_image_slots(adapter, image_path):
    tok = adapter.tokenizer
    batch = adapter.collate(examples(image_path))
    chat = batch.labels[0][batch.labels[0] != -100].tolist()
    assert chat == tok.encode(" hi there") + [tok.eos_id]  # the reply and its end, nothing else
    assert tok.decode(batch.input_ids[0][batch.attention_mask[0]].tolist()) == \
        "You are Rex.\n\n<|User|>: hello\n\n<|Assistant|>: hi there"
    # understood image: <boi>, 16 placeholders (replaced by ViT features), <eoi>
    ids = batch.input_ids[1]
    assert int(batch.und_mask[1].sum()) == adapter.und_tokens == 16
    assert (ids[batch.und_mask[1]] == tok.image_id).all()
    first = int(batch.und_mask[1].nonzero()[0])
    assert ids[first - 1] == tok.boi_id and ids[first + 16] == tok.eoi_id
    # generated image: no text loss, 16 VQ-code slots predicted from <boi> and the first 15 codes
    assert (batch.labels[2] != -100).sum() == 0
    assert int(batch.gen_mask[2].sum()) == int(batch.gen_pred_mask[2].sum()) == adapter.gen_tokens == 16
    slots = batch.gen_mask[2].nonzero()[:, 0]
    assert batch.input_ids[2, slots[0] - 1] == tok.boi_id and batch.input_ids[2, slots[-1] + 1] == tok.eoi_id
    assert batch.gen_pred_mask[2][slots[0] - 1]
    assert not batch.gen_pred_mask[2][slots[-1]]
    assert batch.gen_pixels.shape == (1, 3, 32, 32) and batch.und_pixels.shape == (1, 3, 32, 32)


def test_image_loss_is_ce_of_the_generation_head_on_vq_codes(adapter, image_path):
    batch = adapter.collate(examples(image_path)[2:])
    codes = adapter.encode_images(batch.gen_pixels)
    assert codes.shape == (1, 16) and int(codes.max()) < 64
    with torch.no_grad():
        loss = adapter.losses(batch)["image"]
        embeds = adapter._embed(batch.input_ids, batch.und_mask, None, batch.gen_mask, codes)  # noqa: SLF001
        hidden, _ = adapter._lm(embeds, batch.attention_mask)  # noqa: SLF001
        logits = adapter.janus.model.generation_head(hidden[0, batch.gen_pred_mask[0]])
    expected = torch.nn.functional.cross_entropy(logits, codes[0])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # the VQ-VAE is frozen: no gradient reaches it
    adapter.losses(batch)["image"].backward()
    assert all(p.grad is None for p in adapter.janus.model.vqmodel.parameters())
    assert adapter.janus.model.generation_head.vision_head.weight.grad is not None


def test_round_trip_in_the_official_layout_is_bit_identical(adapter, image_path, tmp_path):
    from transformers import JanusForConditionalGeneration

    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init: the weights must really be loaded
    adapter.model.eval()
    out = adapter.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "cmrp.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.loads((out / "config.json").read_text())["model_type"] == "janus"
    loaded = JanusAdapter.from_pretrained(out)
    loaded.model.eval()
    a, b = adapter.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = adapter.collate(examples(image_path))
    with torch.no_grad():
        la, lb = adapter.losses(batch), loaded.losses(batch)
    assert torch.equal(la["text"], lb["text"]) and torch.equal(la["image"], lb["image"])
    ctx = [Example("t2i", [t("user", "draw me on the beach")])]
    ra = adapter.sample_images(ctx, SamplerSpec(steps=4, window=(0, 2)), n=2, seed=5)
    rb = loaded.sample_images(ctx, SamplerSpec(steps=4, window=(0, 2)), n=2, seed=5)
    assert torch.equal(ra.images, rb.images) and torch.equal(ra.logprobs, rb.logprobs)
    assert loaded.tokenizer.encode("hello there") == adapter.tokenizer.encode("hello there")
    assert loaded.sampling == adapter.sampling
    # plain transformers reads the same folder: it is the official layout, not ours
    plain = JanusForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(plain.lm_head.weight, adapter.model.lm_head.weight)
    # without our extras file (a hub download) the defaults apply
    (out / "cmrp.json").unlink()
    assert JanusAdapter.from_pretrained(out).sampling["cfg_scale"] == 5.0


def test_missing_weights_are_reported_by_name(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    out = adapter.save_pretrained(tmp_path / "ckpt")
    state = load_file(str(out / "model.safetensors"))
    del state["model.generation_head.vision_head.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"missing keys: model\.generation_head\.vision_head\.weight"):
        JanusAdapter.from_pretrained(out)
    with pytest.raises(WeightsError, match="not a Janus checkpoint folder"):
        JanusAdapter.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="hf download"):  # tests are offline: a hub id not in the cache
        JanusAdapter.from_pretrained("deepseek-community/Janus-Pro-1B-not-cached")


def test_bad_architecture_fails_with_the_card_name():
    bad = card()
    bad["architecture"]["vq_config"]["channel_multiplier"] = [1, 1, 2]  # 32 px / 4 = 8x8, not the 4x4 grid
    with pytest.raises(ConfigError, match="janus-tiny.*channel_multiplier"):
        JanusAdapter.build(bad, corpus=CORPUS)
    small = card()
    small["architecture"]["text_config"]["vocab_size"] = 100
    with pytest.raises(ConfigError, match="vocab_size"):
        JanusAdapter.build(small, corpus=CORPUS)


def test_cfg_uses_janus_unconditional_prompt_and_is_the_sampled_policy(adapter):
    adapter.model.eval()
    ctx = [Example("t2i", [t("system", "You are Rex."), t("user", "draw me on the beach")]),
           Example("t2i", [t("user", "hi")])]
    tok = adapter.tokenizer
    prefix = adapter._prefix(ctx, "generate", True)  # noqa: SLF001 - checking the unconditional branch
    cond, uncond = prefix.ids[:2], prefix.ids[2:]
    assert (cond[:, -1] == tok.boi_id).all() and torch.equal(prefix.mask[:2], prefix.mask[2:])
    assert set(uncond[prefix.mask[2:]].tolist()) <= {tok.bos_id, tok.boi_id, tok.pad_id}
    plain = adapter.sample_images(ctx, SamplerSpec(steps=4, guidance=Guidance(text_scale=1.0)), n=2, seed=1)
    guided = adapter.sample_images(ctx, SamplerSpec(steps=4, window=(0, 4), guidance=Guidance(text_scale=4.0)),
                                   n=2, seed=1)
    assert not torch.equal(plain.trajectory.tokens, guided.trajectory.tokens)
    # each stored step's log-prob is the mean token log-prob under the guided distribution
    with torch.no_grad():
        logp, token_logp, positions = adapter.rollout_logprob(guided, 2, return_mean=True)
    assert positions.sum(1).tolist() == [4] * 4 and positions[:, 8:12].all()
    assert torch.allclose(logp, guided.logprobs[:, 2], atol=1e-5)
    assert torch.allclose(token_logp.sum(1) / 4, logp, atol=1e-6)
    with pytest.raises(ValueError, match="same_noise"):
        adapter.sample_images(ctx, SamplerSpec(steps=4, same_noise=True), n=2)
    with pytest.raises(ValueError, match="steps"):
        adapter.sample_images(ctx, SamplerSpec(steps=17), n=1)


def test_decoding_strategies_train_and_sample(adapter, tmp_path):
    from cmrp.data.tasks import build_examples, image_prompts
    from cmrp.sandbox import make_character

    character = make_character(3, n_reference_images=2, n_scenes=6, out_dir=tmp_path)
    chain, joint = (image_prompts(character, decoding=d)[0] for d in ("chain", "joint"))
    # chain: the image also sees the character's reply text; joint: only the query
    assert len(chain.context.segments) == len(joint.context.segments) + 1
    adapter.model.eval()
    for decoding in ("chain", "joint"):
        t2i = build_examples(character, ["t2i"], decoding=decoding)["t2i"][:2]
        with torch.no_grad():
            loss = adapter.losses(adapter.collate(t2i))["image"]
        assert torch.isfinite(loss) and float(loss) > 0
        prompts = image_prompts(character, decoding=decoding)[:2]
        rollout = adapter.sample_images([p.context for p in prompts], SamplerSpec(steps=2), n=2, seed=0)
        assert rollout.images.shape == (4, 3, 32, 32)
    seq_chain = adapter._render(Example("t2i", chain.context.segments))  # noqa: SLF001
    seq_joint = adapter._render(Example("t2i", joint.context.segments))  # noqa: SLF001
    assert len(seq_chain.ids) > len(seq_joint.ids)


def test_answer_and_text_generation(adapter):
    adapter.model.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    answers = adapter.answer(images, ["what colour is it?", "is it red?", "what?"], [None, ["yes", "no"], ["a", "b"]])
    assert answers[1] in ("yes", "no") and answers[2] in ("a", "b") and isinstance(answers[0], str)
    # MCQ by likelihood: the chosen option has the highest score
    from cmrp.data.character import MultipleChoice
    from cmrp.data.tasks import mcq_option_examples

    options = mcq_option_examples([Segment("image", "user", pixels=images[1])], MultipleChoice("is it red?",
                                                                                               ["yes", "no"], 0), "vqa")
    scores = adapter.score_text(options)
    assert answers[1] == ["yes", "no"][int(scores.argmax())]
    ctx = [Example("chat", [t("user", "hello")])]
    assert adapter.generate_text(ctx, max_new_tokens=4) == adapter.generate_text(ctx, max_new_tokens=4)


def test_lora_targets_and_groups_select_janus_modules(adapter):
    import re

    names = [n for n, _ in adapter.model.named_modules()]
    for kind, must in (("generation", "model.generation_head.vision_head"),
                       ("understanding", "model.aligner.fc1"),
                       ("default", "model.language_model.layers.0.self_attn.q_proj")):
        pattern = re.compile("|".join(adapter.lora_targets(kind)))
        chosen = [n for n in names if pattern.fullmatch(n)]
        assert must in chosen and not any("vqmodel" in n for n in chosen), (kind, chosen)
    with pytest.raises(ConfigError, match="unknown LoRA target set"):
        adapter.lora_targets("nope")
    groups = {k: re.compile("|".join(v)) for k, v in adapter.trainable_groups().items()}
    params = [n for n, _ in adapter.model.named_parameters()]
    gen = [n for n in params if groups["generation"].fullmatch(n)]
    assert gen and all(n.startswith("model.generation_") for n in gen)
    assert groups["understanding"].fullmatch("model.vision_model.post_layernorm.weight")
    assert not any(groups["generation"].fullmatch(n) for n in params if "language_model" in n)


def test_qlora_without_bitsandbytes_fails_early_and_clearly(adapter, monkeypatch):
    import sys

    from cmrp.training.peft import apply_finetune

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it

    with pytest.raises(ConfigError, match="qlora"):
        apply_finetune(adapter, OmegaConf.create({"mode": "qlora", "r": 4, "alpha": 8, "dropout": 0.0,
                                                  "targets": "default"}))


def test_step_kl_k3_for_token_rollouts_and_gaussian_for_flow():
    from cmrp.sampling.flow import FlowTrajectory
    from cmrp.sampling.rollout import Rollout, TokenTrajectory

    positions = torch.tensor([[True, True, False], [False, True, True]])
    traj = TokenTrajectory(torch.zeros(2, 3, dtype=torch.long), positions[:, None], torch.zeros(2, 1))
    rollout = Rollout(torch.zeros(2, 3, 4, 4), torch.tensor([0, 0]), traj)
    assert rollout.num_steps == 1 and rollout.logprobs.shape == (2, 1)
    cur = torch.tensor([[-1.0, -2.0, 0.0], [0.0, -0.5, -0.1]])
    ref = torch.tensor([[-1.5, -1.0, 9.0], [9.0, -0.5, -0.6]])  # off-step positions must not count
    kl = rollout.step_kl((None, cur, positions), (None, ref, positions))
    r = torch.tensor([[-0.5, 1.0], [0.0, -0.5]])
    expected = (torch.exp(r) - r - 1).mean(1)
    assert torch.allclose(kl, expected) and (kl >= 0).all()
    flow = Rollout(torch.zeros(2, 3, 4, 4), torch.tensor([0, 0]),
                   FlowTrajectory(torch.zeros(2, 2), torch.zeros(2, 1, 2), torch.zeros(2, 1, 2),
                                  torch.zeros(1, 2), torch.zeros(2, 1)))
    mean, ref_mean, std = torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [2.0, 2.0]]), torch.tensor([1.0, 2.0])
    got = flow.step_kl((None, mean, std), (None, ref_mean, std))
    assert torch.allclose(got, torch.tensor([0.25, 0.5]))


def test_think_and_sample_draws_the_image_after_the_thinking(adapter):
    adapter.model.eval()
    ctx = [Example("t2i", [t("user", "draw me on the beach")])]
    texts, rollout = adapter.think_and_sample(ctx, SamplerSpec(steps=4), max_think_tokens=5, n=2, seed=2)
    assert len(texts) == 1 and rollout.images.shape == (2, 3, 32, 32)
    given = [Example("t2i", [*ctx[0].segments, t("character", texts[0])])]
    assert torch.equal(adapter.sample_images(given, SamplerSpec(steps=4), n=2, seed=2).images, rollout.images)
