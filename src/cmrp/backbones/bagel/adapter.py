"""The `bagel` backbone adapter: BAGEL (any size, tiny included) behind the backbone protocol."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.backbones.bagel.model import Bagel, BagelArch, BagelBatch, flow_timesteps, patchify, unpatchify
from cmrp.backbones.bagel.packing import IGNORE, ImageLoader, collate
from cmrp.backbones.bagel.qwen2_mot import KVCache
from cmrp.backbones.common import answer_questions, select_lora_targets
from cmrp.backbones.tokenizer import TextTokenizer
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.jsonio import write_json
from cmrp.registry import BACKBONES
from cmrp.sampling.flow import flow_step, sample_flow, sampling_timesteps
from cmrp.sampling.guidance import Guidance, combine_guidance
from cmrp.sampling.rollout import Rollout

__all__ = ["BagelAdapter", "resolve_weights"]

_LAYERS = r"language_model\.model\.layers\.\d+\."
_UND_LINEAR = _LAYERS + r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_GEN_LINEAR = _LAYERS + r"(self_attn\.(q|k|v|o)_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj)"
DEFAULT_LORA_TARGETS = {
    "understanding": [_UND_LINEAR],
    "generation": [_GEN_LINEAR],
    "default": [_UND_LINEAR, _GEN_LINEAR],
}
_GEN_PARAMS = r"(.*_moe_gen.*|time_embedder\..*|vae2llm\..*|llm2vae\..*|latent_pos_embed\..*)"

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
AE_WEIGHTS_FILE = "ae.safetensors"  # the FLUX autoencoder (original key naming), when the backbone has one


SANDBOX_WEIGHTS = "sandbox://"  # a base shipped in the package (cmrp/sandbox/assets/<name>)


def resolve_weights(ref: str, card_name: Any = None) -> Path:
    """A card's `weights`: a local folder, a Hugging Face hub id (owner/name) found in the local cache, or
    `sandbox://<name>`, a base shipped with cmrp (`cmrp sandbox pretrain` makes them).
    Never downloads: an id that is not cached raises WeightsError saying how to fetch it."""
    where = f"backbone card {card_name!r}, key 'weights'" if card_name else "weights"
    if ref.startswith(SANDBOX_WEIGHTS):
        from cmrp.sandbox.pretrain import shipped_base

        return shipped_base(ref[len(SANDBOX_WEIGHTS):], where)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    looks_like_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_id:
        raise WeightsError(f"{where}: {ref} does not exist; point it at a checkpoint folder or a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=ref, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise WeightsError(
            f"{where}: {ref} is not in the local Hugging Face cache ({type(err).__name__}); cmrp never downloads "
            f"weights itself. Fetch them once with `hf download {ref}` (HF_HOME chooses the cache), "
            f"or download to a folder (`--local-dir DIR`) and set weights: DIR"
        ) from None


@BACKBONES.register("bagel")
class BagelAdapter:
    """Owns the BAGEL model, its tokenizer and its image pre-processing."""

    image_head = "flow"

    def __init__(self, model: Bagel, tokenizer: TextTokenizer, card: Any = None, max_text_tokens: int = 128):
        self.model = model
        self.tokenizer = tokenizer
        self.card = card
        self.arch = model.arch
        self.image_size = model.arch.vit.image_size
        self.max_text_tokens = max_text_tokens
        self._load_image = ImageLoader(self.image_size)
        c, h, w = model.latent_shape((self.image_size, self.image_size))
        p = model.arch.latent_patch_size
        self._latent_chw = (c, h, w)
        self.gen_tokens = (h // p) * (w // p)
        self.vit_tokens = model.arch.vit.num_patches_per_side**2
        self._load_vit_image = self._load_image
        if model.arch.vit_resize:  # variable-size understanding: token count follows each image's size
            lo, hi = (int(v) for v in model.arch.vit_resize)
            self._load_vit_image = ImageLoader(self.image_size, variable=(lo, hi, model.arch.vit.patch_size))
            self.vit_tokens = lambda image: model.vit_token_count(tuple(image.shape[-2:]))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> BagelAdapter:
        """Random init from the card's `architecture`, or load `card.weights`: a folder (the official
        layout or one saved by cmrp) or a hub id already in the local Hugging Face cache."""
        if card.get("weights"):
            folder = resolve_weights(str(card["weights"]), card.get("name"))
            return cls.from_pretrained(folder, dtype=dtype, card=card)
        spec = _plain(card.get("architecture") or {})
        vocab = int(spec.get("llm", {}).get("vocab_size", 1024))
        tok_ref = card.get("tokenizer") or "train-bpe"
        if tok_ref == "train-bpe":
            if not corpus:
                raise ConfigError("backbone card tokenizer 'train-bpe' needs a text corpus (the character's texts)")
            tokenizer = TextTokenizer.train_bpe(corpus, vocab_size=vocab)
        else:
            tokenizer = TextTokenizer.load(tok_ref)
        if tokenizer.vocab_size > vocab:
            raise ConfigError(
                f"backbone card {card.get('name')!r}: architecture.llm.vocab_size={vocab} is smaller than the "
                f"tokenizer's {tokenizer.vocab_size} tokens; raise vocab_size"
            )
        try:
            arch = BagelArch.from_dict(spec)
        except TypeError as err:
            raise ConfigError(f"backbone card {card.get('name')!r}: bad architecture key ({err})") from None
        model = Bagel(arch).to(dtype)
        return cls(model, tokenizer, card)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, card: Any = None) -> BagelAdapter:
        """Load a folder in the official BAGEL layout (llm_config.json, vit_config.json, ema.safetensors,
        ae.safetensors, tokenizer files) or in cmrp's own (config.json, model.safetensors, tokenizer.json,
        ae.safetensors for a FLUX autoencoder). With the official layout, `card` (when given) supplies the
        settings no file carries (timestep_shift, ...); sizes come from the folder."""
        from safetensors.torch import load_file

        from cmrp.backbones.bagel.official import is_official_layout, load_official

        path = Path(path)
        if not path.is_dir():
            raise WeightsError(f"{path} not found (or not a folder): pass an official BAGEL checkpoint folder "
                               "or a backbone saved by cmrp")
        if is_official_layout(path):
            settings = _plain(card.get("architecture") or {}) if card is not None else {}
            model, tokenizer = load_official(path, settings=settings, dtype=dtype)
            card = card if card is not None else {"name": path.name, "adapter": "bagel", "weights": str(path)}
            return cls(model, tokenizer, card)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for needed in (config_file, weights_file, path / "tokenizer.json"):
            if not needed.is_file():
                raise WeightsError(
                    f"{needed} not found: {path} is neither an official BAGEL checkpoint (llm_config.json, "
                    "vit_config.json, ema.safetensors, ae.safetensors) nor a saved cmrp BAGEL backbone. Pass a "
                    "folder written by `cmrp fit` (output_dir/checkpoint/backbone) or BagelAdapter.save_pretrained, "
                    "or the official checkpoint folder."
                )
        config = json.loads(config_file.read_text())
        model = Bagel(BagelArch.from_dict(config["architecture"]))
        state = load_file(str(weights_file))
        _load_state(model, state, str(weights_file))
        if model.arch.visual_gen and any(True for _ in model.vae.parameters()):
            ae_file = path / AE_WEIGHTS_FILE
            if not ae_file.is_file():
                raise WeightsError(f"{ae_file} not found: the backbone's FLUX autoencoder weights are missing; "
                                   "save the backbone again with BagelAdapter.save_pretrained")
            _load_state(model.vae, load_file(str(ae_file)), str(ae_file))
        return cls(model.to(dtype), TextTokenizer.load(path), config.get("card"))

    def save_official(self, path: str | Path) -> Path:
        """Write the backbone in the official BAGEL layout (what `from_pretrained` reads back)."""
        from cmrp.backbones.bagel.official import save_official

        if hasattr(self.model, "get_base_model"):
            raise ValueError("save the base model before wrapping it with PEFT, or merge the adapter first")
        return save_official(self.bagel, self.tokenizer, path)

    def save_pretrained(self, path: str | Path) -> Path:
        from cmrp.checkpoint import save_safetensors_atomic

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(_base_state_dict(self.model), path / WEIGHTS_FILE)
        if self.arch.visual_gen and any(True for _ in self.bagel.vae.parameters()):
            vae_state = {k: v.detach().contiguous() for k, v in self.bagel.vae.state_dict().items()}
            save_safetensors_atomic(vae_state, path / AE_WEIGHTS_FILE)
        card = _plain(self.card)
        config = {"adapter": "bagel", "architecture": asdict(self.arch), "card": card}
        write_json(path / CONFIG_FILE, config, ensure_ascii=True)
        self.tokenizer.save(path)
        return path

    def to(self, device) -> BagelAdapter:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bagel(self) -> Bagel:
        """The underlying Bagel module, through a PEFT wrapper if there is one."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    # -- fine-tuning -----------------------------------------------------------------------------
    def lora_targets(self, kind: str = "default") -> list[str]:
        return select_lora_targets(DEFAULT_LORA_TARGETS, self.card, kind)

    def trainable_groups(self) -> dict[str, list[str]]:
        return {"generation": [_GEN_PARAMS], "understanding": [r"(?!" + _GEN_PARAMS + r"$).*"]}

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        """Module classes that become one FSDP unit each (`trainer.strategy: fsdp`): the MoT decoder layer
        (both experts together, as one attention mixes them) and the SigLIP encoder layer."""
        from cmrp.backbones.bagel.qwen2_mot import Qwen2MoTDecoderLayer
        from cmrp.backbones.bagel.siglip import _EncoderLayer

        return {Qwen2MoTDecoderLayer, _EncoderLayer}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations
        (`finetune.gradient_checkpointing`, or the card's `architecture.gradient_checkpointing`)."""
        self.bagel.arch.gradient_checkpointing = bool(enabled)

    # -- training --------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> BagelBatch:
        return collate(
            examples, self.tokenizer, self._load_image,
            vit_tokens=self.vit_tokens, gen_tokens=self.gen_tokens, max_text_tokens=self.max_text_tokens,
            load_vit_image=self._load_vit_image,
        )

    def _forward(self, batch: BagelBatch, timestep_shift: float | None):
        model = self.bagel
        gen_tokens = target = None
        if batch.gen_pixels is not None:
            c, h, w = self._latent_chw
            x0 = patchify(model.vae.encode(batch.gen_pixels), model.arch.latent_patch_size)
            noise = torch.randn_like(x0)
            shift = model.arch.timestep_shift if timestep_shift is None else timestep_shift
            t = flow_timesteps(x0.shape[0], shift, device=x0.device)
            x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            gen_tokens = model.latent_tokens(x_t, t, (h, w))
            target = noise - x0  # velocity dx/dt pointing from data (t=0) to noise (t=1)
        embeds = model.embed(batch, gen_tokens)
        hidden, _ = model.decode_hidden(embeds, batch.is_gen, batch.position_ids, batch.attention_mask)
        return hidden, target

    def losses(self, batch: BagelBatch, *, timestep_shift: float | None = None) -> dict[str, torch.Tensor]:
        model = self.bagel
        hidden, target = self._forward(batch, timestep_shift)
        sel = batch.labels != IGNORE
        if bool(sel.any()):
            logits = model.language_model.lm_head(hidden[sel])
            ce = F.cross_entropy(logits.float(), batch.labels[sel])
        else:
            ce = hidden.sum() * 0.0
        if target is not None:
            pred = model.llm2vae(hidden[batch.is_gen]).view_as(target)
            mse = (pred.float() - target.float()).pow(2).mean()
        else:
            mse = hidden.sum() * 0.0
        return {"ce": ce, "mse": mse}

    def text_loss(self, batch: BagelBatch) -> torch.Tensor:
        return self.losses(batch)["ce"]

    def image_loss(self, batch: BagelBatch) -> torch.Tensor:
        return self.losses(batch)["mse"]

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_text(self, examples: list[Example]) -> torch.Tensor:
        batch = self.collate(examples).to(self.device)
        hidden, _ = self._forward(batch, None)
        logits = self.bagel.language_model.lm_head(hidden).float()
        logp = torch.log_softmax(logits, dim=-1)
        sel = batch.labels != IGNORE
        token_logp = logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
        return (token_logp * sel).sum(dim=1)

    def _encode_prefix(self, contexts: list[Example], grad: bool = False) -> KVCache:
        batch = self.collate(contexts).to(self.device)
        with torch.set_grad_enabled(grad):
            embeds = self.bagel.embed(batch, None)
            _, presents = self.bagel.decode_hidden(
                embeds, batch.is_gen, batch.position_ids, batch.attention_mask, use_cache=True
            )
        next_position = batch.position_ids.masked_fill(~batch.valid, -1).max(dim=1).values + 1
        return KVCache([k for k, _ in presents], [v for _, v in presents], batch.valid, next_position)

    def _decode_new(self, cache: KVCache, embeds, is_gen, new_mask, positions):
        """Run new tokens on top of a cached prefix; returns hidden states and the extended cache."""
        b, n = embeds.shape[:2]
        past_mask = cache.valid[:, None, :].expand(b, n, cache.valid.shape[1])
        mask = torch.cat([past_mask, new_mask.expand(b, n, n)], dim=2)
        hidden, presents = self.bagel.decode_hidden(embeds, is_gen, positions, mask, past=cache, use_cache=True)
        extended = KVCache(
            [k for k, _ in presents], [v for _, v in presents],
            torch.cat([cache.valid, torch.ones(b, n, dtype=torch.bool, device=embeds.device)], dim=1),
            cache.next_position,
        )
        return hidden, extended

    @torch.no_grad()
    def generate_text(self, contexts: list[Example], *, max_new_tokens: int = 64, temperature: float = 0.0,
                      seed: int = 0) -> list[str]:
        ids = self._generate_ids(self._encode_prefix(contexts), max_new_tokens, temperature, seed)
        return [self.tokenizer.decode(x).strip() for x in ids]

    def _generate_ids(self, cache: KVCache, max_new_tokens: int, temperature: float, seed: int) -> list[list[int]]:
        """A character turn's token ids after each cached prefix (the prefix cache is left as it was)."""
        tok, device = self.tokenizer, self.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        header = [tok.bos_id, *tok.encode("character\n")]
        b = cache.valid.shape[0]
        new = torch.tensor(header, device=device)[None].expand(b, -1)
        positions = cache.next_position[:, None] + torch.arange(len(header), device=device)[None]
        causal = torch.ones(len(header), len(header), dtype=torch.bool, device=device).tril()[None]
        embed = self.bagel.language_model.model.embed_tokens
        lm_head = self.bagel.language_model.lm_head
        hidden, cache = self._decode_new(cache, embed(new), None, causal, positions)
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        next_pos = positions[:, -1] + 1
        one = torch.ones(1, 1, 1, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = lm_head(hidden[:, -1]).float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                token = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
            else:
                token = logits.argmax(dim=-1)
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    if t == tok.eos_id:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()):
                break
            hidden, cache = self._decode_new(cache, embed(token[:, None]), None, one, next_pos[:, None])
            next_pos = next_pos + 1
        return out

    def _extend_with_text(self, cache: KVCache, texts: list[str], role: str = "character") -> KVCache:
        """The prefix cache continued by one text segment per sample (tokenised exactly as `collate` does:
        bos, role header, body, eos), so an image sampled on it sees that text in the same context."""
        tok, device = self.tokenizer, self.device
        rows = [[tok.bos_id, *tok.encode(f"{role}\n"), *tok.encode(t)[: self.max_text_tokens], tok.eos_id]
                for t in texts]
        b, n = len(rows), max(len(r) for r in rows)
        ids = torch.full((b, n), tok.pad_id, dtype=torch.long, device=device)
        new_valid = torch.zeros(b, n, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, device=device)
            new_valid[i, : len(r)] = True
        positions = cache.next_position[:, None] + torch.arange(n, device=device)[None]
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None] & new_valid[:, None, :]
        causal = causal | torch.eye(n, dtype=torch.bool, device=device)[None]  # padding rows see themselves
        mask = torch.cat([cache.valid[:, None, :].expand(b, n, cache.valid.shape[1]), causal], dim=2)
        embeds = self.bagel.language_model.model.embed_tokens(ids)
        _, presents = self.bagel.decode_hidden(embeds, None, positions, mask, past=cache, use_cache=True)
        lengths = new_valid.sum(dim=1)
        return KVCache([k for k, _ in presents], [v for _, v in presents],
                       torch.cat([cache.valid, new_valid], dim=1), cache.next_position + lengths)

    def _gen_block(self, b: int, positions_from: torch.Tensor):
        """Ids, generation mask, positions and full attention of one image block per sample."""
        tok, device = self.tokenizer, self.device
        ids = torch.full((b, self.gen_tokens + 2), tok.pad_id, dtype=torch.long, device=device)
        ids[:, 0], ids[:, -1] = tok.start_of_image, tok.end_of_image
        is_gen = torch.zeros_like(ids, dtype=torch.bool)
        is_gen[:, 1:-1] = True
        positions = positions_from[:, None].expand_as(ids)
        full = torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=device)
        return self.bagel.language_model.model.embed_tokens(ids), is_gen, positions, full

    def _velocity_fn(self, cache: KVCache):
        """v(x, t) of the flow head for noisy patchified latents x [B, T, D] after a cached prefix."""
        model = self.bagel
        _, h, w = self._latent_chw
        marker_embeds, is_gen, positions, full = self._gen_block(cache.valid.shape[0], cache.next_position)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tokens = model.latent_tokens(x, t, (h, w))
            embeds = marker_embeds.masked_scatter(is_gen[..., None], tokens.reshape(-1, tokens.shape[-1]))
            hidden, _ = self._decode_new(cache, embeds, is_gen, full, positions)
            return model.llm2vae(hidden[:, 1:-1]).float()

        return velocity

    def _guided_velocity_fn(self, cache: KVCache, uncond: KVCache | None, scale: float = 1.0, *,
                            img_uncond: KVCache | None = None, img_scale: torch.Tensor | float = 1.0,
                            guidance: Guidance | None = None):
        """Classifier-free guidance at BAGEL's fidelity (`cmrp.sampling.guidance`): `uncond` is the
        context without its text, `img_uncond` without its input images (per-sample `img_scale`, 1 for
        samples without any). Without `guidance`: plain text CFG v_u + s·(v_c − v_u), no renorm.
        Outside the guidance interval only the conditional branch runs; inside it the needed branches
        run as one batch. Caches with one sample are broadcast to the batch."""
        if guidance is None:
            guidance = Guidance(text_scale=scale, renorm_type="none")
        b = cache.valid.shape[0]
        text_on = uncond is not None and guidance.text_scale != 1.0
        img_scale_t = torch.as_tensor(img_scale, dtype=torch.float32).expand(b).clone()
        img_on = img_uncond is not None and bool((img_scale_t != 1.0).any())
        if not text_on and not img_on:
            return self._velocity_fn(cache)
        branches = [cache]
        if text_on:
            branches.append(_broadcast(uncond, b))
        if img_on:
            branches.append(_broadcast(img_uncond, b))
        plain = self._velocity_fn(cache)
        joint = self._velocity_fn(_concat_caches(*branches))
        k = len(branches)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guidance.active(float(t.reshape(-1)[0])):
                return plain(x, t)
            v = joint(torch.cat([x] * k), torch.cat([t] * k)).split(b)
            v_text = v[1] if text_on else None
            v_img = v[-1] if img_on else None
            return combine_guidance(v[0], v_text, v_img, guidance.text_scale if text_on else 1.0,
                                    img_scale_t.to(v[0].device) if img_on else 1.0,
                                    guidance.renorm_type, guidance.renorm_min)

        return velocity

    def _unconditional_prefix(self) -> KVCache:
        """The empty context (no character, no prompt) the guidance pushes away from."""
        return self._encode_prefix([Example("t2i", [Segment("text", "user", "")])])

    def _guidance_prefixes(self, contexts: list[Example], guidance: Guidance, grad: bool = False):
        """Prefixes of the unconditional branches, one per context: without the text (images kept), and
        without the input images (text kept), plus the per-context image scale (1 where no image)."""
        text_free = img_free = None
        has_img = torch.tensor([_has_input_images(c) for c in contexts])
        img_scale = torch.where(has_img, guidance.img_scale, 1.0)
        if guidance.text_scale != 1.0:
            text_free = self._encode_prefix([_without(c, "text") for c in contexts], grad=grad)
        if guidance.img_scale != 1.0 and bool(has_img.any()):
            img_free = self._encode_prefix([_without(c, "image") for c in contexts], grad=grad)
        return text_free, img_free, img_scale

    def _uncached_velocity_fn(self, contexts: list[Example], n: int):
        repeated = [c for c in contexts for _ in range(n)]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._velocity_fn(self._encode_prefix(repeated))(x, t)

        return velocity

    def _decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self._latent_chw
        return self.bagel.vae.decode(unpatchify(x, self.arch.latent_patch_size, c, h, w)).float().clamp(0, 1).cpu()

    @torch.no_grad()
    def sample_images(self, contexts: list[Example], *, n: int = 1, steps: int = 20, seed: int = 0,
                      noise: float = 0.0, window: tuple[int, int] | None = None, sde: str = "sde",
                      same_noise: bool = False, timestep_shift: float | None = None,
                      reuse_prefix: bool = True, cfg_scale: float = 1.0, cfg_img_scale: float = 1.0,
                      cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_renorm_type: str = "global",
                      cfg_renorm_min: float = 0.0) -> Rollout:
        """`n` samples per context by Euler integration of the flow head.

        The prefix (character + prompt) is encoded once per context and shared by its n samples.
        ODE steps everywhere, except SDE steps with noise level `noise` inside `window` ([start, end)
        step indices), whose transitions are stored for `rollout_logprob`. `same_noise`: the n
        samples of a context start from the same initial noise. Times follow `sampling_timesteps`
        with `timestep_shift` (null: the card's). Guidance (`cmrp.sampling.guidance`): `cfg_scale`
        text scale (context without its text), `cfg_img_scale` image scale (context without its input
        images; contexts without images are not image-guided), applied for t in `cfg_interval`
        (lo, hi], renormalised per `cfg_renorm_type` / `cfg_renorm_min`; the guided velocity is the
        policy, so log-probs use it too. `reuse_prefix=False` re-encodes the prefix for every sample at
        every step (the naive baseline the benchmarks compare against).
        """
        guidance = Guidance(cfg_scale, cfg_img_scale, tuple(cfg_interval), cfg_renorm_type, cfg_renorm_min)
        if not reuse_prefix:
            if guidance.enabled:
                raise ValueError("reuse_prefix=False (a benchmark baseline) does not support guidance")
            return self._sample(contexts, contexts, None, n=n, steps=steps, seed=seed, noise=noise,
                                window=window, sde=sde, same_noise=same_noise, timestep_shift=timestep_shift,
                                guidance=guidance, uncached=True)
        return self._sample(contexts, contexts, self._encode_prefix(contexts), n=n, steps=steps, seed=seed,
                            noise=noise, window=window, sde=sde, same_noise=same_noise,
                            timestep_shift=timestep_shift, guidance=guidance)

    @torch.no_grad()
    def think_and_sample(self, contexts: list[Example], *, max_think_tokens: int = 64, temperature: float = 0.0,
                         text_seed: int = 0, **sample_kwargs) -> tuple[list[str], Rollout]:
        """Think mode (BAGEL's "think"): per context, first a character text turn (the thinking / plan),
        then `n` images sampled with that text in the same context. The prefix is encoded once; the
        text is decoded on its cache and then appended to it (tokenised as a character text segment),
        so the image sees context + thinking exactly as if both had been given as one context. As in
        official BAGEL, the guidance branches leave the generated thinking out. `sample_kwargs` are
        those of `sample_images`. Returns (texts, rollout)."""
        guidance = Guidance(sample_kwargs.pop("cfg_scale", 1.0), sample_kwargs.pop("cfg_img_scale", 1.0),
                            tuple(sample_kwargs.pop("cfg_interval", (0.0, 1.0))),
                            sample_kwargs.pop("cfg_renorm_type", "global"), sample_kwargs.pop("cfg_renorm_min", 0.0))
        prefix = self._encode_prefix(contexts)
        ids = self._generate_ids(prefix, max_think_tokens, temperature, text_seed)
        texts = [self.tokenizer.decode(x).strip() for x in ids]
        thought = self._extend_with_text(prefix, texts)
        with_thinking = [Example(c.task, [*c.segments, Segment("text", "character", t)])
                         for c, t in zip(contexts, texts, strict=True)]
        rollout = self._sample(with_thinking, contexts, thought, guidance=guidance, **sample_kwargs)
        return texts, rollout

    def _sample(self, contexts: list[Example], guide_contexts: list[Example], prefix: KVCache | None, *,
                n: int = 1, steps: int = 20, seed: int = 0, noise: float = 0.0,
                window: tuple[int, int] | None = None, sde: str = "sde", same_noise: bool = False,
                timestep_shift: float | None = None, guidance: Guidance | None = None,
                uncached: bool = False) -> Rollout:
        model, device = self.bagel, self.device
        guidance = guidance or Guidance()
        b = len(contexts) * n
        c = self._latent_chw[0]
        p = model.arch.latent_patch_size
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (len(contexts), 1, self.gen_tokens, p * p * c) if same_noise else (b, self.gen_tokens, p * p * c)
        x = torch.randn(shape, generator=gen)
        if same_noise:
            x = x.expand(-1, n, -1, -1).reshape(b, self.gen_tokens, p * p * c)
        shift = model.arch.timestep_shift if timestep_shift is None else timestep_shift
        ts = sampling_timesteps(steps, shift, device)
        text_free, img_free, img_scale = self._guidance_prefixes(guide_contexts, guidance)
        if uncached:
            velocity = self._uncached_velocity_fn(contexts, n)
        else:
            velocity = self._guided_velocity_fn(
                prefix.expand(n), None if text_free is None else text_free.expand(n), guidance.text_scale,
                img_uncond=None if img_free is None else img_free.expand(n),
                img_scale=img_scale.repeat_interleave(n), guidance=guidance)
        traj = sample_flow(velocity, x.to(device), ts, window=window, eta=noise, kind=sde, generator=gen)
        group_ids = torch.arange(len(contexts)).repeat_interleave(n)
        t_cap = float(ts[1]) if steps > 1 else 0.99
        state = _RolloutState(contexts, n, prefix, text_free, guidance.text_scale, guide_contexts, img_free,
                              img_scale, guidance)
        return Rollout(self._decode_latents(traj.final), group_ids, traj, noise, sde, t_cap, state=state)

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None,
                        *, return_mean: bool = False):
        """Log-prob [len(index)] of window transition `step` of samples `index` under the current
        weights (with gradients), with the same guidance the rollout was sampled with (so the ratio is
        1 on-policy). The cached prefixes are reused when the understanding expert is frozen (their
        keys/values cannot have changed); otherwise they are re-encoded with gradients."""
        state: _RolloutState = rollout.state
        traj = rollout.trajectory
        if traj is None or not 0 <= step < traj.times.shape[0]:
            raise ValueError(f"rollout has no stored transition {step}")
        index = torch.arange(len(rollout)) if index is None else index.cpu()
        guidance = state.guidance or Guidance(state.cfg_scale, renorm_type="none")
        if self._understanding_trainable():
            prefix = self._encode_prefix(state.contexts, grad=True)
            text_free, img_free, _ = self._guidance_prefixes(state.guide_contexts or state.contexts, guidance,
                                                             grad=True)
        else:
            prefix, text_free, img_free = state.prefix, state.uncond, state.img_uncond
        rows = (index // state.n).to(prefix.valid.device)
        device = self.device
        img_scale = state.img_scale[index // state.n] if state.img_scale is not None else 1.0
        velocity = self._guided_velocity_fn(
            prefix.select(rows), None if text_free is None else _rows(text_free, rows), guidance.text_scale,
            img_uncond=None if img_free is None else _rows(img_free, rows), img_scale=img_scale,
            guidance=guidance)
        x = traj.states[index, step].to(device)
        t, t_next = (float(v) for v in traj.times[step])
        v = velocity(x, torch.full((len(index),), t, device=device))
        out = flow_step(x, v, t, t_next, eta=rollout.eta, kind=rollout.kind,
                        next_sample=traj.next_states[index, step].to(device), t_cap=rollout.t_cap)
        if out.logprob is None:
            raise ValueError("the rollout was sampled with noise 0: its transitions have no log-prob")
        return (out.logprob, out.mean, out.std) if return_mean else out.logprob

    def _understanding_trainable(self) -> bool:
        import re

        gen = re.compile(_GEN_PARAMS)
        for name, p in self.model.named_parameters():
            if p.requires_grad and not gen.fullmatch(_strip_peft(name)):
                return True
        return False

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], options: list[list[str] | None]) -> list[str]:
        """VQA on generated images: multiple choice by option likelihood, open questions by greedy
        decoding. `images` [N, 3, H, W] in [0, 1]; returns the chosen option text or the answer."""
        return answer_questions(self, images, questions, options, score_batch=64)


