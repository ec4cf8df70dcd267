"""BAGEL numerics at tiny size: MoT routing, attention-mask semantics, guidance (text + image CFG, interval,
renorm), the flow-matching target, on-policy log-probs under guidance, and think mode."""

from __future__ import annotations

import math

import pytest
import torch

from cmrp.backbones.bagel import BagelAdapter
from cmrp.backbones.bagel.model import patchify
from cmrp.data.tasks import Example, Segment
from cmrp.sampling.guidance import Guidance, combine_guidance, guidance_active
from cmrp.sampling.spec import SamplerSpec, recipe_sampling_settings
from tests.unit.test_bagel import CORPUS, small_card


@pytest.fixture(scope="module")
def adapter() -> BagelAdapter:
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(), corpus=CORPUS)
    torch.nn.init.normal_(a.model.llm2vae.weight, std=0.05)
    a.model.eval()
    return a


def text(role, body, train=False):
    return Segment("text", role, body, train=train)


def picture(seed: int) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))


def t2i_with_reply():
    """user text | generated image | character text (trained): text after the image."""
    return Example("t2i", [text("user", "draw me on the beach"),
                           Segment("image", "character", pixels=picture(1), generate=True, train=True),
                           text("character", "here it is", True)])


def hidden_states(adapter, batch, gen_tokens=None):
    model = adapter.model
    if gen_tokens is None:
        gen_tokens = torch.zeros(int(batch.is_gen.sum()), model.arch.llm.hidden_size)
    embeds = model.embed(batch, gen_tokens)
    with torch.no_grad():
        hidden, _ = model.decode_hidden(embeds, batch.is_gen, batch.position_ids, batch.attention_mask)
    return hidden


# -- MoT routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", ["generation", "understanding"])
def test_each_expert_serves_only_its_tokens(expert):
    """Perturbing the last layer's MLP of one expert changes exactly that expert's tokens (an MLP is
    per-token, so in the last layer nothing else can carry the change)."""
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(), corpus=CORPUS)
    a.model.eval()
    batch = a.collate([t2i_with_reply(), Example("chat", [text("user", "hello"), text("character", "hi", True)])])
    gen_tokens = torch.randn(int(batch.is_gen.sum()), a.model.arch.llm.hidden_size)
    before = hidden_states(a, batch, gen_tokens)
    last = a.model.language_model.model.layers[-1]
    mlp = last.mlp_moe_gen if expert == "generation" else last.mlp
    with torch.no_grad():
        mlp.down_proj.weight.add_(torch.randn_like(mlp.down_proj.weight))
    after = hidden_states(a, batch, gen_tokens)
    changed = (after - before).abs().amax(-1) > 1e-6
    mine = batch.is_gen if expert == "generation" else (batch.valid & ~batch.is_gen)
    assert changed[mine].all()
    assert not changed[batch.valid & ~mine].any()


def test_generation_weights_never_touch_text_only_samples():
    torch.manual_seed(0)
    a = BagelAdapter.build(small_card(), corpus=CORPUS)
    a.model.eval()
    batch = a.collate([Example("chat", [text("system", "You are Rex."), text("user", "hello")])])
    before = hidden_states(a, batch)
    with torch.no_grad():
        for name, p in a.model.named_parameters():
            if "_moe_gen" in name:
                p.add_(torch.randn_like(p))
    assert torch.equal(hidden_states(a, batch), before)


# -- attention-mask semantics -----------------------------------------------------------------------------
def test_noisy_latents_are_invisible_to_text(adapter):
    batch = adapter.collate([t2i_with_reply()])
    n_gen = int(batch.is_gen.sum())
    g = torch.Generator().manual_seed(0)
    h1 = hidden_states(adapter, batch, torch.randn(n_gen, adapter.model.arch.llm.hidden_size, generator=g))
    h2 = hidden_states(adapter, batch, torch.randn(n_gen, adapter.model.arch.llm.hidden_size, generator=g))
    # the image split = its markers + the latents; the markers belong to it (they attend to the latents)
    split = batch.is_gen | batch.is_gen.roll(1, dims=1) | batch.is_gen.roll(-1, dims=1)
    text_pos = batch.valid & ~split
    assert int(text_pos[0, int(split[0].nonzero()[-1]) + 1:].sum()) > 3  # text after the image is checked
    # the text after the image (and its logits) is the same whatever the noisy latents hold
    assert torch.equal(h1[text_pos], h2[text_pos])
    logits = adapter.model.language_model.lm_head
    assert torch.equal(logits(h1[text_pos]), logits(h2[text_pos]))
    assert (h1[batch.is_gen] - h2[batch.is_gen]).abs().amax() > 1e-3


