"""Chat sessions (history, chain vs joint image conditioning, image files, transcript) and the character
pool's adapter hot-swap on one tiny BAGEL base."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cmrp.chat.session import CharacterInfo, ChatSession, parse_user_line
from cmrp.sampling.spec import SamplerSpec


class FakeBackbone:
    """Records the contexts it is given; replies "reply <n>" and draws a flat image of value n/10."""

    def __init__(self):
        self.text_calls, self.image_calls = [], []

    def generate_text(self, contexts, *, max_new_tokens=64, temperature=0.0, seed=0):
        self.text_calls.append((contexts, max_new_tokens, temperature, seed))
        return [f"reply {len(self.text_calls)}" for _ in contexts]

    def sample_images(self, contexts, spec, *, n=1, seed=0):
        self.image_calls.append((contexts, n, spec.steps, seed))
        return SimpleNamespace(images=torch.full((len(contexts) * n, 3, 8, 8), len(self.image_calls) / 10))


def texts(example):
    return [(s.role, s.text) for s in example.segments]


def test_parse_user_line():
    assert parse_user_line("/image draw me  ") == ("draw me", True)
    assert parse_user_line("/image") == ("", True)
    assert parse_user_line("hello /image") == ("hello /image", False)
    assert parse_user_line("/imagery") == ("/imagery", False)


@pytest.mark.parametrize("decoding, sees_reply", [("chain", True), ("joint", False)])
def test_history_and_image_conditioning(tmp_path, decoding, sees_reply):
    fake = FakeBackbone()
    chat = ChatSession(fake, CharacterInfo("Mo"), decoding=decoding, image_steps=3, seed=5, out_dir=tmp_path)
    first = chat.reply("hi")
    assert first.text == "reply 1" and first.image_path is None and not fake.image_calls
    second = chat.reply("draw me", image=True)
    context = texts(fake.text_calls[1][0][0])
    assert context == [("system", "You are Mo. Stay in character."), ("user", "hi"), ("character", "reply 1"),
                       ("user", "draw me")]
    image_context, n, steps, seed = fake.image_calls[0]
    expected = context + ([("character", "reply 2")] if sees_reply else [])
    assert texts(image_context[0]) == expected and image_context[0].task == "t2i"
    assert (n, steps, seed) == (1, 3, 5 + 2)
    assert second.image_path == tmp_path / "image-0001.png"
    from PIL import Image

    with Image.open(second.image_path) as img:
        assert img.size == (8, 8) and img.getpixel((0, 0)) == (26, 26, 26)  # 0.1 * 255 rounded


def test_reset_save_and_increasing_image_names(tmp_path):
    (tmp_path / "image-0007.png").write_bytes(b"")  # an earlier session's image is never overwritten
    fake = FakeBackbone()
    chat = ChatSession(fake, CharacterInfo("Mo"), out_dir=tmp_path)
    a = chat.reply("one", image=True)
    chat.reset()
    b = chat.reply("two", image=True)
    assert (a.image_path.name, b.image_path.name) == ("image-0008.png", "image-0009.png")
    assert texts(fake.text_calls[1][0][0]) == [("system", "You are Mo. Stay in character."), ("user", "two")]
    saved = json.loads(chat.save(tmp_path / "t" / "transcript.json").read_text())
    assert saved["character"] == "Mo" and saved["decoding"] == "chain"
    assert saved["turns"] == [{"role": "user", "text": "two"},
                              {"role": "character", "text": "reply 2", "image": str(b.image_path)}]


def test_history_window_keeps_the_system_prompt():
    fake = FakeBackbone()
    chat = ChatSession(fake, CharacterInfo("Mo"), max_history_turns=3)
    for k in range(4):
        chat.reply(f"m{k}")
    assert texts(fake.text_calls[-1][0][0]) == [("system", "You are Mo. Stay in character."), ("user", "m2"),
                                                ("character", "reply 3"), ("user", "m3")]


# -- several LoRA characters on one base ----------------------------------------------------------------
def _lora_character(base_dir, out, name, seed):
    from omegaconf import OmegaConf

    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.chat.artefact import CARD_FILE, CARD_FORMAT, file_sha256
    from cmrp.training.peft import apply_finetune, save_adapter

    adapter = BagelAdapter.from_pretrained(base_dir)
    apply_finetune(adapter, OmegaConf.create({"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                              "targets": "default"}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in adapter.model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_adapter(adapter.model, out / "adapter")
    card = {"format": CARD_FORMAT, "name": name, "profile": f"{name} test profile", "decoding": "chain",
            "kind": "lora", "base": {"path": str(base_dir), "sha256": file_sha256(base_dir / "model.safetensors")}}
    (out / CARD_FILE).write_text(json.dumps(card))
    return out


def _outputs(backbone):
    from cmrp.data.tasks import Example, Segment

    ctx = [Example("chat", [Segment("text", "system", "You are X."), Segment("text", "user", "hello there")])]
    with torch.no_grad():
        text = backbone.generate_text(ctx, max_new_tokens=8)[0]
        image = backbone.sample_images([Example("t2i", ctx[0].segments)], SamplerSpec(steps=2), n=1, seed=3).images[0]
    return text, image


def test_pool_hot_swaps_adapters_like_each_alone(tmp_path):
    from peft import PeftModel

    from cmrp.backbones.bagel import BagelAdapter
    from cmrp.chat.artefact import CharacterPool, load_character
    from cmrp.errors import ConfigError
    from tests.unit.test_bagel import CORPUS, small_card

    torch.manual_seed(0)
    base = BagelAdapter.build(small_card(), corpus=CORPUS)
    torch.nn.init.normal_(base.model.llm2vae.weight, std=0.05)
    base_dir = base.save_pretrained(tmp_path / "base")
    arts = {name: _lora_character(base_dir, tmp_path / name, name, seed) for name, seed in (("Ann", 1), ("Bob", 2))}
    alone = {name: _outputs(load_character(path, merge=False)[0]) for name, path in arts.items()}
    assert alone["Ann"][0] != alone["Bob"][0] or not torch.allclose(alone["Ann"][1], alone["Bob"][1])
    assert not torch.allclose(alone["Ann"][1], alone["Bob"][1], atol=1e-4)

    pool = CharacterPool(base_dir)
    for path in arts.values():
        pool.add(path)
    assert isinstance(pool.backbone.model, PeftModel)
    assert sorted(pool.backbone.model.peft_config) == ["Ann", "Bob"]
    for name in ("Ann", "Bob", "Ann", "Bob"):  # switched per request, each as it is alone
        text, image = _outputs(pool.view(name))
        assert text == alone[name][0]
        assert torch.allclose(image, alone[name][1], atol=1e-5)
        assert pool.active == name
    reply = pool.reply("Bob", "hello there")
    assert pool.session("Bob").character.name == "Bob" and isinstance(reply.text, str)
    assert pool.session("Ann").turns == []  # each character keeps its own conversation
    with pytest.raises(ConfigError, match="no character 'Cid'"):
        pool.reply("Cid", "hi")


def test_pool_view_switches_the_adapter_for_every_method_even_new_ones():
    """The view wraps every method the backbone has (no list of names to keep in step with the protocol):
    a method added later still runs under the view's character; plain attributes pass through."""
    from cmrp.chat.artefact import CharacterPool, _AdapterView

    class Backbone(FakeBackbone):
        image_size = 8

        def brand_new_method(self, x):
            return (pool.active, x)

    pool = CharacterPool.__new__(CharacterPool)  # the switching logic alone: no base model on disk
    pool.backbone, pool.characters, pool.active = Backbone(), {"Ann": None, "Bob": None}, None
    switched = []
    pool.activate = lambda name: (switched.append(name), setattr(pool, "active", name))
    ann, bob = _AdapterView(pool, "Ann"), _AdapterView(pool, "Bob")
    assert bob.brand_new_method(1) == ("Bob", 1) and ann.brand_new_method(2) == ("Ann", 2)
    ann.generate_text([], max_new_tokens=2)
    bob.sample_images([], SimpleNamespace(steps=2))
    assert switched == ["Bob", "Ann", "Ann", "Bob"]
    assert ann.image_size == 8 and switched[-1] == "Bob"  # reading an attribute switches nothing
