"""Regenerate the BAGEL golden fixtures (tests/fixtures/parity/bagel/) by running the official BAGEL code.

    python tests/parity/make_references_bagel.py /path/to/Bagel        (or BAGEL_REPO=/path/to/Bagel)

`/path/to/Bagel` is a checkout of https://github.com/ByteDance-Seed/Bagel (the fixtures were made at commit
056b5fd51a88c1eb4547318609e25d40080fcf87). The official code is imported from there and run only as a
reference; nothing of it is copied. It needs the packages of its own requirements.txt that matter here:
transformers 4.49 (its `modeling/qwen2` copy imports that version's internals), einops, torchvision; use a
separate environment, e.g. `python -m venv /tmp/bagel-ref --system-site-packages` + `pip install
transformers==4.49.0 einops`, and put cmrp's `src` on PYTHONPATH for the final check (see below).

What it writes:
- `checkpoint/`: a tiny BAGEL with random weights, saved the official way: `llm_config.json` and
  `vit_config.json` by the official config classes (`to_json_file`; vit_config names the full SigLIP depth,
  without BAGEL's `rope` switch, like the released file), `ema.safetensors` (bf16, as released) and
  `ae.safetensors` (fp32, FLUX key names) with `safetensors.save_file` as the official trainer does, and the
  tokenizer files written by the official `Qwen2Tokenizer.save_pretrained` after the official
  `add_special_tokens`. The weights are random (the official init zeroes `llm2vae`, which would make every
  velocity 0, so every parameter is redrawn) and rounded to bf16 before any reference is computed.
- `reference.safetensors` + `reference.json`: the exact inputs and the official outputs of each check
  (role-play prompt ids, KV-cached greedy decoding and its logits, understanding with two images, flow
  velocities, full sampling loops with text + image guidance, interval and each renorm type, the packed
  training batch and its losses, the VAE round trip). The official model is loaded back from `checkpoint/`
  exactly as the official `app.py` / `eval/vlm/utils.py` do before anything is computed.

Shims (what cannot run on a CPU; none changes the official maths):
1. `flash_attn` is a stand-in module: `flash_attn_varlen_func` runs PyTorch SDPA on each packed sequence
   (grouped-query heads repeated as flash-attn maps them; `causal=True` aligns the causal mask to the
   bottom-right when there are fewer queries than keys, as flash-attn does).
2. Precision: `modeling/bagel/qwen2_navit.py` and `siglip_navit.py` cast attention inputs to bfloat16 for
   flash-attn on GPUs; those two modules get a `torch` whose `bfloat16` is float32, so the reference runs in
   fp32 like the comparison (rel. 1e-4 needs fp32 on both sides).
3. `sdpa_kernel([EFFICIENT_ATTENTION])` in qwen2_navit.py's training path is a no-op context: that kernel does
   not exist on a CPU; the default SDPA kernel computes the same attention with the same float mask.
4. `cv2` and `decord` are empty modules: `data/transforms.py` / `data/video_utils.py` import them for
   augmentations and video code that is never called here.
5. `torch.amp.autocast("cuda")` in the official inferencer is left as is (torch disables it without CUDA).
Instrumentation (reads values, changes nothing): `InterleaveInferencer.decode_image` is replaced by a
function that keeps the final latent (the official one converts to 8-bit PIL); `prepare_prompts`,
`generate_text` and `lm_head` are wrapped to record the token ids, generated ids and logits they produce.
A `PackedDataset` is made with `__new__` and the attributes `pack_sequence` reads (its `__init__` builds
parquet datasets); `pack_sequence` and `to_tensor` run unchanged.

Last, the reverse direction: if cmrp is importable, the fixture is loaded with cmrp, written back with
`BagelAdapter.save_official`, and that folder is loaded by the official code (strict state dicts, the
official `Qwen2Tokenizer` + `add_special_tokens`): every tensor and every token id must be the official
ones; the script fails otherwise (`reference.json` records the check).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import random
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "bagel"
COMMIT = "056b5fd51a88c1eb4547318609e25d40080fcf87"

# the tiny architecture (official config names)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
           tie_word_embeddings=False, qk_norm=True, layer_module="Qwen2MoTDecoderLayer")
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
           image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
AE = dict(resolution=32, in_channels=3, downsample=2, ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=1,
          z_channels=4, scale_factor=0.3611, shift_factor=0.1159)
VIT_MAX = 4  # = image_size / patch_size, as in the official model (980 / 14 = 70)
MAX_LATENT = 8
LATENT_PATCH = 2
TRAIN_SHIFT = 2.0
IMAGE = 32  # generated and VAE-encoded images: 32 x 32 (latent 16 x 16, 8 x 8 tokens)

PERSONA = "You are Mira. Stay in character."
TURNS = ["Hi Mira! What are you painting today?", "A squall rolling in over the rocks, 3 gulls fleeing it.",
         "Can you show me the lighthouse at night?", "Of course: lamp lit, waves high, nobody on the pier.",
         "And what does it look like in the morning?"]
PROMPT = "A red lighthouse on a rock under a stormy sky."
QUESTION = "What colour is the lighthouse in these pictures?"
CORPUS = [PERSONA, *TURNS, PROMPT, QUESTION, "The keeper climbs 120 steps; it's 9'o clock, isn't it?",
          "Seagulls, waves and a storm over the old red lighthouse. The lamp turns all night."]


# -- shims -------------------------------------------------------------------------------------------
def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                            dropout_p=0.0, softmax_scale=None, causal=False, **_):
    groups = q.shape[1] // k.shape[1]
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)
        ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].repeat_interleave(groups, dim=1).transpose(0, 1)
        vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].repeat_interleave(groups, dim=1).transpose(0, 1)
        mask = None
        if causal:
            lq, lk = qs.shape[1], ks.shape[1]
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        o = torch.nn.functional.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask,
                                                             scale=softmax_scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


class _Fp32Torch(types.ModuleType):
    """`torch` for the official attention modules, with bfloat16 meaning float32 (shim 2)."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def _empty_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def import_official(repo: Path):
    import contextlib

    import transformers.image_utils  # noqa: F401 - its availability checks must run before the stand-ins
    import transformers.modeling_utils  # noqa: F401

    flash = _empty_module("flash_attn")
    flash.flash_attn_varlen_func = _flash_attn_varlen_func
    sys.modules["flash_attn"] = flash
    for name in ("cv2", "decord"):
        sys.modules.setdefault(name, _empty_module(name))
    sys.path.insert(0, str(repo))
    import modeling.bagel.qwen2_navit as qwen2_navit
    import modeling.bagel.siglip_navit as siglip_navit

    for module in (qwen2_navit, siglip_navit):
        module.torch = _Fp32Torch("torch")
    qwen2_navit.sdpa_kernel = lambda *a, **k: contextlib.nullcontext()
    import data.data_utils as data_utils
    import inferencer
    import modeling.autoencoder as autoencoder
    import modeling.bagel as bagel
    from data.dataset_base import DataConfig, PackedDataset
    from data.transforms import ImageTransform
    from modeling.qwen2 import Qwen2Tokenizer

    return types.SimpleNamespace(bagel=bagel, autoencoder=autoencoder, inferencer=inferencer, data_utils=data_utils,
                                 PackedDataset=PackedDataset, DataConfig=DataConfig, ImageTransform=ImageTransform,
                                 Qwen2Tokenizer=Qwen2Tokenizer, qwen2_navit=qwen2_navit)