def test_text_after_an_understood_image_sees_its_vit_tokens(adapter):
    def example(pixels):
        return Example("vqa", [text("user", "look"), Segment("image", "user", pixels=pixels),
                               text("user", "what colour is it?")])

    b1, b2 = adapter.collate([example(picture(2))]), adapter.collate([example(picture(3))])
    h1, h2 = hidden_states(adapter, b1), hidden_states(adapter, b2)
    first_vit = int(b1.is_vit[0].nonzero()[0])
    after = int(b1.is_vit[0].nonzero()[-1]) + 2  # past the image's end marker
    # text before the image cannot see it; text after it does
    assert torch.equal(h1[0, : first_vit - 1], h2[0, : first_vit - 1])
    assert (h1[0, after:] - h2[0, after:]).abs().amax() > 1e-4


# -- guidance maths --------------------------------------------------------------------------------------
V_C = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
V_T = torch.zeros(1, 2, 2)
V_I = torch.ones(1, 2, 2)
# by hand: v_text = 0 + 2 (v_c - 0) = [[2, 0], [0, 2]];  v = 1 + 1.5 (v_text - 1) = [[2.5, -0.5], [-0.5, 2.5]]
GUIDED = torch.tensor([[[2.5, -0.5], [-0.5, 2.5]]])


@pytest.mark.parametrize("renorm,expected", [
    ("none", GUIDED),
    ("global", GUIDED * math.sqrt(2 / 13)),  # |v_c| = sqrt 2, |v| = sqrt(2 * 6.25 + 2 * 0.25) = sqrt 13
    ("channel", GUIDED / math.sqrt(6.5)),  # per token: |v_c| = 1, |v| = sqrt(6.5)
    # text_channel: v_text rescaled per token by |v_c| / |v_text| = 1/2 -> v_c; then 1 + 1.5 (v_c - 1)
    ("text_channel", torch.tensor([[[1.0, -0.5], [-0.5, 1.0]]])),
])
def test_text_and_image_guidance_with_each_renorm(renorm, expected):
    out = combine_guidance(V_C, V_T, V_I, 2.0, 1.5, renorm)
    assert torch.allclose(out, expected, atol=1e-6)


def test_renorm_min_and_never_scaling_up():
    out = combine_guidance(V_C, V_T, V_I, 2.0, 1.5, "global", renorm_min=0.9)
    assert torch.allclose(out, GUIDED * 0.9)  # sqrt(2/13) = 0.39 is clamped up to 0.9
    # a guided velocity shorter than the conditional one is left as it is (factor clamped at 1)
    small = combine_guidance(V_C, 1.5 * V_C, None, 2.0, 1.0, "global")
    assert torch.allclose(small, 0.5 * V_C)


def test_a_text_scale_of_one_switches_all_guidance_off():
    """BAGEL's rule: no guidance at all unless the text scale is > 1, whatever the image scale."""
    assert torch.equal(combine_guidance(V_C, V_T, V_I, 1.0, 1.0, "global"), V_C)
    assert torch.equal(combine_guidance(V_C, V_T, V_I, 1.0, 2.0, "none"), V_C)
    assert not Guidance(1.0, 2.0).enabled and not Guidance(1.0, 2.0).image_enabled and Guidance(1.5, 2.0).image_enabled
    with pytest.raises(ValueError, match="image-free"):
        combine_guidance(V_C, V_T, None, 2.0, 1.5)


def test_image_guidance_without_an_input_image_amplifies_the_text_guidance():
    """No input image: the image-free branch is the conditional one, v = v_c + s_img (v_text - v_c)."""
    out = combine_guidance(V_C, V_T, V_C, 2.0, 1.5, "none")
    assert torch.allclose(out, V_C + 1.5 * (2 * V_C - V_C))


