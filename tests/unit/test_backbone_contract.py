"""The backbone contract, run on every registered backbone through its tiny card.

The toolkit's promise is that a recipe switches backbone by changing one line, so every adapter must
behave the same through the protocol: text and image losses that train, `sample_images` shapes,
log-probs that GRPO can recompute exactly, LoRA that only trains adapter weights, and one GRPO
iteration through `CharacterGRPOModule`. Every backbone (built-in or plugin) is found in the registry, its
tiny card in `backbones/*-tiny.yaml` by the card's `adapter`; a registered backbone without one fails here.
Each adapter has exactly the protocol's signatures (a keyword it does not declare is a TypeError), and
a capability it lacks is one clear error from `require`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from cmrp.backbones.protocol import (
    Backbone,
    SupportsFSDP,
    SupportsGradientCheckpointing,
    SupportsThink,
    image_loss,
    require,
    supporting,
    text_loss,
)
from cmrp.data.tasks import Example, ImagePrompt, Segment
from cmrp.errors import ConfigError
from cmrp.registry import BACKBONES
from cmrp.sampling.spec import SamplerSpec

ROOT = Path(__file__).resolve().parents[2]
# adapter name -> its tiny card, found rather than listed: a new backbone's card is picked up by its file name
TINY_CARDS = {yaml.safe_load(card.read_text())["adapter"]: card.stem
              for card in sorted((ROOT / "backbones").glob("*-tiny.yaml"))}
CORPUS = ["hello there, I am a tiny test creature", "what colour is it? it is red", "draw me on the beach",
          "You are Rex. Stay in character.", "my favourite food is plum"] * 4
NAMES = BACKBONES.names()


def test_every_registered_backbone_has_a_tiny_card():
    assert NAMES, "no backbone registered"
    missing = [name for name in NAMES if name not in TINY_CARDS]
    assert not missing, f"registered backbones without a backbones/*-tiny.yaml card naming them: {missing}"
    assert {"bagel", "janus", "showo"} <= set(TINY_CARDS), TINY_CARDS  # the glob finds the shipped cards


def tiny_adapter(name: str, seed: int = 0):
    from cmrp.config.loader import load_backbone_card

    if name not in TINY_CARDS:
        pytest.fail(f"backbone {name!r} is registered but no backbones/*-tiny.yaml card names it")
    card = load_backbone_card(TINY_CARDS[name])
    assert card.adapter == name, f"{TINY_CARDS[name]}.yaml names adapter {card.adapter!r}, not {name!r}"
    torch.manual_seed(seed)
    adapter = BACKBONES.get(name).build(card, corpus=CORPUS)
    for _, module in adapter.model.named_modules():  # a zero-initialised output head would hide bugs
        if module.__class__.__name__ == "Linear" and module.weight.abs().max() == 0:
            torch.nn.init.normal_(module.weight, std=0.02)
    return adapter


@pytest.fixture(params=NAMES)
def adapter(request):
    return tiny_adapter(request.param)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("contract-imgs")
    paths = []
    for i, colour in enumerate([(230, 30, 30), (20, 120, 240), (20, 200, 40)]):
        p = d / f"{i}.png"
        img = Image.new("RGB", (48, 48), colour)
        img.paste((250, 250, 250), (8 * i, 8, 8 * i + 20, 28))  # some structure for the image tokens
        img.save(p)
        paths.append(p)
    return paths


def text(role: str, body: str, train: bool = False) -> Segment:
    return Segment("text", role, body, train=train)


def text_examples() -> list[Example]:
    return [
        Example("chat", [text("system", "You are Rex. Stay in character."), text("user", "hello there"),
                         text("character", "hi, I am a tiny test creature", True)]),
        Example("knowledge_qa", [text("user", "what is your favourite food?"), text("character", "plum", True)]),
    ]


def image_examples(paths: list[Path]) -> list[Example]:
    return [Example("t2i", [text("user", prompt), Segment("image", "character", image=p, generate=True, train=True)])
            for prompt, p in zip(["draw me on the beach", "what colour is it", "hello there"], paths, strict=True)]


def train_steps(adapter, batch, key: str, steps: int = 6, lr: float = 3e-3) -> list[float]:
    """Loss `key` on a fixed batch before each of `steps` Adam steps (randomness of the loss fixed)."""
    optimizer = torch.optim.Adam([p for p in adapter.model.parameters() if p.requires_grad], lr=lr)
    values = []
    adapter.model.train()
    for _ in range(steps):
        torch.manual_seed(1)  # e.g. a flow loss's timesteps and noise: the same objective every step
        loss = adapter.losses(batch)[key]
        values.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return values


def test_text_loss_is_finite_and_decreases(adapter):
    batch = adapter.collate(text_examples())
    values = train_steps(adapter, batch, "text")
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < 0.9 * values[0], values
    torch.manual_seed(2)
    single = float(text_loss(adapter, batch).detach())
    torch.manual_seed(2)
    assert single == pytest.approx(float(adapter.losses(batch)["text"].detach()), rel=1e-5)


def test_image_loss_is_finite_and_decreases(adapter, images):
    batch = adapter.collate(image_examples(images))
    values = train_steps(adapter, batch, "image")
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < 0.95 * values[0], values
    text_only = adapter.collate(text_examples())
    zero = image_loss(adapter, text_only)  # nothing to train on: zero, but still in the graph
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def contexts() -> list[Example]:
    return [Example("t2i", [text("user", "draw me on the beach")]),
            Example("t2i", [text("system", "You are Rex. Stay in character."), text("user", "hello there"),
                            text("character", "hi, I am a tiny test creature")])]


def test_sample_images_shape_and_groups(adapter):
    adapter.model.eval()
    rollout = adapter.sample_images(contexts(), SamplerSpec(steps=4), n=3, seed=0)
    size = adapter.image_size
    assert rollout.images.shape == (6, 3, size, size)
    assert rollout.images.dtype == torch.float32 and rollout.images.device.type == "cpu"
    assert 0.0 <= float(rollout.images.min()) and float(rollout.images.max()) <= 1.0
    assert rollout.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and len(rollout) == 6
    assert rollout.num_steps == 0  # no window: nothing stored
    again = adapter.sample_images(contexts(), SamplerSpec(steps=4), n=3, seed=0)
    assert torch.equal(again.images, rollout.images)  # seeded


def test_recomputed_logprobs_equal_recorded_ones(adapter):
    adapter.model.eval()
    rollout = adapter.sample_images(contexts(), SamplerSpec(steps=4, noise=0.7, window=(1, 3)), n=2, seed=3)
    assert rollout.num_steps == 2 and rollout.logprobs.shape == (4, 2)
    assert torch.isfinite(rollout.logprobs).all()
    for k in range(2):
        with torch.no_grad():
            again = adapter.rollout_logprob(rollout, k)
        assert torch.allclose(again.cpu(), rollout.logprobs[:, k], atol=1e-4), (k, again, rollout.logprobs[:, k])
    sub = torch.tensor([3, 0])
    with torch.no_grad():
        current = adapter.rollout_logprob(rollout, 1, sub, return_mean=True)
    assert torch.allclose(current[0].cpu(), rollout.logprobs[sub, 1], atol=1e-4)
    kl = rollout.step_kl(current, current)  # a policy against itself
    assert kl.shape == (2,) and torch.allclose(kl, torch.zeros(2), atol=1e-6)
    # recomputation carries gradients to the trainable weights (GRPO's new policy)
    logp = adapter.rollout_logprob(rollout, 0, sub)
    logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.model.parameters())


def test_lora_changes_only_adapter_weights(adapter, images):
    from cmrp.training.peft import apply_finetune

    apply_finetune(adapter, OmegaConf.create({"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                              "targets": "default"}))
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = adapter.collate(text_examples() + image_examples(images)[:1])
    optimizer = torch.optim.Adam([p for p in adapter.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        torch.manual_seed(1)
        losses = adapter.losses(batch)
        optimizer.zero_grad()
        (losses["text"] + losses["image"]).backward()
        optimizer.step()
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "LoRA training changed nothing"
    assert all("lora_" in n for n in changed), sorted(n for n in changed if "lora_" not in n)[:5]
    # every LoRA target set the adapter names selects at least one module
    for kind in ("default", "generation", "understanding"):
        assert adapter.lora_targets(kind)


def test_one_grpo_iteration_through_the_protocol(adapter):
    """CharacterGRPOModule on this backbone: on-policy ratio 1, KL term finite, only the generation
    group trained."""
    import re

    import lightning as L
    from torch.utils.data import DataLoader

    from cmrp.config.schema import GRPOConfig
    from cmrp.rewards import build_reward
    from cmrp.training.grpo import CharacterGRPOModule
    from cmrp.training.peft import apply_finetune

    apply_finetune(adapter, OmegaConf.create({"mode": "full"}))
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    cfg = OmegaConf.structured(GRPOConfig)
    cfg.merge_with({"max_steps": 1, "prompts_per_step": 1, "group_size": 4, "sample_steps": 4, "window_size": 2,
                    "minibatch_size": 4, "kl_beta": 0.1, "reward_workers": 1, "clip_range": 0.2,
                    "optimizer": {"lr": 1e-3}})
    reward = build_reward({"name": "b", "terms": {"brightness": {"weight": 1.0, "kwargs": {}}}}, parallel=False)
    module = CharacterGRPOModule(adapter, reward, cfg, seed=0)
    prompts = [ImagePrompt(contexts()[0], "draw me on the beach")]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(prompts, batch_size=1, collate_fn=list))
    log = module.last_log
    assert abs(log["grpo/ratio_mean"] - 1.0) < 1e-3 and math.isfinite(log["grpo/kl"]) and log["grpo/kl"] >= 0
    gen = re.compile("|".join(adapter.trainable_groups()["generation"]))
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(gen.fullmatch(n) for n in changed), sorted(changed)[:5]


@pytest.fixture(scope="module")
def character(tmp_path_factory):
    from cmrp.sandbox import make_character

    return make_character(3, n_reference_images=2, n_scenes=6, out_dir=tmp_path_factory.mktemp("contract-char"))


def test_chain_and_joint_decoding_train_and_sample(adapter, character):
    """`decoding: chain | joint` only changes what an image is conditioned on; every backbone trains on
    and samples from both kinds of context."""
    from cmrp.data.tasks import build_examples, image_prompts

    adapter.model.eval()
    lengths = {}
    dialogue = [i for i, p in enumerate(image_prompts(character, decoding="chain")) if len(p.context.segments) > 1]
    assert dialogue, "the sandbox character has no dialogue turn with an image"
    for decoding in ("chain", "joint"):
        t2i = build_examples(character, ["t2i"], decoding=decoding)["t2i"][:2]
        torch.manual_seed(1)
        with torch.no_grad():
            loss = adapter.losses(adapter.collate(t2i))["image"]
        assert torch.isfinite(loss) and float(loss) > 0, decoding
        prompt = image_prompts(character, decoding=decoding)[dialogue[0]]
        lengths[decoding] = len(prompt.context.segments)
        rollout = adapter.sample_images([prompt.context], SamplerSpec(steps=2), n=2, seed=0)
        assert rollout.images.shape == (2, 3, adapter.image_size, adapter.image_size)
    assert lengths["chain"] == lengths["joint"] + 1  # chain also conditions on the reply text


# -- the typed contract ------------------------------------------------------------------------------------
CAPABILITIES = {SupportsThink: "think_and_sample", SupportsFSDP: "fsdp_wrap_modules",
                SupportsGradientCheckpointing: "set_gradient_checkpointing"}


def _parameters(fn) -> list[tuple[str, object]]:
    import inspect

    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_adapters_have_the_protocols_signatures(adapter):
    """Structural, not just "has the attribute": every protocol method (and every capability the adapter has)
    takes the protocol's parameters in the protocol's kinds; an adapter's own extra parameters have defaults,
    and no `**kwargs` swallows a misspelt keyword."""
    import inspect

    assert isinstance(adapter, Backbone) and isinstance(adapter.image_size, int)
    protocols = [Backbone, *(c for c in CAPABILITIES if isinstance(adapter, c))]
    for proto in protocols:
        for name in (n for n in vars(proto) if not n.startswith("_") and callable(getattr(proto, n))):
            ours = inspect.signature(getattr(type(adapter), name)).parameters
            declared = _parameters(getattr(proto, name))
            have = [(n, p.kind) for n, p in ours.items() if n in dict(declared)]
            assert have == declared, f"{type(adapter).__name__}.{name}: {have} != protocol {declared}"
            extra = [p for n, p in ours.items() if n not in dict(declared) and n not in ("self", "cls")]
            assert all(p.default is not p.empty for p in extra), (name, extra)
            assert not any(p.kind is p.VAR_KEYWORD for p in ours.values()), f"{name} has **kwargs"


def test_a_wrong_keyword_is_a_type_error(adapter, images):
    adapter.model.eval()
    spec = SamplerSpec(steps=2)
    with pytest.raises(TypeError, match="cfg_scale"):
        adapter.sample_images(contexts(), spec, cfg_scale=2.0)  # guidance belongs in the spec
    with pytest.raises(TypeError, match="steps"):
        adapter.sample_images(contexts(), steps=2)
    with pytest.raises(TypeError, match="timestep_shfit"):
        adapter.losses(adapter.collate(text_examples()), timestep_shfit=1.0)
    with pytest.raises(TypeError, match="max_tokens"):
        adapter.generate_text(contexts(), max_tokens=2)
    if isinstance(adapter, SupportsThink):
        with pytest.raises(TypeError, match="noise"):
            adapter.think_and_sample(contexts(), spec, noise=0.5)


def test_require_is_one_line_naming_the_feature_and_the_backbones_that_have_it(adapter):
    for capability, method in CAPABILITIES.items():
        have = supporting(capability)
        if isinstance(adapter, capability):
            assert require(adapter, capability, feature="x") is adapter
            continue
        with pytest.raises(ConfigError) as err:
            require(adapter, capability, feature="decoding: think")
        message = str(err.value)
        assert "\n" not in message and message.startswith("decoding: think needs a backbone with " + method)
        assert type(adapter).__name__ in message and all(name in message for name in have), message


def test_capabilities_of_the_built_in_backbones():
    """What the recipes rely on: think decoding on BAGEL and Janus, FSDP and gradient checkpointing on all."""
    assert supporting(SupportsThink) == ["bagel", "janus"]
    assert supporting(SupportsFSDP) == supporting(SupportsGradientCheckpointing) == ["bagel", "janus", "showo"]