# -- the tiny checkpoint ----------------------------------------------------------------------------
def train_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt of a byte-level BPE with Qwen2's pre-tokenization (the files Qwen2Tokenizer reads)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.model.save(str(folder))


def _redraw(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fresh random values for every parameter except the fixed sin-cos tables."""
    for name, p in module.named_parameters():
        if name.endswith("pos_embed"):
            continue
        if p.dim() >= 2:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=generator) / fan_in**0.5
        elif "norm" in name:
            value = 1.0 + 0.2 * torch.randn(p.shape, generator=generator)
        else:
            value = 0.1 * torch.randn(p.shape, generator=generator)
        p.data.copy_(value.to(torch.bfloat16).float())  # bf16-representable: ema.safetensors is bf16


def build_checkpoint(off, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer_files(Path(tmp))
        tokenizer = off.Qwen2Tokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    tokenizer, _, _ = off.data_utils.add_special_tokens(tokenizer)
    tokenizer.save_pretrained(str(folder))
    llm_config = off.bagel.Qwen2Config(vocab_size=len(tokenizer), **LLM)
    llm_config.to_json_file(str(folder / "llm_config.json"))
    vit_config = off.bagel.SiglipVisionConfig(**{**VIT, "num_hidden_layers": VIT["num_hidden_layers"] + 1})
    vit_json = vit_config.to_dict()
    vit_json.pop("rope")  # not in the released vit_config.json (a SigLIP config); the loaders set it
    (folder / "vit_config.json").write_text(json.dumps(vit_json, indent=2, sort_keys=True) + "\n")
    torch.manual_seed(0)  # the autoencoder keeps its default (random) initialisation
    model, vae = construct(off, folder)
    gen = torch.Generator().manual_seed(0)
    _redraw(model, gen)
    for name, p in vae.named_parameters():
        if "norm" in name and p.dim() == 1 and name.endswith("weight"):
            p.data.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(folder / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "ae.safetensors"))


def construct(off, folder: Path, timestep_shift: float = 1.0):
    """The official model of `folder`'s configs (what app.py / eval/vlm/utils.py build), weights not loaded."""
    llm_config = off.bagel.Qwen2Config.from_json_file(str(folder / "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = off.bagel.SiglipVisionConfig.from_json_file(str(folder / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    vae = off.autoencoder.AutoEncoder(off.autoencoder.AutoEncoderParams(**AE))
    config = off.bagel.BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
        vae_config=off.autoencoder.AutoEncoderParams(**AE), vit_max_num_patch_per_side=VIT_MAX,
        connector_act="gelu_pytorch_tanh", latent_patch_size=LATENT_PATCH, max_latent_size=MAX_LATENT,
        timestep_shift=timestep_shift,
    )
    model = off.bagel.Bagel(off.bagel.Qwen2ForCausalLM(llm_config), off.bagel.SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    return model, vae


def load(off, folder: Path, timestep_shift: float = 1.0):
    """Model, autoencoder, tokenizer and new_token_ids from an official folder, strictly."""
    from safetensors.torch import load_file

    model, vae = construct(off, folder, timestep_shift)
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "ema.safetensors")).items()}, strict=True)
    vae.load_state_dict(load_file(str(folder / "ae.safetensors")), strict=True)
    tokenizer = off.Qwen2Tokenizer.from_pretrained(str(folder))
    tokenizer, new_token_ids, added = off.data_utils.add_special_tokens(tokenizer)
    if added:
        raise RuntimeError(f"{folder}: the tokenizer files lack BAGEL's special tokens")
    return model.eval(), vae.eval(), tokenizer, new_token_ids


