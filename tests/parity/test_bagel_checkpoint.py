"""BAGEL golden tests, part 1: the official checkpoint layout in both directions, the tokenizer, the VAE.

The fixtures (tests/fixtures/parity/bagel/) were written by the official BAGEL code (see its README and
tests/parity/make_references_bagel.py); the other test_bagel_*.py files import the helpers defined here.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from cmrp.backbones.bagel import BagelAdapter
from cmrp.data.tasks import Segment
from tests.parity._compare import assert_matches

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "bagel"
CHECKPOINT = FIXTURES / "checkpoint"
MODEL = "BAGEL"
# understood images keep their size (16..32 px sides, as the reference's ViT transform does)
CARD = {"name": "bagel-parity", "adapter": "bagel", "architecture": {"vit_resize": [16, 32]}}


@functools.cache
def reference() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) the official code produced."""
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "reference.safetensors")), json.loads((FIXTURES / "reference.json").read_text())


@functools.cache
def official_adapter() -> BagelAdapter:
    """The official checkpoint, loaded by cmrp."""
    adapter = BagelAdapter.from_pretrained(CHECKPOINT, card=CARD)
    adapter.model.eval()
    return adapter


def picture(name: str) -> torch.Tensor:
    """A reference image as [3, H, W] in [0, 1] (8-bit values / 255, as torchvision's ToTensor)."""
    return reference()[0][f"images/{name}"].permute(2, 0, 1).float() / 255


def segment(item: dict, role: str = "user") -> Segment:
    """An official interleaved input ({"text": ...} or {"image": name}) as a segment."""
    if "image" in item:
        return Segment("image", role, pixels=picture(item["image"]))
    return Segment("text", role, item["text"])


# -- strict loading, both directions ------------------------------------------------------------------
def test_official_checkpoint_loads_strictly_and_unchanged():
    from safetensors.torch import load_file

    adapter = official_adapter()
    ours = adapter.bagel.state_dict()
    ema = load_file(str(CHECKPOINT / "ema.safetensors"))
    assert set(ema) == set(ours)  # nothing missing, nothing unexpected
    for key, value in ema.items():
        assert_matches(MODEL, "strict loading of the official folder: ema.safetensors tensors", ours[key], value.float())
    ae = load_file(str(CHECKPOINT / "ae.safetensors"))
    vae = adapter.bagel.vae.state_dict()
    assert set(ae) == set(vae)
    for key, value in ae.items():
        assert_matches(MODEL, "strict loading of the official folder: ae.safetensors tensors", vae[key], value)
    arch = adapter.arch
    assert (arch.vit.num_hidden_layers, arch.max_latent_size, arch.vit_max_num_patch_per_side) == (2, 8, 4)
    assert arch.vae["kind"] == "flux" and arch.vae["z_channels"] == 4 and arch.latent_patch_size == 2


def test_save_official_writes_what_the_official_code_loads(tmp_path):
    """What `save_official` writes has the official file set, key names, shapes and config values, and its
    tokenizer files (vocab.json + merges.txt + tokenizer_config.json, read alone) give the official ids."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tensors, meta = reference()
    saved = official_adapter().save_official(tmp_path / "saved")
    for name in ("ema.safetensors", "ae.safetensors"):
        with safe_open(str(CHECKPOINT / name), "pt") as a, safe_open(str(saved / name), "pt") as b:
            assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")
    read = {"llm_config.json": (*sizes, "vocab_size", "num_key_value_heads", "rope_theta", "rms_norm_eps",
                                "max_position_embeddings", "tie_word_embeddings"),
            "vit_config.json": (*sizes, "image_size", "patch_size", "num_channels", "layer_norm_eps")}
    for name, keys in read.items():  # the values the official loaders read from these files
        official, ours = (json.loads((d / name).read_text()) for d in (CHECKPOINT, saved))
        assert {k: ours.get(k) for k in keys} == {k: official[k] for k in keys}, name
    only_bpe = tmp_path / "qwen2_files"
    only_bpe.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(saved / name, only_bpe / name)
    qwen2 = AutoTokenizer.from_pretrained(str(only_bpe), local_files_only=True)
    assert type(qwen2).__name__.startswith("Qwen2Tokenizer")
    for i, text in enumerate(meta["tokenizer"]["texts"]):
        assert_matches(MODEL, "tokenizer: save_official's files (Qwen2Tokenizer) vs official ids",
                       torch.tensor(qwen2.encode(text, add_special_tokens=False)), tensors[f"tokenizer/{i}"])
    markers = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    assert_matches(MODEL, "tokenizer: save_official's special token ids", torch.tensor(
        qwen2.convert_tokens_to_ids(markers)), tensors["tokenizer/special"])
    again = BagelAdapter.from_pretrained(saved).bagel.state_dict()
    for key, value in official_adapter().bagel.state_dict().items():
        assert_matches(MODEL, "save_official: tensors read back", again[key], value)


def test_save_official_refuses_a_tokenizer_the_official_code_would_read_differently(tmp_path):
    from cmrp.backbones.tokenizer import TextTokenizer
    from cmrp.errors import WeightsError

    adapter = BagelAdapter(official_adapter().bagel, TextTokenizer.train_bpe(["hello 123 there"], 300), CARD)
    with pytest.raises(WeightsError, match="Qwen2's pre-tokenization"):
        adapter.save_official(tmp_path / "saved")


def test_tokenizer_ids_are_the_official_ones():
    tensors, meta = reference()
    tok = official_adapter().tokenizer
    for i, text in enumerate(meta["tokenizer"]["texts"]):
        assert_matches(MODEL, "tokenizer: token ids", torch.tensor(tok.encode(text)), tensors[f"tokenizer/{i}"])
    assert_matches(MODEL, "tokenizer: special token ids (bos, eos, image start/end)", torch.tensor(
        [tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image]), tensors["tokenizer/special"])


# -- the VAE ---------------------------------------------------------------------------------------------
def test_vae_round_trip_samples_the_posterior_like_the_official_encoder():
    tensors, meta = reference()
    vae = official_adapter().bagel.vae
    with torch.no_grad():
        z = vae.encode(picture(meta["vae"]["image"])[None], sample=True,
                       generator=torch.Generator().manual_seed(meta["vae"]["seed"]))
        decoded = vae.decode(tensors["vae/latent"])
    assert_matches(MODEL, "VAE encode (posterior sample, same noise)", z, tensors["vae/latent"])
    assert_matches(MODEL, "VAE decode", decoded, (tensors["vae/decoded"] * 0.5 + 0.5).clamp(0, 1))
