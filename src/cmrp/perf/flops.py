"""FLOPs of BAGEL training and sampling, computed from the architecture and the token counts.

What is counted: every matrix multiplication the model runs (linear layers, LoRA adapters,
attention's two products, convolutions), 2 FLOPs per multiply-add — the convention of
`torch.utils.flop_counter` and of model-FLOP utilisation (MFU). Norms, activations, softmax, rope and
the sampler's element-wise maths are not counted (a few per cent of the total at most).

How BAGEL spends them:
- the language model is a Mixture-of-Transformers: text and ViT tokens go through the understanding
  weights, generation (noisy VAE latent) tokens through the `*_moe_gen` copies; both kinds meet in one
  attention, whose cost grows with the number of keys each query sees;
- an understood image costs a SigLIP pass over its patches plus the connector; a generated image costs
  a VAE encoder pass in training (frozen: no backward) and a decoder pass at the end of sampling;
- attention with an arbitrary mask (SDPA) computes every query-key pair of the block, so the count is
  over all keys a query's row holds, not only the ones the mask lets through.

Backward: a linear layer costs its forward again for the input gradient (when anything before it
trains) and again for the weight gradient (when it trains); attention's backward costs twice its
forward; gradient checkpointing adds one more forward of every decoder layer. `Trainable` says which
parts train (from the finetune mode, or read off a model), so LoRA and full fine-tuning differ here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cmrp.sampling.guidance import guidance_active

__all__ = [
    "FlopCount",
    "RolloutShape",
    "SFTLayout",
    "Trainable",
    "grpo_iteration_flops",
    "grpo_update_flops",
    "guided_steps",
    "latent_tokens",
    "vae_downsample",
    "rollout_flops",
    "sft_step_flops",
    "vae_flops",
]


@dataclass
class FlopCount:
    """Forward and backward FLOPs per component (llm_und, llm_gen, attention, lora, vit, heads, vae, ...)."""

    forward: dict[str, float] = field(default_factory=dict)
    backward: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.forward.values()) + sum(self.backward.values())

    @property
    def forward_total(self) -> float:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> float:
        return sum(self.backward.values())

    def add(self, part: str, forward: float = 0.0, backward: float = 0.0) -> None:
        if forward:
            self.forward[part] = self.forward.get(part, 0.0) + forward
        if backward:
            self.backward[part] = self.backward.get(part, 0.0) + backward

    def __add__(self, other: FlopCount) -> FlopCount:
        out = FlopCount(dict(self.forward), dict(self.backward))
        for part, v in other.forward.items():
            out.add(part, forward=v)
        for part, v in other.backward.items():
            out.add(part, backward=v)
        return out

    def __mul__(self, k: float) -> FlopCount:
        return FlopCount({p: v * k for p, v in self.forward.items()}, {p: v * k for p, v in self.backward.items()})

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, Any]:
        by_part = sorted(set(self.forward) | set(self.backward))
        return {"total": self.total, "forward": self.forward_total, "backward": self.backward_total,
                "by_part": {p: self.forward.get(p, 0.0) + self.backward.get(p, 0.0) for p in by_part}}


@dataclass(frozen=True)
class Trainable:
    """Which parts of BAGEL receive gradients. Linear groups are "full", "lora" or "frozen"."""

    und: str = "full"  # understanding-expert decoder linears
    gen: str = "full"  # generation-expert (`*_moe_gen`) decoder linears
    embed: bool = True  # token embeddings
    lm_head: bool = True
    vit: bool = True  # SigLIP encoder
    connector: bool = True  # ViT -> LLM connector
    gen_io: bool = True  # vae2llm, llm2vae, time embedder
    lora_rank: int = 0

    @classmethod
    def full(cls) -> Trainable:
        return cls()

    @classmethod
    def lora(cls, rank: int, targets: str = "default") -> Trainable:
        """LoRA on the decoder linears of `targets` (default: both experts; understanding; generation)."""
        und = "lora" if targets in ("default", "understanding") else "frozen"
        gen = "lora" if targets in ("default", "generation") else "frozen"
        return cls(und=und, gen=gen, embed=False, lm_head=False, vit=False, connector=False, gen_io=False,
                   lora_rank=rank)

    @classmethod
    def generation_expert(cls) -> Trainable:
        """GRPO's default (`train_groups: [generation]` on a full-mode model): the gen expert and its I/O."""
        return cls(und="frozen", gen="full", embed=False, lm_head=False, vit=False, connector=False, gen_io=True)

    @classmethod
    def from_model(cls, model: Any) -> Trainable:
        """Read off a (possibly PEFT-wrapped) BAGEL model's `requires_grad` flags."""
        import re

        names = [(n.replace("base_model.model.", "").replace(".base_layer", ""), p)
                 for n, p in model.named_parameters()]
        layers = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn|mlp)")

        def group(gen: bool) -> tuple[str, int]:
            lora_rank, full = 0, False
            for n, p in names:
                if not layers.match(n) or ("_moe_gen" in n) != gen or "norm" in n:
                    continue
                if ".lora_A." in n and p.requires_grad:
                    lora_rank = p.shape[0]
                elif ".lora_" not in n and p.requires_grad and n.endswith("weight"):
                    full = True
            return ("full" if full else "lora" if lora_rank else "frozen"), lora_rank

        def trains(prefix: str) -> bool:
            return any(n.startswith(prefix) and p.requires_grad for n, p in names)

        und, r_und = group(False)
        gen, r_gen = group(True)
        return cls(und=und, gen=gen, embed=trains("language_model.model.embed_tokens"),
                   lm_head=trains("language_model.lm_head"), vit=trains("vit_model."),
                   connector=trains("connector."),
                   gen_io=trains("vae2llm") or trains("llm2vae") or trains("time_embedder"),
                   lora_rank=max(r_und, r_gen))


