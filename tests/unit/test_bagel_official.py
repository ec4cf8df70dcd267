"""BAGEL in the official checkpoint layout: round trip, key reports, the 7B card's size, FLUX AE, packed ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cmrp.backbones.bagel import BagelAdapter
from cmrp.backbones.bagel.autoencoder import FluxAEConfig, FluxAutoencoder, build_autoencoder
from cmrp.backbones.bagel.model import Bagel, BagelArch
from cmrp.backbones.bagel.official import (
    AE_FILE,
    EMA_FILE,
    LLM_CONFIG,
    VIT_CONFIG,
    load_official,
    parameter_counts,
    read_official_arch,
)
from cmrp.backbones.bagel.packing import ImageLoader, collate
from cmrp.backbones.bagel.siglip import conv_to_linear_weight
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from tests.unit.test_bagel import CORPUS, examples, image_paths, small_card  # noqa: F401 - fixture reuse

ROOT = Path(__file__).resolve().parents[2]
TINY_FLUX = {"kind": "flux", "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "z_channels": 4}


def _flux_adapter() -> BagelAdapter:
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(vae=TINY_FLUX, max_latent_size=8), corpus=CORPUS)
    torch.nn.init.normal_(a.model.llm2vae.weight, std=0.02)
    return a


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> tuple[BagelAdapter, Path]:
    adapter = _flux_adapter()
    path = adapter.save_official(tmp_path_factory.mktemp("official") / "BAGEL-tiny")
    return adapter, path


def _outputs(adapter: BagelAdapter, paths) -> tuple[torch.Tensor, torch.Tensor]:
    batch = adapter.collate(examples(paths))
    torch.manual_seed(123)  # the same noise and timesteps for the image loss
    with torch.no_grad():
        hidden = adapter._forward(batch, None)[0]
        logits = adapter.model.language_model.lm_head(hidden)
        torch.manual_seed(123)
        mse = adapter.losses(batch)["image"]
    return logits, mse


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- (1) round trip ---------------------------------------------------------------------------------
def test_official_layout_round_trip_is_bit_identical(official_dir, image_paths):  # noqa: F811
    adapter, path = official_dir
    names = {f.name for f in path.iterdir()}
    assert {LLM_CONFIG, VIT_CONFIG, EMA_FILE, AE_FILE, "tokenizer.json"} <= names
    llm = json.loads((path / LLM_CONFIG).read_text())
    vit = json.loads((path / VIT_CONFIG).read_text())
    assert llm["model_type"] == "qwen2" and llm["qk_norm"] is True and llm["layer_module"] == "Qwen2MoTDecoderLayer"
    assert vit["num_hidden_layers"] == adapter.arch.vit.num_hidden_layers + 1  # the file names the full depth

    loaded = BagelAdapter.from_pretrained(path)
    assert loaded.arch.max_latent_size == 8 and loaded.arch.vae["kind"] == "flux"
    assert loaded.tokenizer.encode("hello there") == adapter.tokenizer.encode("hello there")
    original = adapter.model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    for k, v in loaded.model.vae.state_dict().items():
        assert torch.equal(v, adapter.model.vae.state_dict()[k]), k
    logits_a, mse_a = _outputs(adapter, image_paths)
    logits_b, mse_b = _outputs(loaded, image_paths)
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(mse_a, mse_b) and float(mse_a) > 0


def test_own_layout_keeps_the_flux_autoencoder(tmp_path):
    adapter = _flux_adapter()
    adapter.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / AE_FILE).is_file()
    loaded = BagelAdapter.from_pretrained(tmp_path / "mine")
    for k, v in adapter.model.vae.state_dict().items():
        assert torch.equal(loaded.model.vae.state_dict()[k], v), k
    # the autoencoder is frozen and outside the trainable parameters
    assert not any(n.startswith("vae.") for n, _ in adapter.model.named_parameters())
    assert not any(p.requires_grad for p in adapter.model.vae.parameters())


def test_fixed_tables_are_recomputed_like_the_official_ones(official_dir):
    adapter, path = official_dir
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / EMA_FILE))
    official_table = state.pop("latent_pos_embed.pos_embed")  # the official trainer drops these too
    dropped = _copy_folder(path, path.parent / "no-tables")
    save_file(state, str(dropped / EMA_FILE))
    (dropped / "cmrp_bagel.json").write_text(json.dumps({"max_latent_size": 8}))
    model, _ = load_official(dropped)
    assert torch.equal(model.latent_pos_embed.pos_embed, official_table)
    # the official layout: row r, column c -> [sin/cos(c) | sin/cos(r)], sin before cos
    table = model.latent_pos_embed.pos_embed
    half = table.shape[1] // 2
    assert torch.equal(table[0 * 8 + 3, :half], table[5 * 8 + 3, :half])  # same column
    assert torch.equal(table[2 * 8 + 0, half:], table[2 * 8 + 7, half:])  # same row
    assert float(table[0, 0]) == 0.0 and float(table[0, half // 2]) == 1.0  # sin(0), cos(0)


# -- (2) key reports --------------------------------------------------------------------------------
def test_renamed_missing_and_mismatched_keys_are_reported_by_name(official_dir, tmp_path):
    _, path = official_dir
    from safetensors.torch import load_file, save_file

    broken = _copy_folder(path, tmp_path / "broken")
    state = load_file(str(broken / EMA_FILE))
    renamed = "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"
    state["language_model.model.layers.0.self_attn.q_proj_moe_gen_x.weight"] = state.pop(renamed)
    gone = "connector.fc2.bias"
    del state[gone]
    wrong = "llm2vae.weight"
    state[wrong] = torch.zeros(7, 64)
    save_file(state, str(broken / EMA_FILE))
    with pytest.raises(WeightsError) as err:
        BagelAdapter.from_pretrained(broken)
    msg = str(err.value)
    assert "missing keys:" in msg and renamed in msg and gone in msg
    assert "unexpected keys: language_model.model.layers.0.self_attn.q_proj_moe_gen_x.weight (renamed " + renamed in msg
    assert f"{wrong}: file [7, 64] vs model [{adapter_patch_dim()}, 64]" in msg
    assert "Fix:" in msg and "hf download ByteDance-Seed/BAGEL-7B-MoT" in msg


def adapter_patch_dim() -> int:
    return 2 * 2 * TINY_FLUX["z_channels"]


def test_autoencoder_key_problems_are_reported(official_dir, tmp_path):
    _, path = official_dir
    from safetensors.torch import load_file, save_file

    broken = _copy_folder(path, tmp_path / "broken-ae")
    state = load_file(str(broken / AE_FILE))
    del state["encoder.mid.attn_1.q.weight"]
    save_file(state, str(broken / AE_FILE))
    with pytest.raises(WeightsError, match=r"ae\.safetensors does not match .*\n  missing keys: encoder\.mid\.attn_1\.q\.weight"):
        BagelAdapter.from_pretrained(broken)
    (broken / AE_FILE).unlink()
    with pytest.raises(WeightsError, match="ae.safetensors not found"):
        BagelAdapter.from_pretrained(broken)


def test_conv_patch_embedding_is_converted_to_the_linear_layout(official_dir, tmp_path):
    adapter, path = official_dir
    from safetensors.torch import load_file, save_file

    p, c = adapter.arch.vit.patch_size, 3
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    state = load_file(str(path / EMA_FILE))
    linear = state[key]
    conv = linear.reshape(linear.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()  # [D, C, p, p]
    assert torch.equal(conv_to_linear_weight(conv), linear)
    folder = _copy_folder(path, tmp_path / "conv")
    state[key] = conv
    save_file(state, str(folder / EMA_FILE))
    model, _ = load_official(folder)
    assert torch.equal(model.vit_model.vision_model.embeddings.patch_embedding.weight, linear)


def test_weights_not_in_the_local_cache_name_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    card = OmegaConf.load(ROOT / "backbones" / "bagel-7b-mot.yaml")
    with pytest.raises(WeightsError, match=r"ByteDance-Seed/BAGEL-7B-MoT is not in the local Hugging Face cache.*hf download"):
        BagelAdapter.build(card)
    with pytest.raises(WeightsError, match="does not exist"):
        BagelAdapter.build({"name": "x", "weights": str(tmp_path / "nowhere")})


# -- (3) the 7B card --------------------------------------------------------------------------------
def test_7b_card_builds_on_meta_with_the_official_parameter_count():
    card = OmegaConf.load(ROOT / "backbones" / "bagel-7b-mot.yaml")
    arch = BagelArch.from_dict(OmegaConf.to_container(card.architecture))
    with torch.device("meta"):
        model = Bagel(arch)
    assert all(p.is_meta for p in model.parameters())
    counts = parameter_counts(model)
    assert counts == {
        "total": 14_607_260_128, "active_text": 7_615_623_680, "moe_gen": 6_525_628_928,
        "gen_only": 28_912_192, "vit": 402_552_736, "vae": 83_819_683,
    }
    qk_norms = 28 * 2 * 128  # BAGEL adds q/k RMSNorm (head_dim 128) to every Qwen2 layer
    # Qwen2.5-7B: 7.61B parameters, 6.53B without embeddings (its model card) — exactly, once the
    # q/k norms are set aside; the generation expert copies every decoder weight
    assert counts["active_text"] - qk_norms == 7_615_616_512
    assert abs(counts["active_text"] / 7.61e9 - 1) < 0.01
    assert abs(counts["moe_gen"] / 6.53e9 - 1) < 0.01
    # the paper / docs/backbones.md: "7B active parameters (14B total)"
    assert 14.0e9 <= counts["total"] < 15.0e9 and 7.0e9 <= counts["active_text"] < 8.0e9


def test_mid_card_is_a_few_hundred_million_parameters():
    card = OmegaConf.load(ROOT / "backbones" / "bagel-mid.yaml")
    arch = BagelArch.from_dict(OmegaConf.to_container(card.architecture))
    with torch.device("meta"):
        model = Bagel(arch)
    counts = parameter_counts(model)
    assert 2e8 < counts["total"] < 6e8 and counts["moe_gen"] > 0 and model.vae.downsample == 8


def test_qwen2_tokenizer_files_load_through_transformers(tmp_path):
    """A folder with only vocab.json + merges.txt + tokenizer_config.json (Qwen2Tokenizer), as some
    official downloads have, loads through transformers' AutoTokenizer (local files, no remote code)."""
    from cmrp.backbones.tokenizer import TextTokenizer

    trained = TextTokenizer.train_bpe(CORPUS, vocab_size=300)
    trained._tok.model.save(str(tmp_path))  # vocab.json + merges.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    tok = TextTokenizer.load(tmp_path)
    assert tok.encode("hello there, red") == trained.encode("hello there, red")
    assert tok.decode(tok.encode("what colour is it?")) == "what colour is it?"
    ids = {tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image, tok.pad_id}
    assert len(ids) == 5 and tok.decode(sorted(ids)) == ""  # BAGEL's five special tokens, skipped when decoding
    with pytest.raises(WeightsError, match="tokenizer.json"):
        TextTokenizer.load(tmp_path / "empty")