def test_guidance_interval_is_lo_exclusive_hi_inclusive():
    assert not guidance_active(0.4, (0.4, 1.0)) and guidance_active(0.41, (0.4, 1.0))
    assert guidance_active(1.0, (0.4, 1.0)) and not guidance_active(0.2, (0.4, 1.0))
    g = Guidance(4.0, interval=(0.4, 1.0))
    assert g.active(0.9) and not g.active(0.3) and not Guidance().active(0.9)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        Guidance(2.0, renorm_type="local")
    with pytest.raises(ValueError, match=">= 1"):
        Guidance(0.5)


def test_recipe_with_image_guidance_but_text_scale_one_is_rejected():
    from cmrp.config import load_recipe
    from cmrp.errors import ConfigError

    with pytest.raises(ConfigError, match="cfg_img_scale.*cfg_scale > 1"):
        load_recipe("quickstart", ["grpo.cfg_img_scale=1.5"])
    assert load_recipe("quickstart", ["grpo.cfg_img_scale=1.5", "grpo.cfg_scale=2.0"]).grpo.cfg_img_scale == 1.5


def test_recipe_sampling_settings_hold_only_what_is_set():
    from omegaconf import OmegaConf

    from cmrp.config.schema import GRPOConfig

    g = OmegaConf.structured(GRPOConfig)
    assert recipe_sampling_settings(g) == {}
    g.cfg_img_scale = 2.0  # guidance off (text scale 1): nothing of it is kept
    assert recipe_sampling_settings(g) == {}
    g.cfg_scale, g.cfg_img_scale, g.cfg_interval, g.timestep_shift = 4.0, 1.0, [0.4, 1.0], 3.0
    settings = recipe_sampling_settings(g)
    assert settings == {"cfg_scale": 4.0, "cfg_interval": (0.4, 1.0), "timestep_shift": 3.0}
    assert SamplerSpec.from_settings(settings, steps=7) == SamplerSpec(
        steps=7, timestep_shift=3.0, guidance=Guidance(4.0, interval=(0.4, 1.0)))


# -- guidance in the adapter ---------------------------------------------------------------------------------
def with_image_context():
    return Example("t2i", [Segment("image", "user", pixels=picture(5)), text("user", "draw me like this")])