# -- references ---------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict = {"source": {"repository": "ByteDance-Seed/Bagel", "commit": COMMIT}}

    def put(self, key: str, value) -> None:
        t = torch.as_tensor(value)
        self.tensors[key] = t.detach().to(torch.float32 if t.is_floating_point() else torch.int64).contiguous()


def images(gen: torch.Generator) -> dict[str, np.ndarray]:
    """8-bit RGB test images (H, W, 3): smooth colour fields plus noise, so every pixel matters."""
    out = {}
    for name, (h, w) in {"a": (IMAGE, IMAGE), "b": (16, 32), "c": (IMAGE, IMAGE)}.items():
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([yy, xx, (yy + xx) / 2], dim=-1) * 180 + 30
        noisy = base + 40 * torch.rand((h, w, 3), generator=gen)
        out[name] = noisy.clamp(0, 255).to(torch.uint8).numpy()
    return out


class Spy:
    """Wraps the official model's prepare_prompts / generate_text / lm_head to record what they produce."""

    def __init__(self, model):
        self.prompts, self.generated, self.logits = [], [], []
        self._model = model
        prepare, generate = model.prepare_prompts, model.generate_text

        def prepare_spy(*args, **kwargs):
            out = prepare(*args, **kwargs)
            self.prompts.append((out[0]["packed_text_ids"].clone(), out[0]["packed_text_position_ids"].clone()))
            return out

        def generate_spy(*args, **kwargs):
            out = generate(*args, **kwargs)
            self.generated.append(out[:, 0].clone())
            return out

        model.prepare_prompts, model.generate_text = prepare_spy, generate_spy
        self._hook = model.language_model.lm_head.register_forward_hook(
            lambda _m, _i, out: self.logits.append(out.detach().clone()))

    def reset(self):
        self.prompts, self.generated, self.logits = [], [], []