def test_a_locally_trained_tokenizer_reads_back_through_qwen2_files(official_dir, tmp_path):
    """`train-bpe` BAGEL tokenizers split text as Qwen2 does, so the vocab.json + merges.txt that save_official
    writes give the same ids in a Qwen2Tokenizer (what the official code loads), digits and specials included."""
    import shutil

    from transformers import AutoTokenizer

    adapter, path = official_dir
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(path / name, tmp_path / name)
    qwen2 = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in [*CORPUS[:3], "Rex counted 1234 shells; it's 9 o'clock!\nNew line"]:
        assert qwen2.encode(text, add_special_tokens=False) == adapter.tokenizer.encode(text), text
    tok = adapter.tokenizer
    markers = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>"]
    assert qwen2.convert_tokens_to_ids(markers) == [tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image,
                                                    tok.pad_id]
    assert [tok.encode("1234")] == [[tok.encode(d)[0] for d in "1234"]]  # Qwen2 splits digits one by one


def test_official_configs_map_to_our_architecture(tmp_path):
    """llm_config.json / vit_config.json as the official folder has them; the sizes no json carries come
    from the weights' shapes (here a header-only ema file)."""
    from safetensors.torch import save_file

    (tmp_path / LLM_CONFIG).write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "model_type": "qwen2", "use_sliding_window": False,
    }))
    (tmp_path / VIT_CONFIG).write_text(json.dumps({
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
        "image_size": 28, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "model_type": "siglip_vision_model",
    }))
    save_file({"vit_model.x": torch.zeros(1), "vit_pos_embed.pos_embed": torch.zeros(9, 64)}, str(tmp_path / EMA_FILE))
    arch = read_official_arch(tmp_path)
    assert arch.llm.qk_norm and arch.llm.use_moe and not arch.llm.tie_word_embeddings  # the official defaults
    assert arch.llm.rope_theta == 1e6 and arch.llm.num_key_value_heads == 2
    assert arch.vit.num_hidden_layers == 2  # penultimate layer
    assert arch.vit_max_num_patch_per_side == 3 and arch.visual_und and not arch.visual_gen
    (tmp_path / LLM_CONFIG).write_text(json.dumps({"hidden_size": 64, "hidden_act": "gelu"}))
    with pytest.raises(WeightsError, match="hidden_act 'gelu'"):
        read_official_arch(tmp_path)