def test_adapter_branches_are_the_official_contexts(adapter):
    """Text-free branch: the context before its last text segment (here the input image alone); image-free:
    every text, no image. Outside the guidance interval the conditional velocity alone."""
    ctx = [with_image_context()]
    guidance = Guidance(3.0, 2.0, (0.5, 1.0), "global", 0.0)
    cache, batch = adapter._encode(ctx, image_output=True)  # noqa: SLF001
    text_free, img_free = adapter._guidance_prefixes(ctx, cache, batch.text_free, guidance)  # noqa: SLF001
    v_fn = adapter._guided_velocity_fn(cache, text_free, img_uncond=img_free, guidance=guidance)  # noqa: SLF001
    x = torch.randn(1, adapter.gen_tokens, adapter.bagel.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    only_image = Example("t2i", [Segment("image", "user", pixels=picture(5))])
    only_text = Example("t2i", [text("user", "draw me like this")])
    with torch.no_grad():
        v_c = adapter._velocity_fn(cache)  # noqa: SLF001
        v_t = adapter._velocity_fn(adapter._encode_prefix([only_image], image_output=True))  # noqa: SLF001
        v_i = adapter._velocity_fn(adapter._encode_prefix([only_text], image_output=True))  # noqa: SLF001
        for t in (0.8, 0.3):
            tt = torch.full((1,), t)
            assert torch.allclose(adapter._velocity_fn(text_free)(x, tt), v_t(x, tt), atol=1e-5)  # noqa: SLF001
            expected = combine_guidance(v_c(x, tt), v_t(x, tt), v_i(x, tt), 3.0, 2.0, "global") if t > 0.5 \
                else v_c(x, tt)  # outside the interval: the conditional velocity alone
            assert torch.allclose(v_fn(x, tt), expected, atol=1e-5), t


def test_text_free_branch_keeps_the_earlier_text_and_image_free_is_the_context(adapter):
    """A dialogue: the text-free branch drops only the last text segment; without input images the
    image-free branch is the conditional prefix itself (same object, computed once)."""
    dialogue = Example("t2i", [text("system", "You are Rex."), text("user", "hello"), text("user", "draw me")])
    earlier = Example("t2i", dialogue.segments[:2])
    guidance = Guidance(3.0, 1.5)
    cache, batch = adapter._encode([dialogue], image_output=True)  # noqa: SLF001
    text_free, img_free = adapter._guidance_prefixes([dialogue], cache, batch.text_free, guidance)  # noqa: SLF001
    assert img_free is cache
    x = torch.randn(1, adapter.gen_tokens, adapter.bagel.patch_latent_dim, generator=torch.Generator().manual_seed(2))
    tt = torch.full((1,), 0.6)
    with torch.no_grad():
        expected = adapter._velocity_fn(adapter._encode_prefix([earlier], image_output=True))(x, tt)  # noqa: SLF001
        assert torch.allclose(adapter._velocity_fn(text_free)(x, tt), expected, atol=1e-5)  # noqa: SLF001
        v_c = adapter._velocity_fn(cache)(x, tt)  # noqa: SLF001
        guided = adapter._guided_velocity_fn(cache, text_free, img_uncond=img_free, guidance=guidance)(x, tt)  # noqa: SLF001
    assert torch.allclose(guided, combine_guidance(v_c, expected, v_c, 3.0, 1.5, "global"), atol=1e-5)
    # a prompt of one text segment: the text-free branch is the empty context
    one = Example("t2i", [text("user", "draw me")])
    cache, batch = adapter._encode([one], image_output=True)  # noqa: SLF001
    empty = adapter._guidance_prefixes([one], cache, batch.text_free, guidance)[0]  # noqa: SLF001
    with torch.no_grad():
        v_empty = adapter._velocity_fn(adapter._unconditional_prefix())(x, tt)  # noqa: SLF001
        assert torch.allclose(adapter._velocity_fn(empty)(x, tt), v_empty, atol=1e-5)  # noqa: SLF001


@pytest.mark.parametrize("renorm", ["global", "text_channel"])
def test_rollout_logprobs_under_text_and_image_guidance_equal_recorded(adapter, renorm):
    ctx = [with_image_context(), Example("t2i", [text("user", "hello there")])]  # with and without an image
    guidance = Guidance(text_scale=3.0, img_scale=1.5, interval=(0.3, 1.0), renorm_type=renorm)
    rollout = adapter.sample_images(ctx, SamplerSpec(steps=5, noise=0.7, window=(0, 4), guidance=guidance), n=2, seed=0)
    plain = adapter.sample_images(ctx, SamplerSpec(steps=5, noise=0.7, window=(0, 4)), n=2, seed=0)
    assert not torch.allclose(rollout.images, plain.images, atol=1e-4)
    with torch.no_grad():
        for k in range(4):  # steps from t = 1, 0.8, 0.6, 0.4: all inside the interval (0.3, 1]
            again = adapter.rollout_logprob(rollout, k)
            assert torch.allclose(again, rollout.trajectory.logprobs[:, k], atol=1e-4), k
        sub = torch.tensor([3, 0])
        assert torch.allclose(adapter.rollout_logprob(rollout, 1, sub), rollout.trajectory.logprobs[sub, 1], atol=1e-4)


def test_rollout_logprobs_when_the_understanding_expert_trains(adapter):
    """With understanding weights trainable every prefix (conditional and both guidance branches) is
    re-encoded with gradients; unchanged weights still give the recorded log-probs."""
    ctx = [with_image_context()]
    spec = SamplerSpec(steps=4, noise=0.7, window=(0, 2), guidance=Guidance(text_scale=2.0, img_scale=1.5))
    rollout = adapter.sample_images(ctx, spec, n=2, seed=1)
    assert adapter._understanding_trainable()  # noqa: SLF001 - every weight requires grad after build
    logp = adapter.rollout_logprob(rollout, 0)
    assert torch.allclose(logp.detach(), rollout.trajectory.logprobs[:, 0], atol=1e-4)
    logp.sum().backward()
    grads = {n: p.grad for n, p in adapter.model.named_parameters() if p.grad is not None}
    assert any("mlp.down_proj" in n and "_moe_gen" not in n for n in grads)  # reached the prefix
    adapter.model.zero_grad(set_to_none=True)


# -- flow-matching target --------------------------------------------------------------------------------------
def test_flow_loss_target_is_noise_minus_clean(adapter, monkeypatch):
    """With a fixed t and fixed noise, and a velocity head that outputs a constant b, the loss is
    mean((b - (noise - x0))^2) and the model is fed x_t = (1 - t) x0 + t noise."""
    example = Example("t2i", [text("user", "draw"), Segment("image", "character", pixels=picture(7), generate=True,
                                                             train=True)])
    batch = adapter.collate([example])
    batch.timestep_draws = torch.logit(torch.tensor([0.3]))  # t = sigmoid(draw) with the card's shift 1
    model = adapter.model
    x0 = patchify(model.vae.encode(batch.vae_pixels), model.arch.latent_patch_size)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3])
    monkeypatch.setattr(torch, "randn_like", lambda x: noise.clone())
    seen = {}
    original = model.latent_tokens

    def spy(x_t, tt, hw):
        seen["x_t"], seen["t"] = x_t.clone(), tt.clone()
        return original(x_t, tt, hw)

    monkeypatch.setattr(model, "latent_tokens", spy)
    b = torch.randn(model.patch_latent_dim, generator=torch.Generator().manual_seed(4))
    weight, bias = model.llm2vae.weight.data.clone(), model.llm2vae.bias.data.clone()
    try:
        model.llm2vae.weight.data.zero_()
        model.llm2vae.bias.data.copy_(b)
        with torch.no_grad():
            mse = adapter.losses(batch)["image"]
    finally:
        model.llm2vae.weight.data.copy_(weight)
        model.llm2vae.bias.data.copy_(bias)
    assert torch.allclose(seen["x_t"], 0.7 * x0 + 0.3 * noise, atol=1e-6) and torch.allclose(seen["t"], t, atol=1e-7)
    assert torch.allclose(mse, (b - (noise - x0)).pow(2).mean(), atol=1e-6)
    assert not torch.allclose(mse, (b - (x0 - noise)).pow(2).mean(), atol=1e-3)