@dataclass(frozen=True)
class SFTLayout:
    """Token counts of one SFT batch (totals over the batch).

    `attention_pairs`: query-key pairs the decoder's attention computes, summed over sequences (a
    sequence of n tokens: n²; as executed, rows attended together pay for their longest). `vit_patches`: patches per
    understood image. `gen_images` of `gen_hw` pixels are encoded by the VAE; `labelled` tokens go
    through the LM head."""

    und_tokens: int
    gen_tokens: int
    attention_pairs: int
    labelled: int
    vit_patches: tuple[int, ...] = ()
    gen_images: int = 0
    gen_hw: tuple[int, int] = (0, 0)

    @classmethod
    def from_batch(cls, batch: Any, arch: Any, *, executed: bool = False) -> SFTLayout:
        """From a collated `BagelBatch`: real tokens only (model FLOPs, the MFU numerator), or with
        `executed` what the kernels run: the same tokens through every linear (padding goes through no
        layer) and attention over the MoT's row groups, each cut to its longest row."""
        from cmrp.backbones.bagel.qwen2_mot import row_groups

        lengths = batch.valid.sum(dim=1).long()
        gen = int(batch.is_gen.sum())
        und, pairs = int(lengths.sum()) - gen, int((lengths**2).sum())
        if executed:
            b, length = batch.valid.shape
            groups = row_groups(batch.valid)  # None without padding: one attention over the batch
            pairs = b * length * length if groups is None else sum(len(rows) * n * n for rows, n in groups)
        p = arch.vit.patch_size
        images = [] if batch.vit_pixels is None else list(batch.vit_pixels)
        patches = tuple((img.shape[-2] // p) * (img.shape[-1] // p) for img in images)
        gen_images = 0 if batch.vae_pixels is None else int(batch.vae_pixels.shape[0])
        hw = tuple(batch.vae_pixels.shape[-2:]) if gen_images else (0, 0)
        return cls(und, gen, pairs, int((batch.labels != -100).sum()), patches, gen_images, hw)


# -- per-component forward counts ------------------------------------------------------------------
def _linear_set(arch) -> dict[str, tuple[int, int]]:
    """(in, out) of the linears of one decoder layer of one expert."""
    llm = arch.llm
    d, hd = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
    i = llm.intermediate_size
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, i), "up": (d, i), "down": (i, d)}


def _layer_linears(arch, tokens: float, mode: str, rank: int, first_layer: bool, input_grad: bool,
                   out: FlopCount, part: str, backward: bool, only: tuple[str, ...] | None = None) -> None:
    """One decoder layer's linears of one expert over `tokens` tokens (forward, and backward when asked —
    for the linears named in `only`, when given)."""
    for name, (fan_in, fan_out) in _linear_set(arch).items():
        fwd = 2.0 * tokens * fan_in * fan_out
        # the q/k/v inputs of the first layer are the embeddings: no gradient unless they train
        x_grad = input_grad if (first_layer and name in ("q", "k", "v")) else True
        lora_fwd = 2.0 * tokens * rank * (fan_in + fan_out) if mode == "lora" else 0.0
        out.add(part, forward=fwd)
        if lora_fwd:
            out.add("lora", forward=lora_fwd)
        if backward and (only is None or name in only):
            out.add(part, backward=fwd * (float(x_grad) + float(mode == "full")))
            if lora_fwd:
                # dB, d(Ax), dA; dX through A only when the input needs it
                out.add("lora", backward=2.0 * tokens * rank * (2 * fan_out + fan_in * (1 + float(x_grad))))