def test_validate_accepts_the_7b_card_without_building_it(tmp_path, monkeypatch, capsys):
    from cmrp.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: validate must not need the weights
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {ROOT / 'recipes' / 'quickstart.yaml'}\nbackbone: bagel-7b-mot\n")
    assert main(["validate", str(recipe)]) == 0
    assert "backbone bagel-7b-mot" in capsys.readouterr().out


# -- (4) the FLUX autoencoder -----------------------------------------------------------------------
def test_flux_autoencoder_shapes_and_original_key_names():
    cfg = FluxAEConfig.from_spec(TINY_FLUX)
    torch.manual_seed(0)
    ae = FluxAutoencoder(cfg)
    assert ae.downsample == 4 and ae.z_channels == 4
    x = torch.rand(2, 3, 8, 12)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 4, 2, 3)
        y = ae.decode(z)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        # encode is the posterior mean by default, normalised: deterministic, and the shift/scale are applied
        moments = ae.encoder(x * 2 - 1)
        assert torch.equal(ae.encode(x), cfg.scale_factor * (moments[:, :4] - cfg.shift_factor))
    with pytest.raises(ValueError, match="not a multiple"):
        ae.encode(torch.rand(1, 3, 10, 12))
    keys = set(ae.state_dict())
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.2.block.0.nin_shortcut.weight",
              "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.bias",
              "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight", "encoder.conv_out.weight",
              "decoder.conv_in.weight", "decoder.mid.attn_1.k.weight", "decoder.up.0.block.1.conv2.weight",
              "decoder.up.2.upsample.conv.weight", "decoder.up.2.block.0.norm1.weight", "decoder.norm_out.bias",
              "decoder.conv_out.weight"):
        assert k in keys, k
    assert not any("up.0.upsample" in k or "down.2.downsample" in k for k in keys)  # none at the ends
    assert ae.state_dict()["encoder.conv_out.weight"].shape[0] == 8  # mean + log-variance