# -- think mode -----------------------------------------------------------------------------------------------------
def test_think_mode_writes_text_then_draws_with_it_in_context(adapter):
    ctx = [Example("t2i", [text("system", "You are Rex."), text("user", "draw me on the beach")]),
           Example("t2i", [text("user", "hello")])]
    texts, rollout = adapter.think_and_sample(ctx, SamplerSpec(steps=3), max_think_tokens=6, n=2, seed=5)
    assert texts == adapter.generate_text(ctx, max_new_tokens=6)
    # the cached prefix continued by the thinking == encoding context + thinking from scratch
    explicit = [Example("t2i", [*c.segments, text("character", t)]) for c, t in zip(ctx, texts, strict=True)]
    again = adapter.sample_images(explicit, SamplerSpec(steps=3), n=2, seed=5)
    assert torch.allclose(rollout.images, again.images, atol=1e-5)
    assert not torch.allclose(rollout.images, adapter.sample_images(ctx, SamplerSpec(steps=3),
                                                                    n=2, seed=5).images, atol=1e-4)


def test_think_mode_rollouts_replay_on_policy_with_guidance(adapter):
    ctx = [with_image_context()]
    _, rollout = adapter.think_and_sample(ctx, SamplerSpec(steps=4, noise=0.7, window=(0, 2),
                                                           guidance=Guidance(text_scale=2.0, img_scale=1.5)),
                                          max_think_tokens=4, n=2, seed=2)
    with torch.no_grad():
        for k in range(2):
            assert torch.allclose(adapter.rollout_logprob(rollout, k), rollout.trajectory.logprobs[:, k], atol=1e-4)


