"""Memory of a BAGEL training step per GPU, estimated from the architecture, the parameter counts and
the batch's token counts: what `cmrp plan` prints before anything is launched.

Terms, per GPU:
- weights: every parameter at its storage precision (fp32 master weights under `*-mixed` and
  `32-true`, bf16 under `bf16-true`, 4-bit NF4 for QLoRA's quantised base), plus the frozen autoencoder
  (outside the trained module, so never sharded); FSDP shards the module's weights over all GPUs;
- gradients: one per trainable parameter at its precision (sharded by FSDP); DDP also keeps its
  gradient buckets (a second copy, `gradient_as_bucket_view` being off by default);
- optimiser: AdamW's two moments per trainable parameter (SGD's momentum: one), sharded by FSDP;
- compute copies: `*-mixed` under DDP runs matmuls on bf16 casts of the fp32 weights — autocast keeps
  the trainable ones for the whole forward, and saves each frozen weight a backward needs (LoRA's base)
  unless its layer is checkpointed; FSDP instead gathers one wrapped unit at a time in bf16 (two in
  flight, with prefetching);
- activations: what autograd keeps from the forward for the backward. Per decoder layer and token the
  count follows cmrp's MoT layer exactly (RMSNorm internals in fp32, the MoT's per-expert gathers when
  a layer holds both kinds of token, the fused attention's inputs and output, the float copy of the
  attention mask per layer), checked against a live count (`LiveTensorBytes`) on the tiny card. With
  gradient checkpointing each decoder layer keeps only its input, and one layer is recomputed at a time.
  The ViT keeps activations only when it trains (it is not checkpointed);
- peak: weights + optimiser + the larger of (activations + gradients of the output layers) and
  (all gradients + one layer's recomputation), plus compute copies — i.e. backward starts with every
  activation alive and ends with every gradient allocated.
Not counted: the CUDA context and allocator fragmentation (typically 1-3 GB on a GPU), NCCL buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cmrp.errors import ConfigError
from cmrp.perf.flops import latent_tokens

__all__ = ["MemoryEstimate", "ParamCounts", "Precision", "SequenceShape", "Strategy", "estimate_memory",
           "grpo_update_shape"]

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + double-quantised absmax per 64-block


@dataclass(frozen=True)
class Precision:
    """Lightning's `trainer.precision`: storage bytes of the weights, bytes of the activations, autocast."""

    name: str
    param_bytes: int
    compute_bytes: int
    autocast: bool

    @classmethod
    def parse(cls, name: str) -> Precision:
        name = str(name)
        if name in ("32-true", "32", "32-mixed"):
            return cls(name, 4, 4, False)
        if name in ("bf16-mixed", "16-mixed"):
            return cls(name, 4, 2, True)
        if name in ("bf16-true", "16-true", "bf16", "16"):
            return cls(name, 2, 2, False)
        raise ConfigError(f"trainer.precision: {name!r} is not one `cmrp plan` can estimate; "
                          "use 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true")


@dataclass(frozen=True)
class Strategy:
    """How the model is spread: `single` (one GPU), `ddp` (replicated) or `fsdp` (sharded) over `world` GPUs."""

    kind: str
    world: int

    @classmethod
    def parse(cls, name: str, world: int) -> Strategy:
        name = str(name)
        if world < 1:
            raise ConfigError(f"--gpus x --nodes must be at least 1 (got {world})")
        if name == "fsdp":
            return cls("fsdp", world)
        if name in ("ddp", "auto", "ddp_spawn", "ddp_find_unused_parameters_true"):
            return cls("ddp" if world > 1 else "single", world)
        raise ConfigError(f"trainer.strategy: {name!r} cannot be estimated by `cmrp plan` (it knows ddp, fsdp "
                          "and auto); plan with trainer.strategy=fsdp or ddp")