def test_vae_posterior_key_samples_by_default_and_mean_is_deterministic(tmp_path):
    """`architecture.vae_posterior`: `sample` (official; noise from the given generator) or `mean`; kept by
    save_official; a bad value names the key."""
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sampled = _flux_adapter()
    assert sampled.arch.vae_posterior == "sample"
    model = sampled.bagel
    with torch.no_grad():
        mean = model.vae.encode(img)
        a, b = (model.encode_latents(img, torch.Generator().manual_seed(s)) for s in (1, 2))
        again = model.encode_latents(img, torch.Generator().manual_seed(1))
    assert torch.equal(a, again) and not torch.allclose(a, b) and not torch.allclose(a, mean)
    torch.manual_seed(0)
    deterministic = BagelAdapter.build(small_card(vae=TINY_FLUX, max_latent_size=8, vae_posterior="mean"), corpus=CORPUS)
    deterministic.bagel.vae.load_state_dict(model.vae.state_dict())
    with torch.no_grad():
        assert torch.equal(deterministic.bagel.encode_latents(img, torch.Generator().manual_seed(1)), mean)
    assert read_official_arch(deterministic.save_official(tmp_path / "mean")).vae_posterior == "mean"
    with pytest.raises(ConfigError, match="architecture.vae_posterior"):
        BagelAdapter.build(small_card(vae_posterior="mode"), corpus=CORPUS)


