"""Numerical behaviour of the tiny BAGEL: MoT routing, attention masks, caching, losses, saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.backbones.bagel import BagelAdapter
from cmrp.backbones.bagel.model import BagelBatch, flow_timesteps, patchify, unpatchify
from cmrp.backbones.bagel.packing import attention_mask_from_splits
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.sampling.spec import SamplerSpec

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["hello there, I am a tiny test creature", "what colour is it? it is red", "draw me on the beach"] * 5


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 128, 255), (20, 200, 40)]):
        p = d / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(p)
        paths.append(p)
    return paths


def small_card(**arch_overrides):
    card = OmegaConf.to_container(OmegaConf.load(ROOT / "backbones" / "bagel-tiny.yaml"))
    card["architecture"]["llm"].update(hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    card["architecture"].update(arch_overrides)
    return card


@pytest.fixture()
def adapter() -> BagelAdapter:
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(), corpus=CORPUS)
    # make the velocity head non-zero so generation outputs depend on the weights
    torch.nn.init.normal_(a.model.llm2vae.weight, std=0.02)
    return a


def t(role, text, train=False):
    return Segment("text", role, text, train=train)


def examples(paths):
    return [
        Example("chat", [t("system", "You are Rex."), t("user", "hello"), t("character", "hi there", True)]),
        Example("vqa", [Segment("image", image=paths[0]), t("user", "what colour is it?"), t("character", "red", True)]),
        Example("t2i", [t("user", "draw me on the beach"), Segment("image", "character", image=paths[1], generate=True, train=True)]),
    ]


def test_attention_mask_semantics():
    # text(3, causal) | understood image (4, full) | text (2, causal) | generated image (3, noise) | text (2)
    splits = [(3, "causal"), (4, "full"), (2, "causal"), (3, "noise"), (2, "causal")]
    m = attention_mask_from_splits(splits, 16)
    assert m[0, 0] and not m[0, 1]  # causal text
    assert m[3, 6] and m[6, 3]  # full attention inside the understood image
    assert m[7, 6] and m[8, 7] and not m[7, 8]  # text after the image sees it; causal among itself
    assert m[9, 11] and m[11, 9] and m[9, 0]  # noisy latents see each other and the context
    assert not m[12, 9] and not m[13, 10]  # ... but nothing after them sees noisy latents
    assert m[12, 8] and m[13, 12]
    assert m[14, 14] and m[15, 15] and not m[14, :14].any()  # padding sees itself only


def test_patchify_roundtrip():
    x = torch.randn(2, 12, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 12, 8, 8), x)


def test_flow_timestep_shift_moves_mass_to_noise():
    g = torch.Generator().manual_seed(0)
    plain = flow_timesteps(20000, 1.0, generator=g)
    g = torch.Generator().manual_seed(0)
    shifted = flow_timesteps(20000, 3.0, generator=g)
    assert 0 < plain.min() and plain.max() < 1
    assert abs(plain.mean().item() - 0.5) < 0.02
    assert shifted.mean() > plain.mean() + 0.1
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))


def test_mot_routing_uses_gen_weights_only_for_gen_tokens(adapter, image_paths):
    batch = adapter.collate(examples(image_paths))
    torch.manual_seed(1)
    adapter.model.eval()
    h_ref = adapter._forward(batch, None)[0]
    gen_layer = adapter.model.language_model.model.layers[0].mlp_moe_gen
    with torch.no_grad():
        gen_layer.down_proj.weight.add_(torch.randn_like(gen_layer.down_proj.weight))
    torch.manual_seed(1)
    h_new = adapter._forward(batch, None)[0]
    changed = (h_new - h_ref).abs().amax(-1) > 1e-6
    valid = batch.valid
    # text / ViT tokens of samples without generated images are unaffected: gen tokens are invisible
    assert not changed[0][valid[0]].any() and not changed[1][valid[1]].any()
    assert changed[2][batch.is_gen[2]].all()
    # text before the generated image cannot see it either
    first_gen = int(batch.is_gen[2].nonzero()[0])
    assert not changed[2, : first_gen - 1].any()


def test_labels_only_on_trained_text(adapter, image_paths):
    batch = adapter.collate(examples(image_paths))
    tok = adapter.tokenizer
    labelled = batch.labels[0][batch.labels[0] != -100].tolist()
    assert labelled == tok.encode("hi there") + [tok.eos_id]
    assert (batch.labels[2] != -100).sum() == 0  # a T2I sample has no text loss
    assert batch.is_vit.sum() == adapter.vit_tokens and batch.is_gen.sum() == adapter.gen_tokens


def test_losses_finite_and_decrease(adapter, image_paths):
    batch = adapter.collate(examples(image_paths))
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=3e-3)
    adapter.model.train()
    first = None
    for _ in range(25):
        torch.manual_seed(0)
        losses = adapter.losses(batch)
        loss = losses["text"] + losses["image"]
        assert torch.isfinite(loss)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(0)
    last = adapter.losses(batch)
    assert last["text"].item() < 0.3 * first["text"]
    assert last["image"].item() < 0.8 * first["image"]


def test_flow_target_is_noise_minus_clean(adapter, image_paths):
    """With a perfect velocity, one Euler step from t to 0 recovers the clean latent exactly."""
    model = adapter.model
    img = adapter._load_image(image_paths[0])[None]
    x0 = patchify(model.vae.encode(img), 2)
    noise = torch.randn_like(x0)
    tt = torch.tensor([0.7])
    x_t = (1 - tt) * x0 + tt * noise
    v = noise - x0
    assert torch.allclose(x_t + (0 - tt) * v, x0, atol=1e-6)
    assert torch.allclose(model.vae.decode(unpatchify(x0, 2, 12, 16, 16)), img, atol=1e-6)


def test_cached_prefix_matches_full_forward(adapter):
    """Encoding the prefix once and decoding new tokens on the cache equals one full forward."""
    adapter.model.eval()
    ctx = [Example("c", [t("system", "You are Rex."), t("user", "hello")]),
           Example("c", [t("user", "what colour is it? it is red and blue")])]
    full = [Example("c", [*e.segments, t("character", "hi there", True)]) for e in ctx]
    batch = adapter.collate(full)
    hidden_full = adapter._forward(batch, None)[0]
    logits_full = adapter.model.language_model.lm_head(hidden_full)
    # greedy decoding through the cache must pick the argmax of the full forward at each step
    tok = adapter.tokenizer
    reply = tok.encode("hi there")
    header = [tok.bos_id]  # a text segment starts with a bare bos (no role header)
    for i, e in enumerate(ctx):
        prefix_len = len(adapter.collate([e]).input_ids[0])
        pos = prefix_len + len(header) - 1
        cache = adapter._encode_prefix([e])
        ids = torch.tensor([header + reply])
        positions = cache.next_position[:, None] + torch.arange(ids.shape[1])[None]
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None]
        embeds = adapter.model.language_model.model.embed_tokens(ids)
        hidden, _ = adapter._decode_new(cache, embeds, None, causal, positions)
        logits = adapter.model.language_model.lm_head(hidden)
        n = ids.shape[1]
        assert torch.allclose(logits[0], logits_full[i, pos - len(header) + 1 : pos - len(header) + 1 + n], atol=1e-4)


def test_scoring_answers_on_shared_contexts_equals_scoring_whole_sequences(adapter, image_paths):
    """MCQ options share their image and question: score_text encodes each context once and runs the answers on
    its cache. Its values are the whole sequences' (which an example with a generated image still takes)."""
    from cmrp.backbones.bagel.packing import IGNORE
    from cmrp.backbones.common import labelled_logprob, split_answers
    from cmrp.data.character import MultipleChoice
    from cmrp.data.tasks import mcq_option_examples

    adapter.model.eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = ["red", "a long yellow answer", "x", "blue"]
    scored = [*mcq_option_examples([Segment("image", pixels=pixels[0])], MultipleChoice("Which colour?", options, 0), "vqa"),
              *mcq_option_examples([Segment("image", pixels=pixels[1])], MultipleChoice("Which colour now?", options, 1), "vqa"),
              *mcq_option_examples([t("system", "You are Rex.")], MultipleChoice("Where do you live?", ["a", "bb"], 0), "kqa")]
    contexts, rows, answers = split_answers(scored)
    assert len(contexts) == 3 and rows == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert answers[:2] == ["A. red", "B. a long yellow answer"]
    with torch.no_grad():
        fast = adapter.score_text(scored)
        batch = adapter.collate(scored)
        whole = labelled_logprob(adapter._forward(batch, None)[0], batch.labels, adapter.model.language_model.lm_head, IGNORE)
    assert fast.shape == (10,)
    assert torch.allclose(fast, whole, atol=1e-4)
    assert len(set(fast.tolist())) == 10  # every option scored on its own answer
    assert split_answers(examples(image_paths)) is None  # a generated image: scored whole
    with torch.no_grad():
        mixed = adapter.score_text(examples(image_paths)[:2])
        batch = adapter.collate(examples(image_paths)[:2])
        whole = labelled_logprob(adapter._forward(batch, None)[0], batch.labels, adapter.model.language_model.lm_head, IGNORE)
    assert torch.allclose(mixed, whole, atol=1e-4)