@dataclass
class _RolloutState:
    """What `rollout_logprob` needs to replay a rollout's velocity: per context (not per sample) the
    conditional prefix and the guidance branches' prefixes, and the guidance settings."""

    contexts: list[Example]  # what the image saw (in think mode: context + generated thinking)
    n: int
    prefix: KVCache
    uncond: KVCache | None = None  # the contexts without their text
    cfg_scale: float = 1.0
    guide_contexts: list[Example] | None = None  # the contexts the guidance branches are built from
    img_uncond: KVCache | None = None  # the contexts without their input images
    img_scale: torch.Tensor | None = None  # [contexts] image scale (1 where a context has no image)
    guidance: Guidance | None = None


def _has_input_images(example: Example) -> bool:
    return any(s.kind == "image" and not s.generate for s in example.segments)


def _without(example: Example, kind: str) -> Example:
    """The example without its text segments (kind "text") or its input images (kind "image"); an empty
    result becomes one empty user turn (the unconditional context)."""
    kept = [s for s in example.segments if not (s.kind == kind and not s.generate)]
    return Example(example.task, kept or [Segment("text", "user", "")])


def _broadcast(cache: KVCache, b: int) -> KVCache:
    return cache.expand(b) if cache.valid.shape[0] == 1 and b > 1 else cache