def test_flux_autoencoder_at_the_official_size_has_flux_s_key_set():
    with torch.device("meta"):
        ae = FluxAutoencoder(FluxAEConfig())
    keys = set(ae.state_dict())
    assert ae.downsample == 8 and ae.z_channels == 16
    assert "decoder.up.3.upsample.conv.weight" in keys and "decoder.up.3.block.2.conv1.weight" in keys
    assert "encoder.down.3.block.1.conv2.weight" in keys and "encoder.down.1.block.0.nin_shortcut.weight" in keys
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    with pytest.raises(ConfigError, match="not divisible by norm_groups"):
        build_autoencoder({"kind": "flux", "ch": 24})
    with pytest.raises(ConfigError, match="unknown key"):
        build_autoencoder({"kind": "flux", "channels": 24})


# -- (5) variable-size images -----------------------------------------------------------------------
def test_variable_size_images_pack_and_match_single_image_features():
    torch.manual_seed(0)
    adapter = BagelAdapter.build(small_card(), corpus=CORPUS)
    model = adapter.model.eval()
    a, b = torch.rand(3, 32, 16), torch.rand(3, 16, 24)  # patch 8: 4x2 = 8 and 2x3 = 6 tokens
    with torch.no_grad():
        packed = model.vit_tokens([a, b])
        alone_a, alone_b = model.vit_tokens([a]), model.vit_tokens([b])
    assert packed.shape == (14, model.arch.llm.hidden_size)
    torch.testing.assert_close(packed[:8], alone_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[8:], alone_b, rtol=1e-5, atol=1e-6)
    # attention is per image: changing one image leaves the other's features alone
    with torch.no_grad():
        other = model.vit_tokens([a, torch.rand(3, 16, 24)])
    torch.testing.assert_close(other[:8], packed[:8], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other[8:], packed[8:])

    # through collate: two images of different sizes in one batch, each with its own token count
    loader = ImageLoader(32, variable=(8, 32, 8))
    exs = [Example("vqa", [Segment("image", "user", pixels=img), Segment("text", "user", "what is it?")])
           for img in (a, b)]
    batch = collate(exs, adapter.tokenizer, loader, vit_tokens=lambda img: model.vit_token_count(img.shape[-2:]),
                    gen_tokens=adapter.gen_tokens, max_text_tokens=16)
    assert isinstance(batch.vit_pixels, list) and [tuple(p.shape) for p in batch.vit_pixels] == [(3, 32, 16), (3, 16, 24)]
    assert batch.is_vit.sum(dim=1).tolist() == [8, 6]
    with torch.no_grad():
        embeds = model.embed(batch, None)
    torch.testing.assert_close(embeds[0][batch.is_vit[0]], alone_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds[1][batch.is_vit[1]], alone_b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of the ViT patch size"):
        model.vit_tokens([torch.rand(3, 20, 16)])


def test_variable_loader_keeps_aspect_ratio_on_the_patch_grid():
    loader = ImageLoader(980, variable=(224, 980, 14))
    assert loader.target_size(2000, 1000) == (980, 490)
    assert loader.target_size(100, 300) == (224, 672)
    assert all(side % 14 == 0 for side in loader.target_size(517, 333))
    assert ImageLoader(32).target_size(100, 7) == (32, 32)


def test_vit_sdpa_packing_equals_a_block_diagonal_mask():
    """The grouped SDPA is exactly attention under a block-diagonal mask over the packed sequence."""
    torch.manual_seed(0)
    model = BagelAdapter.build(small_card(), corpus=CORPUS).model.eval()
    attn = model.vit_model.vision_model.encoder.layers[0].self_attn
    from cmrp.backbones.bagel.siglip import PackedImages

    seqlens = [5, 3, 5]
    x = torch.randn(13, model.arch.vit.hidden_size)
    with torch.no_grad():
        got = attn(x, PackedImages(seqlens))
        h, hd = attn.num_heads, x.shape[1] // attn.num_heads
        q, k, v = (p(x).view(13, h, hd).transpose(0, 1)[None] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        ids = torch.repeat_interleave(torch.arange(3), torch.tensor(seqlens))
        mask = ids[:, None] == ids[None, :]
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ref = attn.out_proj(ref[0].transpose(0, 1).reshape(13, -1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_adapter_packs_understood_images_at_their_own_aspect_ratio(tmp_path):
    """`architecture.vit_resize`: understood images keep their aspect ratio (token count per image follows
    its size), images to generate keep the fixed size, and an example scores the same in a mixed batch as
    alone (each image attends only to itself)."""
    from PIL import Image

    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.data.tasks import Example, Segment
    from tests.unit.test_bagel import CORPUS, small_card

    torch.manual_seed(0)
    adapter = BagelAdapter.build(small_card(vit_resize=[16, 32]), corpus=CORPUS)
    adapter.model.eval()
    paths = {}
    for name, size in (("wide", (32, 16)), ("square", (40, 40)), ("target", (20, 20))):
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", size, (200, 30, 30)).save(paths[name])
    patch = adapter.arch.vit.patch_size

    def vqa(path):
        return Example("vqa", [Segment("image", "user", image=path), Segment("text", "user", "what colour?"),
                               Segment("text", "character", "red", train=True)])

    t2i = Example("t2i", [Segment("text", "user", "draw me"),
                          Segment("image", "character", image=paths["target"], generate=True, train=True)])
    batch = adapter.collate([vqa(paths["wide"]), vqa(paths["square"]), t2i])
    assert isinstance(batch.vit_pixels, list)
    assert [tuple(img.shape[-2:]) for img in batch.vit_pixels] == [(16, 32), (32, 32)]  # H x W, patch multiples
    assert batch.is_vit.sum(1).tolist() == [(16 // patch) * (32 // patch), (32 // patch) ** 2, 0]
    assert tuple(batch.vae_pixels.shape[-2:]) == (adapter.image_size, adapter.image_size)
    losses = adapter.losses(batch)
    assert torch.isfinite(losses["text"]) and torch.isfinite(losses["image"])
    together = adapter.score_text([vqa(paths["wide"]), vqa(paths["square"])])
    alone = torch.cat([adapter.score_text([vqa(paths["wide"])]), adapter.score_text([vqa(paths["square"])])])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_the_7b_card_generates_1024_px_and_understands_up_to_980():
    """The official model understands images of at most 980 px (SigLIP, 14-px patches) and generates 1024 px
    (64 latent patches of 2 x 8 px): one size for both would make every generated image fail the VAE."""
    from cmrp.perf.model import meta_adapter

    card = OmegaConf.to_container(OmegaConf.load(ROOT / "backbones" / "bagel-7b-mot.yaml"))
    adapter = meta_adapter(card)
    assert adapter.image_size == 1024 and adapter.arch.vit.image_size == 980
    assert adapter._latent_chw == (16, 128, 128) and adapter.gen_tokens == 64 * 64
    card["architecture"].pop("gen_image_size")
    with pytest.raises(ConfigError, match=r"architecture\.vit\.image_size \(gen_image_size unset\).*980 px must be "
                                          r"a multiple of 16"):
        meta_adapter(card)


def test_a_bad_generation_size_names_its_key():
    for side, why in ((60, "a multiple of 8"), (72, "at most 64")):
        with pytest.raises(ConfigError, match=rf"architecture\.gen_image_size: .*{side} px .*{why}"):
            BagelAdapter.build(small_card(vae=TINY_FLUX, max_latent_size=8, gen_image_size=side), corpus=CORPUS)


def test_an_official_folder_without_cmrp_settings_generates_at_the_largest_latent_grid(official_dir, tmp_path):
    """A released folder carries no generation size: the official inferencer's default is the largest image
    the latent position table holds (1024 px for BAGEL-7B)."""
    _, path = official_dir
    copy = _copy_folder(path, tmp_path / "release")
    (copy / "cmrp_bagel.json").unlink()
    arch = read_official_arch(copy)
    assert arch.gen_image_size == arch.max_latent_size * arch.latent_patch_size * 2 ** (len(TINY_FLUX["ch_mult"]) - 1)
    assert arch.gen_image_size == 8 * 2 * 4