def test_sample_images_shape_determinism_and_prefix_sharing(adapter):
    adapter.model.eval()
    ctx = [Example("c", [t("user", "draw me on the beach")]), Example("c", [t("user", "draw me")])]
    a = adapter.sample_images(ctx, SamplerSpec(steps=4), n=2, seed=3).images
    b = adapter.sample_images(ctx, SamplerSpec(steps=4), n=2, seed=3).images
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    # one context alone gives the same images as inside the batch (padding does not leak)
    single = adapter.sample_images(ctx[:1], SamplerSpec(steps=4), n=2, seed=3).images
    assert torch.allclose(single, a[:2], atol=1e-5)


def test_generate_text_greedy_is_the_argmax_per_context_and_sampling_follows_the_seed(adapter):
    adapter.model.eval()
    ctx = [Example("c", [t("user", "hello")]), Example("c", [t("user", "draw me on the beach, please")])]
    logits: list[torch.Tensor] = []
    ids = adapter._generate_ids(adapter._encode_prefix(ctx), 5, 0.0, 0, logits_out=logits)
    assert all(1 <= len(row) <= 5 for row in ids)  # at most max_new_tokens, eos not included
    for i, row in enumerate(ids):  # greedy: each token is the argmax of its step's logits
        assert row == [int(step[i].argmax()) for step in logits[:len(row)]]
    greedy = adapter.generate_text(ctx, max_new_tokens=5)
    assert greedy == [adapter.tokenizer.decode(row).strip() for row in ids]
    # each context decodes as it would alone (padding in the batch does not leak)
    assert [adapter.generate_text([c], max_new_tokens=5)[0] for c in ctx] == greedy
    def hot(seed: int) -> list[str]:
        return adapter.generate_text(ctx, max_new_tokens=5, temperature=5.0, seed=seed)

    assert hot(1) == hot(1) and hot(1) != hot(2) and hot(1) != greedy  # sampling: reproducible per seed