def _rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    return cache.select(rows.to(cache.valid.device))


def _concat_caches(*caches: KVCache) -> KVCache:
    """Stack prefixes' caches along the batch, padding the shorter ones on the right (masked out)."""
    length = max(c.valid.shape[1] for c in caches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.shape[2] == length:
            return t
        shape = list(t.shape)
        shape[2] = length - t.shape[2]
        return torch.cat([t, t.new_zeros(shape)], dim=2)

    def pad_valid(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, v.new_zeros(v.shape[0], length - v.shape[1])], dim=1)

    layers = range(len(caches[0].keys))
    return KVCache(
        [torch.cat([pad(c.keys[i]) for c in caches]) for i in layers],
        [torch.cat([pad(c.values[i]) for c in caches]) for i in layers],
        torch.cat([pad_valid(c.valid) for c in caches]),
        torch.cat([c.next_position for c in caches]),
    )


def _strip_peft(name: str) -> str:
    """BAGEL's own parameter name from a PEFT-wrapped one."""
    for marker in ("base_model.model.",):
        if name.startswith(marker):
            name = name[len(marker):]
    return name.replace(".base_layer", "")


def _plain(value: Any) -> Any:
    """A card section as plain Python containers (cards arrive as omegaconf DictConfigs)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with BAGEL's own names (through a PEFT wrapper, with LoRA merged out of view)."""
    if hasattr(model, "get_base_model"):
        raise ValueError("save the base model before wrapping it with PEFT, or merge the adapter first")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the BAGEL architecture in its config.json:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)
