"""Show-o golden tests: cmrp against numbers the official Show-o code (showlab/Show-o) produced on a tiny
random checkpoint that its own classes built and saved (tests/fixtures/parity/showo/, made by
tests/parity/make_references_showo.py; see the fixture's README).

The architecture is `showo-1.3b`'s card with only the sizes replaced, so the official checkpoint loading
strictly here is the card describing the real architecture (Phi with q/k LayerNorm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cmrp.backbones.showo import MAGVITv2, Showo, ShowoAdapter, ShowoArch
from cmrp.backbones.showo.adapter import load_showo_state
from cmrp.backbones.showo.maskgit import choice_temperatures, commit_counts
from cmrp.backbones.showo.text import ShowoText
from cmrp.data.tasks import Example, Segment
from cmrp.errors import WeightsError
from cmrp.sampling.guidance import Guidance
from cmrp.sampling.spec import SamplerSpec
from tests.parity._compare import assert_matches

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "showo"
CHECKPOINT = FIXTURE / "checkpoint"
REF = load_file(str(FIXTURE / "references.safetensors"))
META = json.loads((FIXTURE / "references.json").read_text())
MODEL = "Show-o"


def tiny_card(**phi_flags) -> dict:
    """`showo-1.3b`'s card with the fixture's sizes (every architecture flag kept)."""
    card = OmegaConf.to_container(OmegaConf.load(ROOT / "backbones" / "showo-1.3b.yaml"))
    llm = json.loads((CHECKPOINT / "llm" / "config.json").read_text())
    vq = META["vq"]
    arch = card["architecture"]
    arch["phi"].update({k: llm[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "max_position_embeddings")}, **phi_flags)
    arch.update(llm_vocab_size=META["llm_vocab_size"], codebook_size=2 ** vq["z_channels"], image_size=vq["resolution"],
                vq={"ch": vq["ch"], "encoder_ch_mult": vq["ch_mult"], "encoder_num_res_blocks": vq["num_res_blocks"],
                    "decoder_ch_mult": vq["ch_mult"], "decoder_num_res_blocks": vq["num_res_blocks"],
                    "z_channels": vq["z_channels"], "norm_groups": 32})
    return {**card, "weights": None, "tokenizer": str(CHECKPOINT / "llm")}


def _arch(card: dict) -> ShowoArch:
    spec = {k: v for k, v in card["architecture"].items() if k not in ("sampling", "training")}
    return ShowoArch.from_dict(spec)


@pytest.fixture(scope="module")
def adapter() -> ShowoAdapter:
    card = tiny_card()
    arch = _arch(card)
    model = Showo(arch)
    load_showo_state(model, load_file(str(CHECKPOINT / "pytorch_model.safetensors")), "official Show-o")
    vq = MAGVITv2(arch.vq)
    load_showo_state(vq, load_file(str(CHECKPOINT / "vq" / "pytorch_model.safetensors")), "official MAGVIT-v2")
    sampling = card["architecture"]["sampling"]
    return ShowoAdapter(model.eval(), vq, ShowoText.load(CHECKPOINT / "llm"), card, **sampling)


def text(role: str, body: str, train: bool = False) -> Segment:
    return Segment("text", role, body, train=train)


def image(i: int, generate: bool = False) -> Segment:
    return Segment("image", "character" if generate else "user", pixels=REF["pixels"][i], generate=generate,
                   train=generate)


def chain_context() -> list[Segment]:
    return [text("system", META["persona"]), text("user", "draw the lighthouse"),
            text("character", "here it is, at dawn.")]


def t2i_contexts() -> list[Example]:
    return [Example("t2i", chain_context()), Example("t2i", [text("user", META["t2i_caption"])])]


def unpadded(row: torch.Tensor, pad: int) -> list[int]:
    return [t for t in row.tolist() if t != pad]


def logits_of(adapter: ShowoAdapter, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = adapter.collate(examples)
    ids, _ = adapter._fill_codes(batch, mask_gen=False)  # noqa: SLF001 - the exact input ids
    with torch.no_grad():
        return ids, adapter.model(ids, batch.attention_mask, batch.position_ids)


def test_official_checkpoint_loads_strictly_into_the_showo_1_3b_architecture(adapter, tmp_path):
    official = load_file(str(CHECKPOINT / "pytorch_model.safetensors"))
    qk = [k for k in official if "q_layernorm" in k or "k_layernorm" in k]
    assert len(qk) == 4 * adapter.arch.phi["num_hidden_layers"]  # weight + bias of q and k per layer
    for key, value in official.items():  # official -> cmrp: every tensor where the official code put it
        assert torch.equal(adapter.model.state_dict()[key], value), key
    # without Show-o's q/k LayerNorm (plain Phi-1.5) the official checkpoint does not load
    with pytest.raises(WeightsError, match="unexpected keys: showo.model.layers.0.self_attn.k_layernorm"):
        load_showo_state(Showo(_arch(tiny_card(qk_layernorm=False))), official, "official Show-o")
    # the folder itself loads through from_pretrained (the official layout: config.json, llm/, vq/)
    loaded = ShowoAdapter.from_pretrained(CHECKPOINT)
    assert loaded.model.showo.config.qk_layernorm  # forced, although llm/config.json says false (as Phi-1.5's)
    for key, value in official.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # cmrp -> official: what we save has the official file's keys, shapes and values, and the config fields
    # the official Showo constructor reads (make_references_showo.py --check-cmrp-save loads it officially)
    out = adapter.save_pretrained(tmp_path / "saved")
    ours = load_file(str(out / "pytorch_model.safetensors"))
    assert sorted(ours) == sorted(official)
    assert_matches(MODEL, "checkpoint round trip (official → cmrp → official layout)",
                   torch.cat([v.flatten() for _, v in sorted(ours.items())]),
                   torch.cat([v.flatten() for _, v in sorted(official.items())]), rtol=0.0)
    official_vq = load_file(str(CHECKPOINT / "vq" / "pytorch_model.safetensors"))
    ours_vq = load_file(str(out / "vq" / "pytorch_model.safetensors"))
    assert sorted(ours_vq) == sorted(official_vq) and all(torch.equal(ours_vq[k], official_vq[k]) for k in official_vq)
    config, official_config = (json.loads((d / "config.json").read_text()) for d in (out, CHECKPOINT))
    for key in ("_class_name", "w_clip_vit", "vocab_size", "llm_vocab_size", "llm_model_path", "codebook_size",
                "num_vq_tokens", "mask_token_id"):
        assert config[key] == official_config[key], key
    llm = json.loads((out / "llm" / "config.json").read_text())
    assert llm["model_type"] == "phi" and llm["qk_layernorm"] is True


def test_chat_turn_prompt_and_text_logits(adapter):
    example = Example("chat", [text("system", META["persona"]), text("user", "hello there"),
                               text("character", "hi, the sea is calm tonight.", train=True)])
    ids, logits = logits_of(adapter, [example])
    assert_matches(MODEL, "role-play chat prompt (token ids)", ids, REF["chat_ids"])
    assert_matches(MODEL, "text logits", logits, REF["chat_logits"])


def test_understanding_prompt_and_logits_under_the_official_mask(adapter):
    example = Example("vqa", [text("system", META["persona"]), image(0), text("user", META["question"]),
                              text("character", META["answer"], train=True)])
    ids, logits = logits_of(adapter, [example])
    assert_matches(MODEL, "understanding prompt with an image (token ids)", ids, REF["mmu_answer_ids"])
    assert_matches(MODEL, "understanding logits (the mmu token sees the whole image)", logits, REF["mmu_answer_logits"])


def test_kv_cached_greedy_answer_equals_the_official_decoding(adapter):
    context = Example("vqa", [text("system", META["persona"]), image(0), text("user", META["question"])])
    seq = adapter._sequence(Example("vqa", [*context.segments, text("character", "", True)]), stop=True)  # noqa: SLF001
    codes = adapter.vq.encode_codes(REF["pixels"][:1])[0] + adapter.vocab.image_offset
    prompt = torch.tensor(seq.ids)
    prompt[torch.tensor([s == "und" for s in seq.slot])] = codes
    assert_matches(MODEL, "understanding prompt for an answer (token ids)", prompt[None], REF["mmu_prompt_ids"])
    official = REF["mmu_generated"]
    eot = adapter.vocab.eot
    steps = int((official == eot).nonzero()[0]) + 1 if bool((official == eot).any()) else len(official)
    ids, logits = adapter._decode([context], max_new_tokens=steps)  # noqa: SLF001 - ids and per-step logits
    answer = torch.tensor(ids[0] + ([eot] if len(ids[0]) < steps else []))
    assert_matches(MODEL, "KV-cached greedy answer (token ids)", answer, official[:steps])
    assert_matches(MODEL, "KV-cached decoding logits", logits[0], REF["mmu_generated_logits"][:steps, :adapter.vocab.llm_vocab_size])


def test_t2i_prompts_and_image_token_logits_under_the_official_mask(adapter):
    pad, n = adapter.vocab.pad, adapter.num_vq_tokens
    contexts = t2i_contexts()
    for i, ctx in enumerate(contexts):
        ours = adapter._sequence(ctx, generate_after=True).ids[: -n - 1]  # noqa: SLF001 - up to <|soi|>
        assert_matches(MODEL, "t2i prompt (token ids)", torch.tensor(ours),
                       torch.tensor(unpadded(REF["t2i_ids"][i], pad)[: -n - 1]))
    uncond = adapter._uncond_sequence().ids[: -n - 1]  # noqa: SLF001
    assert_matches(MODEL, "t2i unconditional prompt (token ids)", torch.tensor(uncond),
                   torch.tensor(unpadded(REF["t2i_uncond_ids"][0], pad)[: -n - 1]))
    partial = REF["t2i_partial"]
    codes = torch.where(partial == adapter.vocab.mask, -1, partial - adapter.vocab.image_offset)
    rows = torch.arange(2)
    with torch.no_grad():
        for cfg_scale, expected, check in ((1.0, REF["t2i_cond_logits"], "image-token logits"),
                                           (1.0 + META["guidance_scale"], REF["t2i_guided_logits"],
                                            "image-token logits with CFG")):
            guided = cfg_scale != 1.0
            prompt = adapter._encode_prompts(contexts, guided)  # noqa: SLF001 - the sampler's cached path
            cached = adapter._cached_image_logits(prompt, rows, codes, 2 if guided else None, cfg_scale)  # noqa: SLF001
            assert_matches(MODEL, check + " (KV-cached prompt)", cached, expected)
            full = adapter._image_logits(adapter._prompt_rows(contexts, 1, guided), rows, codes, 2, cfg_scale)  # noqa: SLF001
            assert_matches(MODEL, check + " (GRPO re-scoring)", full, expected)


def test_maskgit_schedule_temperature_and_tokens_from_one_seed(adapter):
    steps, n = META["steps"], adapter.num_vq_tokens
    counts = torch.tensor(commit_counts(n, steps))
    still_masked = n - counts.cumsum(0)
    # the official loop keeps >= 1 token masked at its last step and returns every drawn token: compare before it
    assert_matches(MODEL, "MaskGIT tokens left masked per step (cosine, float32)", still_masked[:-1],
                   REF["maskgit_mask_len"][:-1])
    assert_matches(MODEL, "MaskGIT choice temperature per step (compounding)",
                   torch.tensor(choice_temperatures(1.0, steps), dtype=torch.float64), REF["maskgit_choice_temperature"])
    spec = SamplerSpec(steps=steps, guidance=Guidance(text_scale=1.0 + META["guidance_scale"]))
    rollout = adapter.sample_images(t2i_contexts(), spec, n=1, seed=META["seed_sample"])
    assert_matches(MODEL, "MaskGIT with CFG from one seed (image tokens)", rollout.trajectory.tokens,
                   REF["maskgit_tokens"])
    assert_matches(MODEL, "MaskGIT images (MAGVIT-v2 decode)", rollout.images, REF["maskgit_images"])


def test_t2i_training_loss_at_the_official_positions(adapter):
    examples = [Example("t2i", [*chain_context(), image(1, generate=True)]),
                Example("t2i", [text("user", META["t2i_caption"]), image(2, generate=True)])]
    batch = adapter.collate(examples)
    torch.manual_seed(META["seed_loss"])
    ids, targets = adapter._fill_codes(batch, mask_gen=True)  # noqa: SLF001 - the masks the official code drew
    pad = adapter.vocab.pad
    for i in range(2):
        assert_matches(MODEL, "t2i training input with masked codes (token ids)",
                       torch.tensor(unpadded(ids[i], pad)), torch.tensor(unpadded(REF["loss_ids"][i], pad)))
        official_targets = REF["loss_labels"][i, -adapter.num_vq_tokens - 2:]  # <|soi|> codes <|eoi|>, in place
        ours = targets[i][batch.spans[i] == batch.spans[i].max()]
        assert_matches(MODEL, "t2i training targets (soi, masked codes, eoi)", ours, official_targets)
    torch.manual_seed(META["seed_loss"])
    with torch.no_grad():
        loss = adapter.losses(batch)["image"]
    assert_matches(MODEL, "t2i training loss", loss.reshape(1), REF["loss_t2i"])


def test_magvit_round_trip(adapter):
    codes = adapter.vq.encode_codes(REF["pixels"])
    assert_matches(MODEL, "MAGVIT-v2 codes", codes, REF["vq_codes"])
    assert_matches(MODEL, "MAGVIT-v2 decoded images", adapter.vq.decode_codes(REF["vq_codes"]), REF["vq_decoded"])