def test_think_decoding_strategy_and_its_training_contexts():
    from cmrp.data.character import Turn
    from cmrp.data.tasks import _image_conditioning
    from cmrp.sampling.decoding import get_strategy

    think = get_strategy("think")
    assert think.think and think.image_sees_reply and not get_strategy("chain").think
    turn = Turn(role="character", text="Here I am!", image_id="img1", thinking="sunny, sand",
                generation_instruction="Rex on a beach")
    history = [text("user", "show me the beach")]
    chain = [s.text for s in _image_conditioning(history, turn, "chain")]
    joint = [s.text for s in _image_conditioning(history, turn, "joint")]
    thinking = [s.text for s in _image_conditioning(history, turn, "think")]
    # the reference instruction is no decoding's input at inference (chat, eval): only think mode writes one
    assert chain == ["show me the beach", "Here I am!"] and joint == ["show me the beach"]
    assert thinking == ["show me the beach", "Here I am!", "<think>sunny, sand</think>\nRex on a beach"]


def test_chat_think_turn_keeps_the_thinking_and_passes_the_runs_guidance(adapter, tmp_path):
    from cmrp.chat.session import CharacterInfo, ChatSession
    from cmrp.errors import ConfigError

    calls = {}

    class Spy:
        """The real adapter, recording what the session asks of it."""

        def generate_text(self, contexts, **kw):
            return adapter.generate_text(contexts, **kw)

        def think_and_sample(self, contexts, spec, **kw):
            calls["think"] = (contexts, spec)
            return adapter.think_and_sample(contexts, spec, **kw)

    info = CharacterInfo("Rex", extra={"sampling": {"cfg_scale": 2.0, "cfg_interval": (0.4, 1.0)}})
    session = ChatSession(Spy(), info, decoding="think", image_steps=2, out_dir=tmp_path, max_new_tokens=4)
    reply = session.reply("show me the beach", image=True)
    contexts, spec = calls["think"]
    assert spec == SamplerSpec(steps=2, guidance=Guidance(text_scale=2.0, interval=(0.4, 1.0)))
    assert [s.role for s in contexts[0].segments][-2:] == ["user", "character"]  # history + the reply
    assert reply.image_path.is_file() and isinstance(session.turns[-1]["thinking"], str)

    class TextOnly:
        def generate_text(self, contexts, **kw):
            return ["hi"]

    with pytest.raises(ConfigError, match="think") as err:
        ChatSession(TextOnly(), CharacterInfo("Rex"), decoding="think")
    assert "\n" not in str(err.value) and str(err.value) == (
        "decoding 'think' needs a backbone with think_and_sample (SupportsThink); TextOnly has none — use bagel or "
        "janus, or --decoding chain")


def test_eval_think_sampling_batches_and_uses_the_recipe_guidance(adapter):
    from cmrp.evaluation.runner import EvalOptions, _think_sample

    ctx = [Example("t2i", [text("user", f"draw me {i}")]) for i in range(3)]
    opts = EvalOptions(steps=2, batch_size=2, max_new_tokens=3, sampling={"cfg_scale": 2.0})
    thoughts, images = _think_sample(adapter, ctx, opts)
    assert len(thoughts) == 3 and images.shape == (3, 3, 32, 32)
    # the first batch equals a direct think-mode call with the same seeds and guidance
    direct_texts, direct = adapter.think_and_sample(ctx[:2], SamplerSpec(steps=2, guidance=Guidance(text_scale=2.0)),
                                                    n=1, seed=0, max_think_tokens=3, text_seed=0)
    assert thoughts[:2] == direct_texts and torch.allclose(images[:2], direct.images)


def test_eval_refuses_think_decoding_on_a_backbone_without_it_before_running():
    from cmrp.config import load_recipe
    from cmrp.errors import ConfigError
    from cmrp.evaluation.runner import EvalOptions, evaluate_model

    class TextOnly:  # the check comes first: nothing else of the backbone or the character is touched
        pass

    cfg = load_recipe("quickstart", ["decoding=think"])
    with pytest.raises(ConfigError, match="^decoding: think needs a backbone with think_and_sample .* TextOnly has"):
        evaluate_model(TextOnly(), None, cfg, None, EvalOptions())
