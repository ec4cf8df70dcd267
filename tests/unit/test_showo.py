"""Show-o adapter: omni-attention, the cosine schedule, MaskGIT log-probs, MAGVIT-v2, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.backbones.showo import (
    MagvitConfig,
    MAGVITv2,
    ShowoAdapter,
    ShowoArch,
    ShowoVocab,
    omni_attention_mask,
)
from cmrp.backbones.showo.maskgit import choice_temperatures, commit_counts, cosine_schedule, maskgit_step
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec

CARD = Path(__file__).resolve().parents[2] / "backbones" / "showo-tiny.yaml"
CORPUS = ["the lighthouse keeper paints the sea", "a red fox runs over the hill at dawn"] * 10


@pytest.fixture(scope="module")
def adapter() -> ShowoAdapter:
    torch.manual_seed(0)
    a = ShowoAdapter.build(OmegaConf.load(CARD), corpus=CORPUS)
    a.model.eval()
    return a


def _prompt(text: str = "a red fox") -> Example:
    return Example("t2i", [Segment("text", "user", text)])


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(3)
    img = torch.rand(3, 32, 32, generator=g)
    return [
        Example("t2i", [Segment("text", "user", "paint the sea"),
                        Segment("image", "character", pixels=img, generate=True, train=True)]),
        Example("vqa", [Segment("image", "user", pixels=img), Segment("text", "user", "what is it?"),
                        Segment("text", "character", "the sea", train=True)]),
    ]


def test_official_vocabulary_layout():
    arch = ShowoArch()  # showlab/show-o: Phi-1.5 text ids, 10 new special tokens, 8192 codes, mask
    assert arch.vocab_size == 58498 and arch.num_vq_tokens == 256
    vocab = ShowoVocab(arch.llm_vocab_size, arch.codebook_size, sot=50256, eot=50256)
    assert (vocab.pad, vocab.soi, vocab.eoi, vocab.t2i, vocab.mmu) == (50295, 50296, 50297, 50300, 50301)
    assert vocab.image_offset == 50305 and vocab.mask == 58497 == arch.vocab_size - 1


def test_omni_attention_mask_semantics():
    # [t0 t1 <soi> i i <eoi> t6 pad]: text causal, the image span bidirectional, padding never seen
    kinds = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
    valid = torch.tensor([[True] * 7 + [False]])
    m = omni_attention_mask(kinds, valid)[0]
    assert m[0].tolist() == [True] + [False] * 7
    assert m[1, :2].all() and not m[1, 2:].any()  # text does not see the image ahead of it
    for q in range(2, 6):  # every image-span token sees the text before and the whole span
        assert m[q, :6].all() and not m[q, 6:].any()
    assert m[6, :7].all() and not m[6, 7]  # text after the image sees all of it, not the padding
    assert m[7].tolist() == [False] * 7 + [True]  # a padding row sees itself only
    # two images: the second span is not visible from the first
    m2 = omni_attention_mask(torch.tensor([[0, 1, 1, 0, 2, 2]]), torch.ones(1, 6, dtype=torch.bool))[0]
    assert m2[1, 2] and not m2[1, 4] and m2[4, 5] and m2[5, 4] and m2[4, :4].all()


def test_cosine_schedule_and_commit_counts():
    assert float(cosine_schedule(0.0)) == 1.0
    assert float(cosine_schedule(1 / 3)) == pytest.approx(math.sqrt(3) / 2)
    assert float(cosine_schedule(0.5)) == pytest.approx(math.sqrt(0.5))
    assert float(cosine_schedule(1.0)) == pytest.approx(0.0, abs=1e-7)
    assert cosine_schedule(0.5).dtype == torch.float32  # Show-o's arithmetic: float32
    counts = commit_counts(256, 18)
    assert sum(counts) == 256 and min(counts) >= 1
    left = 256
    for k, c in enumerate(counts[:-1]):
        left -= c
        assert left == max(1, math.floor(256 * float(cosine_schedule((k + 1) / 18))))
    # (k+1)/T = 2/3: float32 cos(π/3) is just under 1/2, so 32 of 64 tokens floor to 31 (float64 gives 32)
    masked_after = 64 - sum(commit_counts(64, 12)[:8])
    assert masked_after == 31 and math.floor(64 * math.cos(math.pi / 3)) == 32
    assert commit_counts(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        commit_counts(4, 5)


def test_choice_temperature_compounds():
    # Show-o multiplies the temperature by (1 - (k+1)/T) at every step: 1 * 3/4 * 2/4 * 1/4 * 0
    assert choice_temperatures(1.0, 4) == pytest.approx([0.75, 0.375, 0.09375, 0.0])
    assert choice_temperatures(2.0, 2) == pytest.approx([1.0, 0.0])


def test_maskgit_step_commits_the_most_confident():
    logits = torch.full((1, 4, 3), -20.0)
    logits[0, :, 0] = torch.tensor([5.0, 20.0, 20.0, 20.0])  # position 0 is the least confident
    tokens = torch.tensor([[-1, -1, -1, 7]])
    step = maskgit_step(logits, tokens, tokens < 0, 2, choice_temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert step.committed.tolist() == [[False, True, True, False]]
    assert step.tokens.tolist() == [[-1, 0, 0, 7]]
    assert float(step.logprob) == pytest.approx(0.0, abs=1e-6)


def test_magvit_tiny_encode_decode():
    vq = MAGVITv2(MagvitConfig(ch=16, encoder_ch_mult=[1, 2, 2], encoder_num_res_blocks=[1, 1, 1],
                               decoder_ch_mult=[1, 2, 2], decoder_num_res_blocks=[1, 1, 1], norm_groups=8)).eval()
    assert vq.codebook_size == 8192 and vq.quantize.embedding.shape == (8192, 13)
    names = set(vq.state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.quant_conv.bias",
                "decoder.post_quant_conv.weight", "decoder.up.2.upsample.conv.weight", "decoder.mid.block_2.conv2.weight",
                "decoder.conv_out.weight", "quantize.embedding", "quantize.power_vals"):
        assert key in names, key
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    codes = vq.encode_codes(pixels)
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 8192
    images = vq.decode_codes(codes)
    assert images.shape == (2, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    # lookup-free: a code's ±1 bit pattern quantises back to the same code
    assert torch.equal(vq.quantize.codes(vq.quantize.lookup(codes, (8, 8))), codes)
    assert torch.equal(vq.quantize.codes(vq.quantize.lookup(torch.tensor([[8191, 0, 1, 4096]]), (2, 2))),
                       torch.tensor([[8191, 0, 1, 4096]]))


def test_losses_cover_text_and_masked_image_tokens(adapter):
    batch = adapter.collate(_examples())
    assert int(batch.gen_slots.sum()) == 64 and int(batch.und_slots.sum()) == 64
    assert batch.input_ids[0, 0] == adapter.vocab.t2i and batch.input_ids[1, 0] == adapter.vocab.mmu
    torch.manual_seed(0)
    losses = adapter.losses(batch)
    # random init: both cross-entropies are near log(vocab) (9227 ids)
    for value in losses.values():
        value = value.detach()
        assert torch.isfinite(value) and abs(float(value) - math.log(adapter.arch.vocab_size)) < 1.0


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_maskgit_logprobs_recompute_exactly(adapter, cfg_scale):
    steps = 5
    spec = SamplerSpec(steps=steps, window=(1, 4), guidance=Guidance(text_scale=cfg_scale))
    rollout = adapter.sample_images([_prompt(), _prompt("the sea")], spec, n=2, seed=5)
    assert rollout.images.shape == (4, 3, 32, 32) and rollout.num_steps == 3
    traj = rollout.trajectory
    counts = commit_counts(64, steps)
    assert traj.steps.sum(-1).tolist() == [counts[1:4]] * 4  # committed per stored step follows the schedule
    assert bool((rollout.state.commit_step >= 0).all())  # every token committed by the end
    assert int(traj.tokens.min()) >= 0 and int(traj.tokens.max()) < 8192
    for k in range(3):
        recomputed = adapter.rollout_logprob(rollout, k)
        torch.testing.assert_close(recomputed.detach().cpu(), traj.logprobs[:, k], atol=1e-5, rtol=0)
    logp, token_logp, committed = adapter.rollout_logprob(rollout, 1, torch.tensor([3, 0]), return_mean=True)
    torch.testing.assert_close(logp.detach(), traj.logprobs[[3, 0], 1], atol=1e-5, rtol=0)
    assert token_logp.shape == (2, 64) and torch.equal(committed, traj.steps[[3, 0], 1])
    assert logp.requires_grad
    # same seed, same images (the window only decides what is stored)
    again = adapter.sample_images([_prompt(), _prompt("the sea")], SamplerSpec(steps=steps,
                                                                               guidance=Guidance(text_scale=cfg_scale)),
                                  n=2, seed=5)
    assert torch.equal(again.trajectory.tokens, traj.tokens) and again.num_steps == 0


def test_round_trip_in_official_layout(adapter, tmp_path):
    from safetensors.torch import load_file

    out = adapter.save_pretrained(tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "Showo" and config["vocab_size"] == adapter.arch.vocab_size
    assert config["llm_model_path"] == "llm" and (out / "llm" / "config.json").is_file()
    keys = set(load_file(str(out / "pytorch_model.safetensors")))
    assert {"showo.model.embed_tokens.weight", "showo.model.layers.3.self_attn.dense.weight",
            "showo.model.layers.0.mlp.fc1.bias", "showo.model.final_layernorm.weight", "showo.lm_head.weight"} <= keys
    assert "encoder.conv_in.weight" in load_file(str(out / "vq" / "pytorch_model.safetensors"))
    loaded = ShowoAdapter.from_pretrained(out)
    loaded.model.eval()
    batch = adapter.collate(_examples())
    torch.manual_seed(1)
    before = adapter.losses(batch)
    torch.manual_seed(1)
    after = loaded.losses(loaded.collate(_examples()))
    assert all(torch.equal(before[k], after[k]) for k in before)
    a = adapter.sample_images([_prompt()], SamplerSpec(steps=3, guidance=Guidance(text_scale=2.0)), n=2, seed=9)
    b = loaded.sample_images([_prompt()], SamplerSpec(steps=3, guidance=Guidance(text_scale=2.0)), n=2, seed=9)
    assert torch.equal(a.images, b.images) and torch.equal(a.trajectory.tokens, b.trajectory.tokens)


def test_missing_or_renamed_key_is_named(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    out = adapter.save_pretrained(tmp_path / "ckpt")
    file = out / "pytorch_model.safetensors"
    state = load_file(str(file))
    state["showo.model.layers.1.self_attn.o_proj.weight"] = state.pop("showo.model.layers.1.self_attn.dense.weight")
    save_file(state, str(file))
    with pytest.raises(WeightsError) as err:
        ShowoAdapter.from_pretrained(out)
    message = str(err.value)
    assert "missing keys: showo.model.layers.1.self_attn.dense.weight" in message
    assert "unexpected keys: showo.model.layers.1.self_attn.o_proj.weight" in message
    vq_file = out / "vq" / "pytorch_model.safetensors"
    vq_state = load_file(str(vq_file))
    del vq_state["decoder.conv_out.bias"]
    save_file(vq_state, str(vq_file))
    save_file({k: v for k, v in adapter.showo_module.state_dict().items()}, str(file))
    with pytest.raises(WeightsError, match="missing keys: decoder.conv_out.bias"):
        ShowoAdapter.from_pretrained(out)


def test_absent_checkpoint_and_tokenizer_errors(tmp_path):
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache.*`hf download nobody/not-a-showo-checkpoint`"):
        ShowoAdapter.from_pretrained("nobody/not-a-showo-checkpoint")
    with pytest.raises(WeightsError, match="not a Show-o checkpoint"):
        ShowoAdapter.from_pretrained(tmp_path)
    card = OmegaConf.load(CARD)
    card.tokenizer = str(tmp_path / "phi-1_5")
    with pytest.raises(WeightsError, match="tokenizer.json"):
        ShowoAdapter.build(card, corpus=CORPUS)


def test_answer_and_generate_text(adapter):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = adapter.answer(images, ["which?"], [["sea", "fox", "hill"]])
    assert out[0] in ("sea", "fox", "hill")
    scores = adapter.score_text(_examples()[1:])
    assert scores.shape == (1,) and float(scores) < 0
    text = adapter.generate_text([_examples()[1]], max_new_tokens=3)
    assert len(text) == 1 and isinstance(text[0], str)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_shared_prompt_cache_gives_the_full_sequence_logits(adapter, cfg_scale):
    # sampling encodes each prompt once and runs the image block on its keys/values; GRPO recomputes on
    # the full left-padded sequences: both must give the same guided logits
    contexts = [_prompt("a fox"), _prompt("a red fox runs over the hill at dawn")]
    codes = torch.full((4, 64), -1)
    codes[:, ::3] = torch.arange(4)[:, None] * 100
    with torch.no_grad():
        prompt = adapter._encode_prompts(contexts, cfg_scale != 1.0)
        cached = adapter._cached_image_logits(prompt, torch.tensor([0, 0, 1, 1]), codes,
                                              2 if cfg_scale != 1.0 else None, cfg_scale)
        full = adapter._image_logits(adapter._prompt_rows(contexts, 2, cfg_scale != 1.0), torch.arange(4), codes, 4,
                                     cfg_scale)
    assert cached.shape == (4, 64, 8192)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert not torch.allclose(cached[0], cached[2], atol=1e-3)  # the prompts differ


def test_official_prompt_templates_for_role_play(adapter):
    tok, v = adapter.text, adapter.vocab
    persona = Segment("text", "system", "You are Rex.")
    # t2i: a lone user message is the official caption; a dialogue is the USER / ASSISTANT conversation
    seq = adapter._sequence(_prompt("a red fox"), generate_after=True)  # noqa: SLF001
    n = adapter.num_vq_tokens
    assert seq.ids[: -n - 2] == [v.t2i, v.sot, *tok.encode("a red fox"), v.eot]
    chain = Example("t2i", [persona, Segment("text", "user", "draw the sea"), Segment("text", "character", "here.")])
    ids = adapter._sequence(chain, generate_after=True).ids[: -n - 2]  # noqa: SLF001
    assert ids == [v.t2i, v.sot, *tok.encode("You are Rex. USER: draw the sea ASSISTANT:"), *tok.encode(" here."), v.eot]
    # understanding: the image first, then `USER: \n{question} ASSISTANT:` and the trained answer + <|eot|>
    vqa = _examples()[1]
    seq = adapter._sequence(vqa)  # noqa: SLF001
    text_ids = [i for i, s in zip(seq.ids, seq.slot, strict=True) if s == ""]
    assert text_ids == [v.mmu, v.soi, v.eoi, v.sot, *tok.encode("USER: \nwhat is it? ASSISTANT:"),
                        *tok.encode(" the sea"), v.eot]
    assert [t for t, trained in zip(seq.ids, seq.trained, strict=True) if trained] == [*tok.encode(" the sea"), v.eot]
    # <|mmu|> and the image are one bidirectional span (the official understanding mask)
    assert seq.span[: n + 3] == [1] * (n + 3) and set(seq.span[n + 3:]) == {0}
    batch = adapter.collate([vqa])
    assert batch.attention_mask[0, 0, : n + 3].all()  # <|mmu|> sees the whole image through <|eoi|>
    # text alone: no task token; a new answer is prompted by `ASSISTANT:`
    chat = Example("chat", [persona, Segment("text", "user", "hello")])
    prompt = adapter._sequence(Example("chat", [*chat.segments, Segment("text", "character", "", train=True)]),  # noqa: SLF001
                               stop=True)
    assert prompt.ids == [v.sot, *tok.encode("You are Rex. USER: hello ASSISTANT:")]
    # the unconditional prompt of classifier-free guidance is the official empty one
    assert adapter._uncond_sequence().ids[:3] == [v.t2i, v.sot, v.eot]  # noqa: SLF001


def test_image_loss_markers_key(adapter):
    batch = adapter.collate(_examples()[:1])
    torch.manual_seed(0)
    _, targets = adapter._fill_codes(batch, mask_gen=True)  # noqa: SLF001
    assert (targets[batch.gen_markers] == batch.input_ids[batch.gen_markers]).all()  # official: <|soi|>, <|eoi|>
    adapter.image_loss_markers = False
    try:
        torch.manual_seed(0)
        _, codes_only = adapter._fill_codes(batch, mask_gen=True)  # noqa: SLF001
    finally:
        adapter.image_loss_markers = True
    assert (codes_only[batch.gen_markers] == -100).all()
    assert torch.equal(codes_only[batch.gen_slots], targets[batch.gen_slots])
    card = OmegaConf.load(CARD)
    card.architecture.training.image_loss_markers = "no"
    with pytest.raises(ConfigError, match="architecture.training.image_loss_markers"):
        ShowoAdapter.build(card, corpus=CORPUS)
    card.architecture.training = {"image_loss_marker": False}
    with pytest.raises(ConfigError, match="unknown keys"):
        ShowoAdapter.build(card, corpus=CORPUS)
    card.architecture.training = {"image_loss_markers": False}
    assert ShowoAdapter.build(card, corpus=CORPUS).image_loss_markers is False