def _decoder(arch, und: float, gen: float, pairs: float, train: Trainable | None, *, input_grad: bool,
             checkpointing: bool, cache_only: bool = False) -> FlopCount:
    """All decoder layers over `und` + `gen` tokens with `pairs` query-key pairs per layer. `cache_only`:
    only the keys and values are used (a prefix encoded into a cache), so the last layer's backward covers
    its k and v projections alone — nothing after them reaches a loss."""
    out = FlopCount()
    llm = arch.llm
    backward = train is not None
    attn = 4.0 * pairs * llm.num_attention_heads * llm.head_dim
    moe = llm.use_moe
    for layer in range(llm.num_hidden_layers):
        first = layer == 0
        only = ("k", "v") if cache_only and layer == llm.num_hidden_layers - 1 else None
        und_mode = train.und if train else "frozen"
        gen_mode = (train.gen if moe else train.und) if train else "frozen"
        rank = train.lora_rank if train else 0
        _layer_linears(arch, und if moe else und + gen, und_mode, rank, first, input_grad, out, "llm_und", backward,
                       only)
        if moe:
            _layer_linears(arch, gen, gen_mode, rank, first, input_grad, out, "llm_gen", backward, only)
        out.add("attention", forward=attn)
        if backward and only is None:
            out.add("attention", backward=2.0 * attn)
    if backward and checkpointing:
        out.add("recompute", backward=out.forward_total)
    return out


def _vit(arch, patches: tuple[int, ...], train: Trainable | None) -> FlopCount:
    """SigLIP over each image's patches, then the connector into the LLM's width."""
    out = FlopCount()
    if not patches:
        return out
    v, d = arch.vit, arch.llm.hidden_size
    n = float(sum(patches))
    per_token = 2.0 * (3 * v.patch_size**2) * v.hidden_size
    per_token += v.num_hidden_layers * 2.0 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    attn = v.num_hidden_layers * 4.0 * v.hidden_size * sum(float(p) ** 2 for p in patches)
    connector = 2.0 * n * (v.hidden_size * d + d * d)
    out.add("vit", forward=n * per_token + attn)
    out.add("connector", forward=connector)
    if train is not None:
        if train.vit:  # weight grads everywhere, input grads everywhere but the patch embedding
            patch = 2.0 * n * (3 * v.patch_size**2) * v.hidden_size
            out.add("vit", backward=2 * (n * per_token) - patch + 2 * attn)
        if train.connector or train.vit:
            out.add("connector", backward=connector * (float(train.connector) + float(train.vit)))
    return out


def vae_flops(vae_spec: dict, hw: tuple[int, int], *, encoder: bool = True, decoder: bool = False) -> float:
    """Convolution and attention FLOPs of the FLUX autoencoder for one image of `hw` pixels (the
    pixel-space autoencoder of the tiny card has none)."""
    if (vae_spec or {}).get("kind", "pixel") != "flux":
        return 0.0
    from cmrp.backbones.bagel.autoencoder import FluxAEConfig

    cfg = FluxAEConfig.from_spec(dict(vae_spec))
    h, w = hw

    def conv(cin: int, cout: int, k: int, hh: int, ww: int) -> float:
        return 2.0 * cin * cout * k * k * hh * ww

    def res(cin: int, cout: int, hh: int, ww: int) -> float:
        return conv(cin, cout, 3, hh, ww) + conv(cout, cout, 3, hh, ww) + (conv(cin, cout, 1, hh, ww) if cin != cout else 0)

    def mid(c: int, hh: int, ww: int) -> float:
        pixels = hh * ww
        return 2 * res(c, c, hh, ww) + 4 * conv(c, c, 1, hh, ww) + 4.0 * c * pixels * pixels

    total = 0.0
    if encoder:
        hh, ww = h, w
        total += conv(cfg.in_channels, cfg.ch, 3, hh, ww)
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                total += res(cin, cout, hh, ww)
                cin = cout
            if i < len(cfg.ch_mult) - 1:
                hh, ww = hh // 2, ww // 2
                total += conv(cin, cin, 3, hh, ww)
        total += mid(cin, hh, ww) + conv(cin, 2 * cfg.z_channels, 3, hh, ww)
    if decoder:
        d = cfg.downsample
        hh, ww = h // d, w // d
        cin = cfg.ch * cfg.ch_mult[-1]
        total += conv(cfg.z_channels, cin, 3, hh, ww) + mid(cin, hh, ww)
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                total += res(cin, cout, hh, ww)
                cin = cout
            if i > 0:
                hh, ww = hh * 2, ww * 2
                total += conv(cin, cin, 3, hh, ww)
        total += conv(cin, cfg.out_ch, 3, hh, ww)
    return total