def make_inferencer(off, model, vae, tokenizer, new_token_ids):
    vae_transform = off.ImageTransform(IMAGE, 16, 2 * LATENT_PATCH)  # stride = the latent downsample (4)
    vit_transform = off.ImageTransform(VIT["image_size"], 16, VIT["patch_size"])
    inf = off.inferencer.InterleaveInferencer(model, vae, tokenizer, vae_transform, vit_transform, new_token_ids)
    latents = []

    def keep_latent(latent, image_shape):
        latents.append(latent.clone())
        return latent

    inf.decode_image = keep_latent
    return inf, latents, vae_transform, vit_transform


def as_input(item, pictures):
    from PIL import Image

    return Image.fromarray(pictures[item["image"]]) if "image" in item else item["text"]


def reference_text(off, rec: Recorder, inf, spy: Spy, pictures) -> None:
    """Role-play prompt ids, greedy KV-cached decoding and its logits; understanding with two images."""
    cases = {
        "roleplay": [{"text": PERSONA}, *({"text": t} for t in TURNS)],
        "understanding": [{"image": "a"}, {"image": "b"}, {"text": QUESTION}],
    }
    rec.meta["text"] = {}
    for name, inputs in cases.items():
        spy.reset()
        out = inf.interleave_inference([as_input(i, pictures) for i in inputs], understanding_output=True,
                                       do_sample=False, max_think_token_n=10)
        rec.meta["text"][name] = {"inputs": inputs, "max_new_tokens": 9, "official_text": out[0]}
        prompts = [ids for ids, _ in spy.prompts[::2]]  # each text goes to the context and the image-free copy
        rec.put(f"text/{name}/segment_ids", torch.cat(prompts))
        rec.put(f"text/{name}/segment_lengths", torch.tensor([len(p) for p in prompts]))
        rec.put(f"text/{name}/segment_positions", torch.cat([pos for _, pos in spy.prompts[::2]]))
        rec.put(f"text/{name}/generated", spy.generated[0])  # [bos, t1, ...]
        rec.put(f"text/{name}/logits", torch.cat(spy.logits))  # one row per decoding step
    rec.meta["tokenizer"] = {"texts": CORPUS}
    for i, text in enumerate(CORPUS):
        rec.put(f"tokenizer/{i}", torch.tensor(inf.tokenizer.encode(text)))
    rec.put("tokenizer/special", torch.tensor([inf.new_token_ids[k] for k in
                                               ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")]))


def reference_velocity(off, rec: Recorder, inf, pictures) -> None:
    """One flow-head prediction (no guidance) after a text context and after an image + text context."""
    model = inf.model
    model.language_model.model.enable_taylorseer = False  # what generate_image sets before calling _forward_flow
    gen = torch.Generator().manual_seed(7)
    rec.meta["velocity"] = {}
    for name, inputs in {"text": [{"text": PROMPT}], "image": [{"image": "a"}, {"text": PROMPT}]}.items():
        torch.manual_seed(11)  # the VAE posterior sample of an input image
        ctx = inf.init_gen_context()
        for item in inputs:
            if "image" in item:
                ctx = inf.update_context_image(inf.vae_transform.resize_transform(as_input(item, pictures)), ctx)
            else:
                ctx = inf.update_context_text(item["text"], ctx)
        latent = model.prepare_vae_latent(ctx["kv_lens"], ctx["ropes"], [(IMAGE, IMAGE)], inf.new_token_ids)
        x = torch.randn(latent["packed_init_noises"].shape, generator=gen)
        t = torch.full((x.shape[0],), 0.7)
        v = model._forward_flow(x_t=x, timestep=t, past_key_values=ctx["past_key_values"], **{
            k: latent[k] for k in ("packed_vae_token_indexes", "packed_vae_position_ids", "packed_text_ids",
                                   "packed_text_indexes", "packed_indexes", "packed_position_ids",
                                   "packed_seqlens", "key_values_lens", "packed_key_value_indexes")})
        rec.meta["velocity"][name] = {"inputs": inputs, "t": 0.7, "posterior_seed": 11}
        rec.put(f"velocity/{name}/x", x)
        rec.put(f"velocity/{name}/v", v)


SAMPLING = {
    # t2i with text + image guidance: image guidance applies although the context holds no input image
    "t2i_global": dict(inputs=[{"text": PERSONA}, {"text": PROMPT}], cfg_text_scale=4.0, cfg_img_scale=1.5,
                       cfg_interval=[0.4, 1.0], cfg_renorm_type="global", cfg_renorm_min=0.0),
    "t2i_channel": dict(inputs=[{"text": PERSONA}, {"text": PROMPT}], cfg_text_scale=4.0, cfg_img_scale=1.5,
                        cfg_interval=[0.4, 1.0], cfg_renorm_type="channel", cfg_renorm_min=0.2),
    "t2i_text_channel": dict(inputs=[{"text": PERSONA}, {"text": PROMPT}], cfg_text_scale=4.0, cfg_img_scale=1.5,
                             cfg_interval=[0.0, 0.8], cfg_renorm_type="text_channel", cfg_renorm_min=0.0),
    # a text scale of 1 switches every guidance off, the image guidance of an input image included
    "text_scale_one": dict(inputs=[{"image": "c"}, {"text": PROMPT}], cfg_text_scale=1.0, cfg_img_scale=2.0,
                           cfg_interval=[0.0, 1.0], cfg_renorm_type="global", cfg_renorm_min=0.0),
    # the text-free branch keeps the earlier text segments (persona, first turn)
    "dialogue": dict(inputs=[{"text": PERSONA}, {"text": TURNS[0]}, {"text": PROMPT}], cfg_text_scale=4.0,
                     cfg_img_scale=1.0, cfg_interval=[0.0, 1.0], cfg_renorm_type="global", cfg_renorm_min=0.0),
    # an input image (VAE latents + ViT tokens), then text: text and image guidance
    "image_conditioned": dict(inputs=[{"image": "c"}, {"text": PROMPT}], cfg_text_scale=3.0, cfg_img_scale=2.0,
                              cfg_interval=[0.0, 1.0], cfg_renorm_type="global", cfg_renorm_min=0.0),
}
NUM_TIMESTEPS, SAMPLING_SHIFT = 7, 3.0


def reference_sampling(off, rec: Recorder, inf, latents: list, vae, pictures) -> None:
    rec.meta["sampling"] = {}
    for i, (name, case) in enumerate(SAMPLING.items()):
        settings = {k: v for k, v in case.items() if k != "inputs"}
        seed = 100 + i
        torch.manual_seed(seed)
        latents.clear()
        inf.interleave_inference([as_input(x, pictures) for x in case["inputs"]], image_shapes=(IMAGE, IMAGE),
                                 num_timesteps=NUM_TIMESTEPS, timestep_shift=SAMPLING_SHIFT, **settings)
        rec.meta["sampling"][name] = {**case, "seed": seed, "num_timesteps": NUM_TIMESTEPS,
                                      "timestep_shift": SAMPLING_SHIFT}
        rec.put(f"sampling/{name}/latent", latents[0])
    # the VAE round trip: posterior sample (the official encoder samples), decode
    from PIL import Image

    x = off.ImageTransform(IMAGE, 16, 2 * LATENT_PATCH)(Image.fromarray(pictures["a"]))[None]
    torch.manual_seed(5)
    z = vae.encode(x)
    rec.put("vae/latent", z)
    rec.put("vae/decoded", vae.decode(z))
    rec.meta["vae"] = {"image": "a", "seed": 5}


def reference_training(off, rec: Recorder, folder: Path, tokenizer, new_token_ids, pictures) -> None:
    """The official packer on four samples, then the official training forward (train mode, nested masks)."""
    from PIL import Image

    model, vae = load(off, folder, TRAIN_SHIFT)[:2]
    model.train()
    vae_t = off.ImageTransform(IMAGE, 16, 2 * LATENT_PATCH)
    vit_t = off.ImageTransform(VIT["image_size"], 16, VIT["patch_size"])
    text = lambda s, loss: {"type": "text", "text": s, "enable_cfg": 0, "loss": loss,  # noqa: E731
                            "special_token_loss": 0, "special_token_label": None}
    image = lambda kind, name, loss: {"type": kind, "image": name, "enable_cfg": 0, "loss": loss,  # noqa: E731
                                      "special_token_loss": 0, "special_token_label": None}
    samples = [
        # text-to-image with text after the generated image (the position is not advanced after it)
        [text(PROMPT, 0), image("vae_image", "a", 1), text(TURNS[1], 1)],
        # understanding: a variable-size image, a question, the answer
        [image("vit_image", "b", 0), text(QUESTION, 0), text(TURNS[3], 1)],
        # role-play chat: persona, a user turn, the character's reply
        [text(PERSONA, 0), text(TURNS[0], 0), text(TURNS[1], 1)],
        # image-conditioned generation: the input image as clean VAE latents and ViT tokens, then a target image
        [image("vae_image", "c", 0), image("vit_image", "c", 0), text(PROMPT, 0), image("vae_image", "a", 1)],
    ]
    ds = off.PackedDataset.__new__(off.PackedDataset)
    ds.data_config = off.DataConfig(grouped_datasets={}, vae_image_downsample=2 * LATENT_PATCH,
                                    max_latent_size=MAX_LATENT, vit_patch_size=VIT["patch_size"],
                                    max_num_patch_per_side=VIT_MAX)
    ds.use_flex = False
    ds.get_flattened_position_ids = off.data_utils.get_flattened_position_ids_extrapolate
    for key, value in new_token_ids.items():
        setattr(ds, key, value)
    np.random.seed(3)
    random.seed(3)
    status = ds.set_sequence_status()
    for plan in samples:
        tensors = [(vae_t if x["type"] == "vae_image" else vit_t)(Image.fromarray(pictures[x["image"]]))
                   for x in plan if "image" in x]
        sample = {"sequence_plan": [{k: v for k, v in x.items() if k not in ("text", "image")} for x in plan],
                  "text_ids_list": [tokenizer.encode(x["text"]) for x in plan if x["type"] == "text"],
                  "image_tensor_list": tensors}
        status = ds.pack_sequence(sample, status)
    data = ds.to_tensor(status)
    data.pop("ce_loss_weights")
    torch.manual_seed(21)  # the VAE posterior sample, then the flow noise inside forward
    data["padded_latent"] = vae.encode(data.pop("padded_images"))
    out = model(**data)
    rec.meta["training"] = {"samples": samples, "timestep_shift": TRAIN_SHIFT, "seed": 21}
    for key in ("packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_label_ids",
                "ce_loss_indexes", "mse_loss_indexes", "packed_vae_token_indexes", "packed_vit_token_indexes"):
        rec.put(f"training/{key}", data[key])
    rec.put("training/sample_lens", torch.tensor(data["sample_lens"]))
    noisy = torch.tensor([t for t in data["packed_timesteps"].tolist() if t != float("-inf")])
    rec.put("training/timesteps", noisy.unique_consecutive())  # one standard-normal draw per generated image
    rec.put("training/ce", out["ce"])
    rec.put("training/mse", out["mse"].mean(dim=-1))


def check_cmrp_round_trip(off, folder: Path, rec: Recorder) -> None:
    """Load the fixture with cmrp, save it with save_official, load that with the official code: same outputs."""
    try:
        from cmrp.backbones.bagel.adapter import BagelAdapter
    except ImportError:
        print("cmrp is not importable: the reverse check (cmrp's save_official -> official code) was skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        saved = BagelAdapter.from_pretrained(folder).save_official(Path(tmp) / "saved")
        model, vae, tokenizer, new_token_ids = load(off, saved)
        ours = load(off, folder)
        for text in CORPUS:
            if tokenizer.encode(text) != ours[2].encode(text):
                raise RuntimeError(f"save_official's tokenizer encodes {text!r} differently")
        if new_token_ids != ours[3]:
            raise RuntimeError(f"save_official's special tokens {new_token_ids} != {ours[3]}")
        for (name, a), b in zip(model.state_dict().items(), ours[0].state_dict().values(), strict=True):
            if not torch.equal(a, b):
                raise RuntimeError(f"save_official changed {name}")
        for (name, a), b in zip(vae.state_dict().items(), ours[1].state_dict().values(), strict=True):
            if not torch.equal(a, b):
                raise RuntimeError(f"save_official changed ae {name}")
    rec.meta["reverse_check"] = "cmrp save_official -> official strict load + Qwen2Tokenizer: identical"
    print(rec.meta["reverse_check"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", nargs="?", default=os.environ.get("BAGEL_REPO"), help="checkout of ByteDance-Seed/Bagel")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.repo or not (Path(args.repo) / "modeling" / "bagel" / "bagel.py").is_file():
        parser.error("pass the path of a ByteDance-Seed/Bagel checkout (or set BAGEL_REPO)")
    torch.set_num_threads(1)
    off = import_official(Path(args.repo).resolve())
    folder = args.out / "checkpoint"
    build_checkpoint(off, folder)
    model, vae, tokenizer, new_token_ids = load(off, folder)
    rec = Recorder()
    pictures = images(torch.Generator().manual_seed(1))
    for name, pixels in pictures.items():
        rec.put(f"images/{name}", torch.from_numpy(pixels.copy()))
    spy = Spy(model)
    inf, latents, _, _ = make_inferencer(off, model, vae, tokenizer, new_token_ids)
    with torch.no_grad():
        reference_text(off, rec, inf, spy, pictures)
        reference_velocity(off, rec, inf, pictures)
        reference_sampling(off, rec, inf, latents, vae, pictures)
    reference_training(off, rec, folder, tokenizer, new_token_ids, pictures)
    from safetensors.torch import save_file

    save_file(rec.tensors, str(args.out / "reference.safetensors"))
    check_cmrp_round_trip(off, folder, rec)
    (args.out / "reference.json").write_text(json.dumps(rec.meta, indent=1) + "\n")
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