@dataclass
class ParamCounts:
    """Parameter counts of a model as it will train (after LoRA / QLoRA wrapping and group freezing)."""

    total: int  # module parameters (the autoencoder excluded)
    trainable: int
    quantized: int = 0  # QLoRA: base weights stored in 4 bits
    autoencoder: int = 0  # frozen, outside the module
    frozen_linear: int = 0  # frozen weights of linear layers a backward multiplies by (LoRA's base)
    largest_unit: int = 0  # parameters of the largest FSDP unit (one decoder layer)
    unwrapped: int = 0  # parameters outside every FSDP unit (embeddings, heads): the root unit
    lora_linears_per_layer: int = 0
    lora_rank: int = 0


@dataclass(frozen=True)
class SequenceShape:
    """The padded batch a step sees: `batch` sequences of `length` tokens, of which (over the batch)
    `gen_tokens` are generation tokens; `vit_patches` per understood image (only held when the ViT
    trains), `labelled` tokens through the LM head, `keys_before`: cached keys each query also sees (GRPO
    update: the prompt's prefix), `gen_images` images the VAE encodes (`gen_hw` pixels)."""

    batch: int
    length: int
    gen_tokens: int
    labelled: int = 0
    vit_patches: tuple[int, ...] = ()
    keys_before: int = 0
    gen_images: int = 0
    gen_hw: tuple[int, int] = (0, 0)

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @classmethod
    def from_batch(cls, batch, arch) -> SequenceShape:
        """The shape of a collated `BagelBatch` (as the kernels see it: padded)."""
        b, length = batch.input_ids.shape
        p = arch.vit.patch_size
        images = [] if batch.vit_pixels is None else list(batch.vit_pixels)
        gen_images = 0 if batch.vae_pixels is None else int(batch.vae_pixels.shape[0])
        return cls(batch=int(b), length=int(length), gen_tokens=int(batch.is_gen.sum()),
                   labelled=int((batch.labels != -100).sum()),
                   vit_patches=tuple((im.shape[-2] // p) * (im.shape[-1] // p) for im in images),
                   gen_images=gen_images, gen_hw=tuple(batch.vae_pixels.shape[-2:]) if gen_images else (0, 0))

    @property
    def mixed_routing(self) -> bool:
        return 0 < self.gen_tokens < self.tokens


@dataclass
class MemoryEstimate:
    """Bytes per GPU by term; `peak(checkpointing)` combines them as described in the module docstring."""

    weights: float
    gradients: float
    optimizer: float
    compute_copies: float
    compute_copies_checkpointed: float
    activations: float
    activations_checkpointed: float
    backward_working: float  # gradients of the output layers while every activation is still alive
    recompute: float  # one decoder layer's activations, recomputed in backward when checkpointing
    layer_backward: float  # gradients inside one decoder layer's backward
    transient: float = 0.0  # outside the step's graph: VAE encoding of the batch's images
    notes: list[str] = field(default_factory=list)

    def peak(self, checkpointing: bool) -> float:
        acts = self.activations_checkpointed if checkpointing else self.activations
        copies = self.compute_copies_checkpointed if checkpointing else self.compute_copies
        end = self.gradients + self.layer_backward + (self.recompute if checkpointing else 0.0)
        during = max(acts + self.backward_working, end, self.transient)
        return self.weights + self.optimizer + copies + during

    def as_dict(self) -> dict[str, float]:
        keys = ("weights", "gradients", "optimizer", "compute_copies", "compute_copies_checkpointed",
                "activations", "activations_checkpointed", "backward_working", "recompute", "layer_backward",
                "transient")
        out = {k: getattr(self, k) for k in keys}
        out["peak"] = self.peak(False)
        out["peak_checkpointed"] = self.peak(True)
        return out


# -- activations --------------------------------------------------------------------------------------
def _profile(precision: Precision, strategy: Strategy) -> tuple[int, int, bool]:
    """(residual bytes, matmul-input bytes, autocast) of the activations. FSDP's mixed precision computes
    with bf16 copies of the weights, so its activations look like bf16-true ones."""
    if precision.autocast and strategy.kind == "fsdp":
        return 2, 2, False
    if precision.autocast:
        return 4, 2, True
    return precision.param_bytes, precision.compute_bytes, False


def decoder_layer_bytes(arch, shape: SequenceShape, residual: int, matmul: int, autocast: bool,
                        lora_rank: int = 0, lora_linears: int = 0) -> float:
    """Bytes one MoT decoder layer keeps for backward over `shape`'s tokens (its mask copy excluded).

    Per token: two RMSNorms (fp32 input copy, rsqrt, normalised input at the residual precision), the
    q/k/v input (one shared tensor, or one per projection when the layer routes two experts or
    autocast casts it per call), q/k norms (fp32 copy + normalised), attention's q, k, v (repeated to
    every head) and output, the o_proj input (a gather when routing), the MLP input and its four
    intermediate-size tensors, LoRA's rank-r intermediates."""
    llm = arch.llm
    d, i = llm.hidden_size, llm.intermediate_size
    hk = llm.num_key_value_heads * llm.head_dim
    h, kv = llm.num_attention_heads, llm.num_key_value_heads
    mixed = shape.mixed_routing
    norms = 2 * (4 * d + residual * d + 4)
    qkv_in = matmul * d * (3 if (mixed or autocast) else 1)
    qk_norms = (4 * d + 4 * h + matmul * d) + (4 * hk + 4 * kv + matmul * hk)
    attention = 4 * matmul * d + 4 * h
    o_in = matmul * d if mixed else 0
    mlp = matmul * d * (2 if autocast else 1) + 4 * matmul * i
    rope = 8 * llm.head_dim if (residual == 2 and not autocast) else 0  # per-layer cos/sin casts
    lora = 2 * matmul * lora_rank * lora_linears
    per_token = norms + qkv_in + qk_norms + attention + o_in + mlp + rope + lora
    return float(shape.tokens * per_token)


def attention_mask_bytes(shape: SequenceShape, matmul: int) -> float:
    """The float copy of the boolean mask each layer's attention makes (and keeps for its backward)."""
    return float(shape.batch * shape.length * (shape.keys_before + shape.length) * matmul)


def vit_layer_bytes(arch, patches: int, residual: int, matmul: int, autocast: bool) -> float:
    """Bytes one SigLIP layer keeps over `patches` tokens: two LayerNorms (input + statistics), the q/k/v
    input(s), attention's per-image q, k, v, output, the out-projection and fc1 inputs, fc1's output and
    its GELU."""
    v = arch.vit
    d, i = v.hidden_size, v.intermediate_size
    per_token = 2 * (residual * d + 8) + matmul * d * ((3 if autocast else 1) + 6) + 4 * v.num_attention_heads \
        + 2 * matmul * i
    return float(patches * per_token)


def _activations(arch, shape: SequenceShape, precision: Precision, strategy: Strategy, train, counts: ParamCounts
                 ) -> dict[str, float]:
    residual, matmul, autocast = _profile(precision, strategy)
    llm = arch.llm
    layers = llm.num_hidden_layers
    layer = decoder_layer_bytes(arch, shape, residual, matmul, autocast, counts.lora_rank,
                                counts.lora_linears_per_layer)
    mask = attention_mask_bytes(shape, matmul)
    d, vocab = llm.hidden_size, llm.vocab_size
    tokens = shape.tokens
    # model-level tensors: the boolean mask, rope tables, the final norm, the heads' inputs and the log-softmax
    model = shape.batch * shape.length * (shape.keys_before + shape.length) + 2 * 4 * tokens * llm.head_dim
    model += tokens * (4 * d + residual * d + 4)
    model += shape.labelled * (matmul * d + 4 * vocab) + shape.gen_tokens * matmul * d
    vit = 0.0
    if shape.vit_patches and train.vit:
        n = sum(shape.vit_patches)
        vit = arch.vit.num_hidden_layers * vit_layer_bytes(arch, n, residual, matmul, autocast)
    if shape.vit_patches and (train.vit or train.connector):
        vit += sum(shape.vit_patches) * matmul * (arch.vit.hidden_size + 2 * d)
    full = layers * (layer + mask) + model + vit
    checkpointed = layers * residual * d * tokens + model + vit
    # backward's first gradients: d(logits) in fp32 (+ their cast), d(hidden)
    working = shape.labelled * vocab * (4 + matmul) + tokens * d * 4
    # inside one layer's backward: fp32-sized gradients of its widest intermediates
    layer_backward = tokens * (2 * llm.intermediate_size + 2 * d) * 4
    return {"full": full, "checkpointed": checkpointed, "recompute": layer + mask, "working": working,
            "layer_backward": layer_backward}


def _vae_transient(arch, shape: SequenceShape, matmul: int) -> float:
    """Encoding the batch's images before the forward: a few full-resolution feature maps at once."""
    vae = arch.vae or {}
    if vae.get("kind", "pixel") != "flux" or not shape.gen_images:
        return 0.0
    h, w = shape.gen_hw
    return 3.0 * shape.gen_images * int(vae.get("ch", 128)) * h * w * matmul


# -- the estimate ---------------------------------------------------------------------------------------
def estimate_memory(arch, counts: ParamCounts, shape: SequenceShape, *, precision: Precision, strategy: Strategy,
                    train, optimizer: str = "adamw") -> MemoryEstimate:
    """Per-GPU memory of one training step (see the module docstring for each term)."""
    shard = strategy.world if strategy.kind == "fsdp" else 1
    pb = precision.param_bytes
    dense = counts.total - counts.quantized
    weights = (dense * pb + counts.quantized * NF4_BYTES) / shard + counts.autoencoder * pb
    grads = counts.trainable * pb / shard
    if strategy.kind == "ddp":
        grads *= 2  # DDP's gradient buckets
    states = {"adamw": 2, "sgd": 1}.get(optimizer, 2)
    opt = counts.trainable * pb * states / shard
    notes = []
    copies = copies_ckpt = 0.0
    if precision.autocast and strategy.kind != "fsdp":
        # trainable weights: cached by autocast for the whole forward; frozen ones a backward multiplies by:
        # saved with their layer, or (checkpointing) re-cast for the one layer being recomputed
        copies = (counts.trainable + counts.frozen_linear) * 2.0
        copies_ckpt = (counts.trainable + counts.frozen_linear / max(1, arch.llm.num_hidden_layers)) * 2.0
        notes.append("bf16 copies of the fp32 weights made by autocast")
    elif strategy.kind == "fsdp":
        # the root unit (embeddings, heads) stays gathered through the step, layer units two at a time
        copies = copies_ckpt = (counts.unwrapped + 2.0 * counts.largest_unit) * precision.compute_bytes
        notes.append("FSDP's root unit and two layer units gathered")
    if counts.quantized:
        # each 4-bit layer is de-quantised to bf16 for its matmul (one layer's worth at a time)
        copies += 2.0 * counts.largest_unit
        copies_ckpt += 2.0 * counts.largest_unit
    acts = _activations(arch, shape, precision, strategy, train, counts)
    _, matmul, _ = _profile(precision, strategy)
    return MemoryEstimate(
        weights=weights, gradients=grads, optimizer=opt, compute_copies=copies,
        compute_copies_checkpointed=copies_ckpt, activations=acts["full"],
        activations_checkpointed=acts["checkpointed"], backward_working=acts["working"],
        recompute=acts["recompute"], layer_backward=acts["layer_backward"], transient=_vae_transient(arch, shape, matmul), notes=notes,
    )


def grpo_update_shape(arch, *, minibatch: int, branches: int, prefix_tokens: int, image_hw: tuple[int, int]
                      ) -> SequenceShape:
    """The sequences one GRPO update pass back-propagates through: per sample and guidance branch, the
    image block (markers + latent tokens) attending to the cached prefix."""
    latent = latent_tokens(arch, image_hw)
    b = minibatch * branches
    return SequenceShape(batch=b, length=latent + 2, gen_tokens=b * latent, keys_before=prefix_tokens)
