"""Janus-Pro golden tests: cmrp's Janus adapter against transformers' reference behaviour (the processor's
chat template, `JanusForConditionalGeneration` forward / `generate`) on a tiny random checkpoint that
transformers built and saved (tests/fixtures/parity/janus/, made by tests/parity/make_references_janus.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmrp.backbones.janus import JanusAdapter
from cmrp.data.tasks import Example, Segment
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec
from tests.parity._compare import assert_matches

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "janus"
CHECKPOINT = FIXTURE / "checkpoint"
REF = load_file(str(FIXTURE / "references.safetensors"))
META = json.loads((FIXTURE / "references.json").read_text())
MODEL = "Janus-Pro"


@pytest.fixture(scope="module")
def adapter() -> JanusAdapter:
    return JanusAdapter.from_pretrained(CHECKPOINT)


def text(role: str, body: str, train: bool = False) -> Segment:
    return Segment("text", role, body, train=train)


def persona() -> Segment:
    return text("system", META["persona"])


def chat_context() -> Example:
    return Example("chat", [persona(), text("user", "hello there"), text("character", "hi, the sea is calm."),
                            text("user", "and the boats?")])


def understanding_context() -> Example:
    return Example("vqa", [persona(), Segment("image", "user", pixels=REF["pixels"][0]),
                           text("user", "what colour is it?")])


def t2i_contexts() -> list[Example]:
    return [Example("t2i", [persona(), text("user", "draw me on the beach")]),
            Example("t2i", [text("user", "a red fox at dawn")])]


def prompt_logits(adapter: JanusAdapter, context: Example) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = adapter._prefix([context], "train", False)  # noqa: SLF001 - the text-generation prompt
    with torch.no_grad():
        embeds, mask, positions = adapter._encode(prefix)  # noqa: SLF001
        hidden, _ = adapter._lm(embeds, mask, positions)  # noqa: SLF001
        return prefix.ids, adapter.janus.lm_head(hidden)


def check_decoding(adapter: JanusAdapter, context: Example, name: str) -> None:
    official = REF[f"{name}_generated"]
    eos = adapter.tokenizer.eos_id
    steps = int((official == eos).nonzero()[0]) + 1 if bool((official == eos).any()) else len(official)
    ids, logits = adapter._decode([context], max_new_tokens=steps)  # noqa: SLF001 - ids and per-step logits
    answer = torch.tensor(ids[0] + ([eos] if len(ids[0]) < steps else []))
    assert_matches(MODEL, "KV-cached greedy answer (token ids)", answer, official[:steps])
    assert_matches(MODEL, "KV-cached decoding logits", logits[0], REF[f"{name}_generated_logits"][:steps])


def test_checkpoint_loads_strictly_both_ways(adapter, tmp_path):
    from transformers import JanusForConditionalGeneration

    official = load_file(str(CHECKPOINT / "model.safetensors"))
    ours = adapter.janus.state_dict()
    for key, value in official.items():  # transformers -> cmrp (from_pretrained fails on any key problem)
        assert torch.equal(ours[key], value), key
    out = adapter.save_pretrained(tmp_path / "saved")  # cmrp -> transformers
    loaded, info = JanusForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    saved = loaded.state_dict()
    assert_matches(MODEL, "checkpoint round trip (transformers → cmrp → transformers)",
                   torch.cat([saved[k].flatten() for k in sorted(official)]),
                   torch.cat([official[k].flatten() for k in sorted(official)]), rtol=0.0)


def test_role_play_chat_prompt_logits_and_greedy_answer(adapter):
    ids, logits = prompt_logits(adapter, chat_context())
    assert_matches(MODEL, "role-play chat prompt (token ids)", ids, REF["chat_prompt_ids"])
    assert_matches(MODEL, "text logits", logits, REF["chat_prompt_logits"])
    check_decoding(adapter, chat_context(), "chat")


def test_understanding_prompt_pixels_logits_and_answer(adapter):
    ids, logits = prompt_logits(adapter, understanding_context())
    assert_matches(MODEL, "understanding prompt with an image (token ids)", ids, REF["und_prompt_ids"])
    mean, std = adapter.image_mean[:, None, None], adapter.image_std[:, None, None]
    assert_matches(MODEL, "understanding pixel values", (REF["pixels"][:1] - mean) / std, REF["und_pixel_values"])
    assert_matches(MODEL, "understanding logits (ViT features in place)", logits, REF["und_prompt_logits"])
    check_decoding(adapter, understanding_context(), "und")


def test_text_training_loss(adapter):
    example = Example("chat", [persona(), text("user", "hello there"), text("character", "hi, the sea is calm.", True)])
    batch = adapter.collate([example])
    assert_matches(MODEL, "training sequence (token ids)", batch.input_ids, REF["train_ids"])
    # ours: the label of position i is token i+1; transformers shifts its labels inside the loss
    assert_matches(MODEL, "training labels (answer and end of sentence)", batch.labels[:, :-1], REF["train_labels"][:, 1:])
    with torch.no_grad():
        loss = adapter.losses(batch)["text"]
    assert_matches(MODEL, "text training loss", loss.reshape(1), REF["train_loss"])


def test_image_generation_with_cfg_equals_generate_from_one_seed(adapter):
    contexts = t2i_contexts()
    prefix = adapter._prefix(contexts, "generate", False)  # noqa: SLF001 - the conditional rows
    assert_matches(MODEL, "t2i prompts, left-padded (token ids)", prefix.ids, REF["t2i_ids"])
    assert_matches(MODEL, "t2i attention mask", prefix.mask.long(), REF["t2i_mask"])
    n = adapter.gen_tokens
    rollout = adapter.sample_images(contexts, SamplerSpec(steps=n, window=(0, n),
                                                          guidance=Guidance(text_scale=META["guidance_scale"])),
                                    n=1, seed=META["seed"], temperature=1.0)
    assert_matches(MODEL, "image tokens with CFG from one seed", rollout.trajectory.tokens, REF["t2i_tokens"])
    assert_matches(MODEL, "image-token log-probs under CFG (sampling, KV cache)", rollout.trajectory.logprobs,
                   REF["t2i_token_logprobs"])
    with torch.no_grad():
        rescored = torch.stack([adapter.rollout_logprob(rollout, k) for k in range(n)], 1)
    assert_matches(MODEL, "image-token log-probs under CFG (GRPO re-scoring)", rescored, REF["t2i_token_logprobs"])
    assert_matches(MODEL, "generated images (VQ decode)", rollout.images, REF["t2i_images"].permute(0, 3, 1, 2))
    # with temperature and top-k (transformers' warper order: guidance, temperature, top-k)
    rollout = adapter.sample_images(contexts, SamplerSpec(steps=n, window=(0, n),
                                                          guidance=Guidance(text_scale=META["guidance_scale"])),
                                    n=1, seed=META["seed"], temperature=0.9, top_k=8)
    assert_matches(MODEL, "image tokens with CFG, temperature and top-k", rollout.trajectory.tokens,
                   REF["t2i_topk_tokens"])
    assert_matches(MODEL, "image-token log-probs with CFG, temperature and top-k", rollout.trajectory.logprobs,
                   REF["t2i_topk_token_logprobs"])


def test_vq_round_trip(adapter):
    codes = adapter.encode_images(REF["pixels"])
    assert_matches(MODEL, "VQ codes", codes, REF["vq_codes"])
    assert_matches(MODEL, "VQ decoded images", adapter.decode_images(REF["vq_codes"]), REF["vq_decoded"].permute(0, 3, 1, 2))
