"""The BAGEL model: MoT language model + SigLIP understanding encoder + flow generation head.

Top-level parameter names are the official ones: `language_model.*`, `vit_model.*`, `connector.*`,
`vit_pos_embed.pos_embed`, `time_embedder.mlp.{0,2}`, `vae2llm`, `llm2vae`, `latent_pos_embed.pos_embed`.
The model works on padded batches: a sequence holds text tokens, ViT tokens (an understood image)
and noisy latent tokens (an image being generated); `BagelBatch` says which is which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cmrp.backbones.bagel.autoencoder import build_autoencoder
from cmrp.backbones.bagel.qwen2_mot import KVCache, LLMConfig, Qwen2ForCausalLM
from cmrp.backbones.bagel.siglip import SiglipVisionModel, ViTConfig
from cmrp.errors import ConfigError

__all__ = ["VAE_POSTERIOR", "Bagel", "BagelArch", "BagelBatch", "flow_timesteps", "patchify", "shift_timesteps",
           "unpatchify"]

VAE_POSTERIOR = ("sample", "mean")


@dataclass
class BagelArch:
    """Architecture of one BAGEL model (a card's `architecture:` mapping)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: dict = field(default_factory=lambda: {"kind": "pixel", "downsample": 2})
    visual_gen: bool = True
    visual_und: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 32
    vit_max_num_patch_per_side: int = 70
    # [min_side, max_side]: understood images keep their aspect ratio, scaled into that range and rounded to
    # the patch size (BAGEL's understanding transform; variable token counts, packed); null: squared to
    # vit.image_size
    vit_resize: list[int] | None = None
    timestep_shift: float = 1.0
    # side of generated images (and of input images entering as VAE latents); null: vit.image_size. BAGEL-7B
    # generates 1024 px (max_latent_size 64 x latent_patch_size 2 x the FLUX VAE's 8) while it understands
    # images of at most 980 px, which is not a multiple of the VAE's 16-px latent patch
    gen_image_size: int | None = None
    # latents of images through a FLUX autoencoder: `sample` the posterior (the official trainer and
    # inferencer) or take its `mean` (deterministic; a departure kept as an option)
    vae_posterior: str = "sample"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.vae_posterior not in VAE_POSTERIOR:
            raise ConfigError(f"backbone card key architecture.vae_posterior: {self.vae_posterior!r} is not one of "
                              f"{', '.join(VAE_POSTERIOR)} (sample: the official behaviour; mean: deterministic latents)")

    @classmethod
    def from_dict(cls, spec: dict) -> BagelArch:
        spec = dict(spec)
        llm = LLMConfig(**spec.pop("llm", {}))
        vit = ViTConfig(**spec.pop("vit", {}))
        return cls(llm=llm, vit=vit, **spec)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


class PositionEmbedding(nn.Module):
    """Fixed 2D sin-cos table over a max_side x max_side grid (index = row * max_side + col)."""

    def __init__(self, max_side: int, hidden: int):
        super().__init__()
        rows, cols = torch.meshgrid(torch.arange(max_side), torch.arange(max_side), indexing="ij")
        # as in the official table: the first half of the channels encodes the column, the second the row
        table = torch.cat([_sincos_1d(hidden // 2, cols.flatten()), _sincos_1d(hidden // 2, rows.flatten())], dim=1)
        self.pos_embed = nn.Parameter(table.float(), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by a 2-layer MLP (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        feats = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class MLPconnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], each patch flattened in (row, col, channel) order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify` for an [B, (h/p)*(w/p), p*p*c] tensor."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h, w)


def grid_position_ids(side_h: int, side_w: int, max_side: int, device=None) -> torch.Tensor:
    rows = torch.arange(side_h, device=device)[:, None]
    cols = torch.arange(side_w, device=device)[None, :]
    return (rows * max_side + cols).flatten()


def shift_timesteps(normal: torch.Tensor, shift: float) -> torch.Tensor:
    """Training timesteps from standard-normal draws: logit-normal t = sigmoid(draw), shifted toward noise."""
    t = torch.sigmoid(normal)
    return shift * t / (1 + (shift - 1) * t)


def flow_timesteps(n: int, shift: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """`n` training timesteps (`shift_timesteps` of fresh standard-normal draws)."""
    return shift_timesteps(torch.randn(n, generator=generator, device=device), shift)


@dataclass
class BagelBatch:
    """A padded batch. Per position (B x L): which kind of token it is and what it sees."""

    input_ids: torch.Tensor  # [B, L] text token ids (pad elsewhere)
    position_ids: torch.Tensor  # [B, L] rope positions (an image shares one)
    attention_mask: torch.Tensor  # [B, L, L] bool
    is_gen: torch.Tensor  # [B, L] bool: VAE latent tokens, noisy or clean (generation expert)
    is_vit: torch.Tensor  # [B, L] bool: understanding image tokens
    labels: torch.Tensor  # [B, L] next-token targets (-100 = no loss)
    # [Nu, 3, H, W] in [0, 1], order = appearance order; a list of [3, Hi, Wi] when sizes differ
    vit_pixels: torch.Tensor | list[torch.Tensor] | None = None
    vae_pixels: torch.Tensor | None = None  # [Nv, 3, H, W] in [0, 1]: images entering as VAE latents, in order
    vae_noisy: torch.Tensor | None = None  # [Nv] bool: generated (noisy latents, flow loss) vs clean input image
    valid: torch.Tensor | None = None  # [B, L] bool: not padding
    # [B, 2] (tokens, next rope position) of each context before its last text segment: the text-free
    # guidance branch is this prefix of the context (whole context when an image follows the last text)
    text_free: torch.Tensor | None = None
    # [number of noisy images] standard-normal draws that set their flow times (`shift_timesteps`); None: drawn
    timestep_draws: torch.Tensor | None = None
    task_ids: list[str] = field(default_factory=list)

    def to(self, device) -> BagelBatch:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                return [t.to(device) for t in v]
            return v

        moved = {k: move(v) for k, v in self.__dict__.items()}
        return BagelBatch(**moved)


class Bagel(nn.Module):
    def __init__(self, arch: BagelArch):
        super().__init__()

        self.arch = arch
        hidden = arch.llm.hidden_size
        self.language_model = Qwen2ForCausalLM(arch.llm)
        if arch.visual_und:
            if arch.vit.num_patches_per_side > arch.vit_max_num_patch_per_side:
                # the LLM-side position table would be indexed past its end (a device-side assert on a GPU)
                raise ConfigError(
                    f"backbone card: architecture.vit.image_size {arch.vit.image_size} gives "
                    f"{arch.vit.num_patches_per_side} patches per side, more than "
                    f"architecture.vit_max_num_patch_per_side {arch.vit_max_num_patch_per_side}; raise "
                    "vit_max_num_patch_per_side or lower vit.image_size")
            self.vit_model = SiglipVisionModel(arch.vit)
            self.connector = MLPconnector(arch.vit.hidden_size, hidden)
            self.vit_pos_embed = PositionEmbedding(arch.vit_max_num_patch_per_side, hidden)
        if arch.visual_gen:
            # frozen and kept outside this module's parameters (not in state_dict, never trained), as
            # BAGEL keeps its VAE apart from the model; `.to()` still moves it (see `_apply`)
            vae = build_autoencoder(arch.vae).requires_grad_(False).eval()
            self._vae_holder = [vae]
            p = arch.latent_patch_size
            self.patch_latent_dim = p * p * self.vae.z_channels
            self.time_embedder = TimestepEmbedder(hidden)
            self.vae2llm = nn.Linear(self.patch_latent_dim, hidden)
            self.llm2vae = nn.Linear(hidden, self.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(arch.max_latent_size, hidden)
            # BAGEL starts the velocity head at zero: the first prediction is "no motion"
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)

    @property
    def vae(self):
        """The image autoencoder (pixel space or FLUX); not a submodule, so not in `state_dict`."""
        return self._vae_holder[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_vae_holder"):
            self._vae_holder[0]._apply(fn, *args, **kwargs)
        return self

    # -- token embeddings per kind ------------------------------------------------------------
    def vit_token_count(self, image_hw: tuple[int, int]) -> int:
        """Number of ViT tokens of an image of size image_hw (both multiples of the patch size)."""
        p = self.arch.vit.patch_size
        return (image_hw[0] // p) * (image_hw[1] // p)

    def vit_tokens(self, pixels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Understanding tokens of images in [0, 1]: [N, 3, H, W] -> [N, P, hidden]; a list of
        [3, Hi, Wi] images of different sizes -> [sum Pi, hidden], packed in order (each image attends
        only to itself). Position ids are flattened over the grid, row * side + col: over the ViT's own
        `num_patches_per_side` for its position embedding, over `vit_max_num_patch_per_side` for the
        LLM-side sin-cos table (the same ids in the official model, where both sides are 70)."""
        if isinstance(pixels, torch.Tensor):
            return self.vit_tokens(list(pixels)).view(pixels.shape[0], -1, self.arch.llm.hidden_size)
        cfg = self.arch.vit
        p = cfg.patch_size
        chunks, vit_pos, llm_pos, seqlens = [], [], [], []
        for img in pixels:
            h, w = img.shape[-2:]
            if h % p or w % p or h // p > cfg.num_patches_per_side or w // p > cfg.num_patches_per_side:
                raise ValueError(
                    f"understanding image of size {h}x{w}: sides must be multiples of the ViT patch size {p} "
                    f"and at most architecture.vit.image_size={cfg.image_size}"
                )
            chunks.append(patchify(img[None] * 2.0 - 1.0, p)[0])
            vit_pos.append(grid_position_ids(h // p, w // p, cfg.num_patches_per_side, img.device))
            llm_pos.append(grid_position_ids(h // p, w // p, self.arch.vit_max_num_patch_per_side, img.device))
            seqlens.append(chunks[-1].shape[0])
        dtype = self.connector.fc1.weight.dtype
        feats = self.vit_model(torch.cat(chunks).to(dtype), torch.cat(vit_pos), seqlens)
        feats = self.connector(feats)
        return feats + self.vit_pos_embed(torch.cat(llm_pos)).to(feats.dtype)

    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [N, z, h, w] of images [N, 3, H, W] in [0, 1]: a sample of the autoencoder's posterior
        or its mean, as `arch.vae_posterior` says (`generator`: the sample's noise; None: the global RNG)."""
        return self.vae.encode(pixels, sample=self.arch.vae_posterior == "sample", generator=generator)

    def check_gen_image_size(self, side: int) -> None:
        """A generated image's side must split into whole latent patches that fit the position table."""
        unit = self.vae.downsample * self.arch.latent_patch_size
        if side % unit or side // unit > self.arch.max_latent_size:
            key = "gen_image_size" if self.arch.gen_image_size else "vit.image_size (gen_image_size unset)"
            raise ConfigError(
                f"backbone card key architecture.{key}: generated images of {side} px must be a multiple of "
                f"{unit} px (VAE downsampling x latent_patch_size) and at most {unit * self.arch.max_latent_size} "
                f"px (max_latent_size {self.arch.max_latent_size}); set architecture.gen_image_size to one")

    def latent_shape(self, image_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(channels, h, w) of the latent of an image of size image_hw."""
        d = self.vae.downsample
        return self.vae.z_channels, image_hw[0] // d, image_hw[1] // d

    def latent_tokens(self, x_t: torch.Tensor, t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Noisy patchified latents [N, T, p*p*c] at times t [N] -> [N, T, hidden] generation tokens."""
        p = self.arch.latent_patch_size
        pos = grid_position_ids(latent_hw[0] // p, latent_hw[1] // p, self.arch.max_latent_size, x_t.device)
        w = self.vae2llm.weight
        return self.vae2llm(x_t.to(w.dtype)) + self.time_embedder(t)[:, None] + self.latent_pos_embed(pos).to(w.dtype)

    def embed(self, batch: BagelBatch, gen_tokens: torch.Tensor | None) -> torch.Tensor:
        emb = self.language_model.model.embed_tokens(batch.input_ids)
        if batch.vit_pixels is not None and bool(batch.is_vit.any()):
            vit = self.vit_tokens(batch.vit_pixels)  # a stacked tensor, or a list of variable-size images
            emb = emb.masked_scatter(batch.is_vit[..., None], vit.reshape(-1, vit.shape[-1]).to(emb.dtype))
        if gen_tokens is not None:
            emb = emb.masked_scatter(batch.is_gen[..., None], gen_tokens.reshape(-1, gen_tokens.shape[-1]).to(emb.dtype))
        return emb

    def decode_hidden(
        self, embeds, is_gen, position_ids, mask, past: KVCache | None = None, use_cache: bool = False,
        valid: torch.Tensor | None = None,
    ):
        """Hidden states of the decoder; `valid` [B, L] marks padding that no layer computes (zeros there)."""
        return self.language_model.model(
            embeds, is_gen if self.arch.llm.use_moe else None, position_ids, mask, past=past,
            use_cache=use_cache, checkpoint=self.arch.gradient_checkpointing, valid=valid,
        )