def _gen_io(arch, gen_tokens: float, images: float, train: Trainable | None, *, head: bool) -> FlopCount:
    """vae2llm on the noisy latents, the timestep MLP per image and (`head`) llm2vae on the outputs."""
    out = FlopCount()
    d = arch.llm.hidden_size
    latent = arch.latent_patch_size**2 * _z_channels(arch)
    inp = 2.0 * gen_tokens * latent * d + images * 2.0 * (256 * d + d * d)
    head_f = 2.0 * gen_tokens * d * latent if head else 0.0
    out.add("gen_io", forward=inp + head_f)
    if train is not None:
        # input side: weight grads (+ the timestep MLP's inner input grad), as the latents and t carry no
        # gradient; head: input grad + weight grad
        inner = images * 2.0 * d * d
        out.add("gen_io", backward=(inp + inner) * float(train.gen_io) + head_f * (1.0 + float(train.gen_io)))
    return out


def _z_channels(arch) -> int:
    vae = arch.vae or {}
    if vae.get("kind", "pixel") == "flux":
        return int(vae.get("z_channels", 16))
    return 3 * int(vae.get("downsample", 2)) ** 2


def vae_downsample(arch) -> int:
    vae = arch.vae or {}
    if vae.get("kind", "pixel") == "flux":
        return 2 ** (len(vae.get("ch_mult", [1, 2, 4, 4])) - 1)
    return int(vae.get("downsample", 2))