def test_save_and_from_pretrained_roundtrip(adapter, image_paths, tmp_path):
    adapter.model.eval()
    adapter.save_pretrained(tmp_path / "bb")
    loaded = BagelAdapter.from_pretrained(tmp_path / "bb")
    loaded.model.eval()
    for (k1, v1), (k2, v2) in zip(adapter.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    exs = examples(image_paths)[:2]
    assert torch.equal(adapter.score_text(exs), loaded.score_text(exs))


def test_official_parameter_names(adapter):
    names = set(adapter.model.state_dict())
    for expected in [
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.layers.0.self_attn.q_proj_moe_gen.bias",
        "language_model.model.layers.0.self_attn.k_norm_moe_gen.weight",
        "language_model.model.layers.0.mlp_moe_gen.gate_proj.weight",
        "language_model.model.layers.0.input_layernorm_moe_gen.weight",
        "language_model.model.norm_moe_gen.weight",
        "language_model.lm_head.weight",
        "vit_model.vision_model.embeddings.patch_embedding.weight",
        "vit_model.vision_model.encoder.layers.0.self_attn.out_proj.weight",
        "vit_model.vision_model.post_layernorm.weight",
        "connector.fc1.weight",
        "vit_pos_embed.pos_embed",
        "time_embedder.mlp.0.weight",
        "time_embedder.mlp.2.weight",
        "vae2llm.weight",
        "llm2vae.weight",
        "latent_pos_embed.pos_embed",
    ]:
        assert expected in names, expected


def test_missing_and_renamed_keys_are_reported(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    path = adapter.save_pretrained(tmp_path / "bb")
    state = load_file(str(path / "model.safetensors"))
    state["language_model.model.layers.0.mlp.gate.weight"] = state.pop("language_model.model.layers.0.mlp.gate_proj.weight")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(WeightsError) as err:
        BagelAdapter.from_pretrained(path)
    msg = str(err.value)
    assert "missing keys: language_model.model.layers.0.mlp.gate_proj.weight" in msg
    assert "unexpected keys: language_model.model.layers.0.mlp.gate.weight" in msg
    with pytest.raises(WeightsError, match="nowhere does not exist; point it at a checkpoint folder"):
        BagelAdapter.from_pretrained(tmp_path / "nowhere")


def test_trainable_groups_partition_parameters(adapter):
    import re

    groups = adapter.trainable_groups()
    names = [n for n, _ in adapter.model.named_parameters()]
    gen = {n for n in names if any(re.fullmatch(p, n) for p in groups["generation"])}
    und = {n for n in names if any(re.fullmatch(p, n) for p in groups["understanding"])}
    assert gen and und and not (gen & und) and gen | und == set(names)
    assert "llm2vae.weight" in gen and "language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in gen
    assert "language_model.model.layers.1.mlp.up_proj.weight" in und


def test_an_understood_grid_past_the_position_table_is_a_config_error():
    """vit.image_size beyond vit_max_num_patch_per_side x patch would index the LLM-side table past its end:
    on a GPU a device-side assert with no word of why (the 7B-shaped slice at 1008 px hit it). Refused at
    build, naming both keys; the benchmarks' builder grows the table to the images it asks for."""
    from cmrp.backbones.bagel.model import Bagel, BagelArch
    from cmrp.config.loader import load_backbone_card
    from cmrp.perf.workload import build_adapter, card_with

    arch = card_with(load_backbone_card("bagel-tiny"), image_size=96)["architecture"]  # 12 patches > 8
    with pytest.raises(ConfigError, match="vit_max_num_patch_per_side 8"):
        Bagel(BagelArch.from_dict(arch))
    adapter = build_adapter("bagel-tiny", image_size=96)
    assert adapter.bagel.arch.vit_max_num_patch_per_side == 12
    tokens = adapter.bagel.vit_tokens(torch.rand(1, 3, 96, 96))
    assert tokens.shape == (1, 144, adapter.bagel.arch.llm.hidden_size) and torch.isfinite(tokens).all()


def test_padding_is_skipped_without_changing_losses_or_gradients():
    """A mixed-task SFT batch is about half padding; the MoT routing leaves it out of every layer, and attention
    runs over groups of rows cut to their longest. The losses and every gradient equal those of the forward
    that computes padding too (whose rows see only themselves, so they never reached a real token)."""
    from cmrp.perf.workload import build_adapter, sft_examples

    adapter = build_adapter("bagel-tiny", seed=3)
    adapter.model.train()
    batch = adapter.collate(sft_examples(adapter, batch=4, text_tokens=24, tasks=("t2i", "vqa", "chat", "t2i")))
    assert 0.2 < float((~batch.valid).float().mean()) < 0.8  # there is padding to skip
    from cmrp.backbones.bagel.qwen2_mot import Routing

    groups = Routing.of(batch.is_gen, batch.valid).row_groups  # and attention is cut to each group's length
    assert groups is not None and len({length for _, length in groups}) > 1
    assert Routing.of(batch.is_gen, torch.ones_like(batch.valid)).row_groups is None

    def run(skip: bool):
        adapter.model.zero_grad(set_to_none=True)
        kept = batch if skip else BagelBatch(**{**batch.__dict__, "valid": None})
        torch.manual_seed(0)  # the same flow noise and times
        losses = adapter.losses(kept)
        (losses["text"] + losses["image"]).backward()
        grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
        return {k: float(v.detach()) for k, v in losses.items()}, grads

    skipped, grads_skipped = run(True)
    full, grads_full = run(False)
    assert skipped == pytest.approx(full, rel=1e-5)
    assert grads_skipped.keys() == grads_full.keys()
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_skipped[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_take_rows_backward_is_index_selects():
    """The routing's gather puts gradients back with a copy (its indices never repeat): the same gradient as
    index_select's accumulating backward, zeros for rows no expert took."""
    from cmrp.backbones.bagel.qwen2_mot import take_rows

    torch.manual_seed(0)
    x = torch.randn(40, 3, 5, requires_grad=True)
    index = torch.randperm(40)[:25]
    upstream = torch.randn(25, 3, 5)
    (grad_ours,) = torch.autograd.grad((take_rows(x, index) * upstream).sum(), x)
    (grad_torch,) = torch.autograd.grad((x.index_select(0, index) * upstream).sum(), x)
    assert torch.equal(grad_ours, grad_torch)
    assert torch.equal(take_rows(x, index), x.index_select(0, index))
    assert not take_rows(x.detach(), index).requires_grad