def latent_tokens(arch, image_hw: tuple[int, int]) -> int:
    """Generation tokens of an image: VAE down-sampling, then latent_patch_size² patches."""
    step = vae_downsample(arch) * arch.latent_patch_size
    return (image_hw[0] // step) * (image_hw[1] // step)


def _input_grad(train: Trainable, *, vit: bool, gen: bool) -> bool:
    """Whether the decoder's input embeddings carry a gradient (something before the decoder trains)."""
    return train.embed or (vit and (train.vit or train.connector)) or (gen and train.gen_io)


# -- SFT ----------------------------------------------------------------------------------------------
def sft_step_flops(arch, layout: SFTLayout, train: Trainable, *, checkpointing: bool = False) -> FlopCount:
    """One Unified-SFT step (forward + backward) on a batch with `layout`'s token counts."""
    d, vocab = arch.llm.hidden_size, arch.llm.vocab_size
    grad_in = _input_grad(train, vit=bool(layout.vit_patches), gen=layout.gen_tokens > 0)
    out = _decoder(arch, layout.und_tokens, layout.gen_tokens, layout.attention_pairs, train,
                   input_grad=grad_in, checkpointing=checkpointing)
    out = out + _vit(arch, layout.vit_patches, train)
    lm = 2.0 * layout.labelled * d * vocab
    out.add("lm_head", forward=lm, backward=lm * (1.0 + float(train.lm_head)))
    if layout.gen_images:
        out = out + _gen_io(arch, layout.gen_tokens, layout.gen_images, train, head=True)
        out.add("vae", forward=layout.gen_images * vae_flops(arch.vae, layout.gen_hw, encoder=True))
    return out


# -- sampling and GRPO --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutShape:
    """One GRPO rollout batch: `prompts` contexts of `prefix_tokens` tokens, `group` samples each, `steps`
    Euler steps of an image of `image_hw` pixels. Guidance: `branches` velocity branches (1 none, 2 text
    CFG, 3 text + image) over `guided` of the steps, the unconditional prefixes `uncond_tokens` long."""

    prompts: int
    group: int
    steps: int
    prefix_tokens: int
    image_hw: tuple[int, int]
    branches: int = 1
    guided: int = 0
    uncond_tokens: tuple[int, ...] = ()

    def latent_tokens(self, arch) -> int:
        return latent_tokens(arch, self.image_hw)


def guided_steps(steps: int, shift: float, interval: tuple[float, float]) -> int:
    """How many of a schedule's steps fall inside the guidance interval (lo < t <= hi)."""
    from cmrp.sampling.flow import sampling_timesteps

    ts = sampling_timesteps(steps, shift)
    return sum(1 for i in range(steps) if guidance_active(float(ts[i]), tuple(interval)))


def _gen_block(arch, samples: float, latent: int, keys_before: float, train: Trainable | None, *,
               checkpointing: bool = False) -> FlopCount:
    """The image block (start marker, latent tokens, end marker) of `samples` sequences after a cached
    prefix of `keys_before` keys: decoder, vae2llm / time embedding and the velocity head."""
    block = latent + 2
    out = _decoder(arch, samples * 2, samples * latent, samples * block * (keys_before + block), train,
                   input_grad=train is not None and train.gen_io, checkpointing=checkpointing)
    return out + _gen_io(arch, samples * latent, samples, train, head=True)


def _prefix(arch, sequences: float, tokens: float, train: Trainable | None = None, *,
            checkpointing: bool = False) -> FlopCount:
    """Encoding text prefixes (`sequences` of `tokens` tokens) into a key/value cache."""
    return _decoder(arch, sequences * tokens, 0, sequences * tokens * tokens, train,
                    input_grad=train is not None and train.embed, checkpointing=checkpointing, cache_only=True)


def rollout_flops(arch, shape: RolloutShape, *, reuse_prefix: bool = True, free_prefix: bool = False) -> FlopCount:
    """Sampling a GRPO rollout batch (no gradients). reuse_prefix: each context's prefix (and each
    guidance branch's) is encoded once and its cache shared by the group's samples and every step;
    otherwise it is re-encoded for every sample at every step (the naive baseline; no guidance).
    free_prefix: the lower bound where the prefix costs nothing (no encoding, no keys to attend to)."""
    latent = shape.latent_tokens(arch)
    n = shape.prompts * shape.group
    out = FlopCount()
    prefix = 0 if free_prefix else shape.prefix_tokens
    if not free_prefix and reuse_prefix:
        out = out + _prefix(arch, shape.prompts, prefix)
        for uncond in shape.uncond_tokens:
            out = out + _prefix(arch, shape.prompts, uncond)
    if not free_prefix and not reuse_prefix:
        out = out + shape.steps * _prefix(arch, n, prefix)
    plain = _gen_block(arch, n, latent, prefix, None)
    if shape.branches > 1 and shape.guided:
        # guided steps run every branch as one batch; each branch's cache is padded to the longest prefix
        keys = max([prefix, *(() if free_prefix else shape.uncond_tokens)])
        guided = _gen_block(arch, n * shape.branches, latent, keys, None)
        out = out + shape.guided * guided + (shape.steps - shape.guided) * plain
    else:
        out = out + shape.steps * plain
    out.add("vae", forward=n * vae_flops(arch.vae, shape.image_hw, encoder=False, decoder=True))
    return out


def grpo_update_flops(arch, shape: RolloutShape, train: Trainable, *, window: int, inner_epochs: int = 1,
                      minibatch: int | None = None, kl: bool = False, checkpointing: bool = False) -> FlopCount:
    """The PPO update over a rollout's window: for every stored step, the velocity of every sample is
    recomputed with gradients (all guidance branches of a guided step) and back-propagated. When the
    understanding expert trains, every call re-encodes its samples' prefixes with gradients too. `kl`:
    one more forward per transition under the reference policy."""
    latent = shape.latent_tokens(arch)
    n = shape.prompts * shape.group
    branches = shape.branches if shape.guided else 1
    keys = max([shape.prefix_tokens, *shape.uncond_tokens])
    per_pass = _gen_block(arch, n * branches, latent, keys, train, checkpointing=checkpointing)
    out = window * inner_epochs * per_pass
    if kl:
        out = out + window * inner_epochs * _gen_block(arch, n * branches, latent, keys, None)
    if train.und != "frozen" or train.embed:
        calls = window * inner_epochs * -(-shape.group // (minibatch or shape.group)) * shape.prompts
        per_call = _prefix(arch, 1, shape.prefix_tokens, train, checkpointing=checkpointing)
        for uncond in shape.uncond_tokens:
            per_call = per_call + _prefix(arch, 1, uncond, train, checkpointing=checkpointing)
        out = out + calls * per_call
    return out


def grpo_iteration_flops(arch, shape: RolloutShape, train: Trainable, *, window: int, inner_epochs: int = 1,
                         minibatch: int | None = None, kl: bool = False,
                         checkpointing: bool = False) -> dict[str, FlopCount]:
    """One Character-GRPO iteration: the rollout (with and without prefix reuse) and the update."""
    naive_shape = replace(shape, branches=1, guided=0, uncond_tokens=())
    return {
        "rollout": rollout_flops(arch, shape, reuse_prefix=True),
        "rollout_no_prefix_reuse": rollout_flops(arch, naive_shape, reuse_prefix=False),
        "rollout_free_prefix": rollout_flops(arch, shape, free_prefix=True),
        "update": grpo_update_flops(arch, shape, train, window=window, inner_epochs=inner_epochs,
                                    minibatch=minibatch, kl=kl, checkpointing=checkpointing),
    }
