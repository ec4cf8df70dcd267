"""The `bagel` backbone adapter: BAGEL (any size, tiny included) behind the backbone protocol."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.backbones.bagel.model import Bagel, BagelArch, BagelBatch, patchify, shift_timesteps, unpatchify
from cmrp.backbones.bagel.official import is_official_layout, load_official, save_official
from cmrp.backbones.bagel.packing import IGNORE, ImageLoader, collate
from cmrp.backbones.bagel.qwen2_mot import KVCache, Qwen2MoTDecoderLayer
from cmrp.backbones.common import answer_questions, labelled_logprob, select_lora_targets, split_answers
from cmrp.backbones.kit import HoldsModel, plain, require_unwrapped, resolve_weights, unwrap_peft
from cmrp.backbones.tokenizer import TextTokenizer
from cmrp.checkpoint import save_safetensors_atomic
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.jsonio import write_json
from cmrp.registry import BACKBONES
from cmrp.sampling.flow import flow_step, sample_flow, sampling_timesteps
from cmrp.sampling.guidance import Guidance, combine_guidance
from cmrp.sampling.rollout import Rollout
from cmrp.sampling.spec import SamplerSpec

__all__ = ["BagelAdapter"]

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


@BACKBONES.register("bagel")
class BagelAdapter(HoldsModel):
    """Owns the BAGEL model, its tokenizer and its image pre-processing."""

    image_head = "flow"

    def __init__(self, model: Bagel, tokenizer: TextTokenizer, card: Any = None, max_text_tokens: int = 128):
        self.model = model
        self.tokenizer = tokenizer
        self.card = card
        self.arch = model.arch
        self.image_size = model.arch.gen_image_size or model.arch.vit.image_size  # generated images' side
        model.check_gen_image_size(self.image_size)
        self.max_text_tokens = max_text_tokens
        self._load_image = ImageLoader(self.image_size)
        c, h, w = model.latent_shape((self.image_size, self.image_size))
        p = model.arch.latent_patch_size
        self._latent_chw = (c, h, w)
        self.gen_tokens = (h // p) * (w // p)
        self.vit_tokens = model.arch.vit.num_patches_per_side**2
        vit_side = model.arch.vit.image_size
        self._load_vit_image = self._load_image if vit_side == self.image_size else ImageLoader(vit_side)
        if model.arch.vit_resize:  # variable-size understanding: token count follows each image's size
            lo, hi = (int(v) for v in model.arch.vit_resize)
            self._load_vit_image = ImageLoader(vit_side, variable=(lo, hi, model.arch.vit.patch_size))
            self.vit_tokens = lambda image: model.vit_token_count(tuple(image.shape[-2:]))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> BagelAdapter:
        """Random init from the card's `architecture`, or load `card.weights`: a folder (the official
        layout or one saved by cmrp) or a hub id already in the local Hugging Face cache."""
        if card.get("weights"):
            folder = resolve_weights(str(card["weights"]), f"backbone card {card.get('name')!r}, key 'weights'")
            return cls.from_pretrained(folder, dtype=dtype, card=card)
        spec = plain(card.get("architecture") or {})
        vocab = int(spec.get("llm", {}).get("vocab_size", 1024))
        tok_ref = card.get("tokenizer") or "train-bpe"
        if tok_ref == "train-bpe":
            if not corpus:
                raise ConfigError("backbone card tokenizer 'train-bpe' needs a text corpus (the character's texts)")
            # BAGEL's tokenizer is Qwen2's: same pre-tokenization, so the official Qwen2Tokenizer reads it alike
            tokenizer = TextTokenizer.train_bpe(corpus, vocab_size=vocab, pretokenizer="qwen2")
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

        path = resolve_weights(path, "the BAGEL checkpoint")  # a folder, a cached hub id or a shipped base
        if is_official_layout(path):
            settings = plain(card.get("architecture") or {}) if card is not None else {}
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
        require_unwrapped(self.model)
        return save_official(self.bagel, self.tokenizer, path)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(_base_state_dict(self.model), path / WEIGHTS_FILE)
        if self.arch.visual_gen and any(True for _ in self.bagel.vae.parameters()):
            vae_state = {k: v.detach().contiguous() for k, v in self.bagel.vae.state_dict().items()}
            save_safetensors_atomic(vae_state, path / AE_WEIGHTS_FILE)
        card = plain(self.card)
        config = {"adapter": "bagel", "architecture": asdict(self.arch), "card": card}
        write_json(path / CONFIG_FILE, config, ensure_ascii=True)
        self.tokenizer.save(path)
        return path

    @property
    def bagel(self) -> Bagel:
        """The underlying Bagel module, through a PEFT wrapper if there is one."""
        return unwrap_peft(self.model)

    # -- fine-tuning -----------------------------------------------------------------------------
    def lora_targets(self, kind: str = "default") -> list[str]:
        return select_lora_targets(DEFAULT_LORA_TARGETS, self.card, kind)

    def trainable_groups(self) -> dict[str, list[str]]:
        return {"generation": [_GEN_PARAMS], "understanding": [r"(?!" + _GEN_PARAMS + r"$).*"]}

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        """Module classes that become one FSDP unit each (`trainer.strategy: fsdp`): the MoT decoder layer,
        both experts together (one attention mixes them; every batch runs every layer on every rank). The
        SigLIP layers stay in the root unit: they run only for batches with input images, which differ
        between ranks, and a unit's weights are gathered by a collective every rank must join."""
        return {Qwen2MoTDecoderLayer}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations
        (`finetune.gradient_checkpointing`, or the card's `architecture.gradient_checkpointing`)."""
        self.bagel.arch.gradient_checkpointing = bool(enabled)

    # -- training --------------------------------------------------------------------------------
    def collate(self, examples: list[Example], image_output: bool | None = None) -> BagelBatch:
        """`image_output`: the examples' output is an image, so input images also enter as VAE latents
        (None: per example, whether it holds an image to generate)."""
        return collate(
            examples, self.tokenizer, self._load_image,
            vit_tokens=self.vit_tokens, gen_tokens=self.gen_tokens, max_text_tokens=self.max_text_tokens,
            load_vit_image=self._load_vit_image, image_output=image_output,
        )

    def _forward(self, batch: BagelBatch, timestep_shift: float | None):
        """Hidden states of a training batch, the flow targets of its generated images' tokens and which
        VAE images are generated. As the official trainer, in this order: every VAE image's latents
        (`architecture.vae_posterior`), flow noise for all of them, flow times of the generated ones
        (`batch.timestep_draws`, else drawn; input images stay clean at t = 0)."""
        model = self.bagel
        gen_tokens = target = noisy = None
        if batch.vae_pixels is not None:
            _, h, w = self._latent_chw
            x0 = patchify(model.encode_latents(batch.vae_pixels), model.arch.latent_patch_size)
            noise = torch.randn_like(x0)
            noisy = batch.vae_noisy.to(x0.device)
            shift = model.arch.timestep_shift if timestep_shift is None else timestep_shift
            draws = batch.timestep_draws
            if draws is None:
                draws = torch.randn(int(noisy.sum()), device=x0.device)
            t = torch.zeros(x0.shape[0], device=x0.device)
            t[noisy] = shift_timesteps(draws.to(x0.device, torch.float32), shift)
            x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            gen_tokens = model.latent_tokens(x_t, t, (h, w))
            target = (noise - x0)[noisy]  # velocity dx/dt pointing from data (t=0) to noise (t=1)
        embeds = model.embed(batch, gen_tokens)
        hidden, _ = model.decode_hidden(embeds, batch.is_gen, batch.position_ids, batch.attention_mask,
                                        valid=batch.valid)  # padding (about half a mixed batch) is skipped
        return hidden, target, noisy

    def losses(self, batch: BagelBatch, *, timestep_shift: float | None = None) -> dict[str, torch.Tensor]:
        """{"text": mean next-token CE over the trained text tokens, "image": mean flow MSE over the generated
        images' latent tokens and channels} (the official trainer's reductions)."""
        model = self.bagel
        hidden, target, noisy = self._forward(batch, timestep_shift)
        sel = batch.labels != IGNORE
        if bool(sel.any()):
            logits = model.language_model.lm_head(hidden[sel])
            ce = F.cross_entropy(logits.float(), batch.labels[sel])
        else:
            ce = hidden.sum() * 0.0
        if target is not None and bool(noisy.any()):
            latent_hidden = hidden[batch.is_gen].view(len(noisy), -1, hidden.shape[-1])[noisy]
            pred = model.llm2vae(latent_hidden)
            mse = (pred.float() - target.float()).pow(2).mean()
        else:
            mse = hidden.sum() * 0.0
        return {"text": ce, "image": mse}

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_text(self, examples: list[Example]) -> torch.Tensor:
        lm_head = self.bagel.language_model.lm_head
        shared = split_answers(examples)
        if shared is None:  # some example is not "context, then one trained text answer": score it whole
            batch = self.collate(examples).to(self.device)
            hidden = self._forward(batch, None)[0]
            return labelled_logprob(hidden, batch.labels, lm_head, IGNORE)
        # MCQ options share their image and question: each distinct context is encoded once and every answer
        # segment is run on its cache (the same tokens, positions and mask as the whole sequence)
        contexts, rows, answers = shared
        cache = self._encode_prefix(contexts).select(torch.tensor(rows, device=self.device))
        hidden, _, ids, valid = self._run_text(cache, answers)
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = ids[:, 1:].masked_fill(~valid[:, 1:], IGNORE)  # bos predicts the first token, ... eos
        return labelled_logprob(hidden, labels, lm_head, IGNORE)

    def _encode_prefix(self, contexts: list[Example], grad: bool = False, *, image_output: bool = False,
                       generator: torch.Generator | None = None) -> KVCache:
        """The KV cache of contexts (see `_encode`)."""
        return self._encode(contexts, grad, image_output=image_output, generator=generator)[0]

    def _encode(self, contexts: list[Example], grad: bool = False, *, image_output: bool = False,
                generator: torch.Generator | None = None) -> tuple[KVCache, BagelBatch | None]:
        """KV cache of contexts whose output is an image (`image_output`: input images as clean VAE latents
        and ViT tokens, their posterior noise from `generator`) or text (ViT tokens only), and their batch
        (None for empty contexts)."""
        if not any(c.segments for c in contexts):
            return self._empty_cache(len(contexts)), None
        batch = self.collate(contexts, image_output=image_output).to(self.device)
        model = self.bagel
        with torch.set_grad_enabled(grad):
            gen_tokens = None
            if batch.vae_pixels is not None:
                if bool(batch.vae_noisy.any()):
                    raise ValueError("a context holds an image to generate (Segment.generate); contexts hold only "
                                     "text and input images")
                _, h, w = self._latent_chw
                x0 = patchify(model.encode_latents(batch.vae_pixels, generator), model.arch.latent_patch_size)
                gen_tokens = model.latent_tokens(x0, torch.zeros(x0.shape[0], device=x0.device), (h, w))
            embeds = model.embed(batch, gen_tokens)
            _, presents = model.decode_hidden(
                embeds, batch.is_gen, batch.position_ids, batch.attention_mask, use_cache=True
            )
        next_position = batch.position_ids.masked_fill(~batch.valid, -1).max(dim=1).values + 1
        cache = KVCache([k for k, _ in presents], [v for _, v in presents], batch.valid, next_position)
        return cache, batch

    def _empty_cache(self, b: int) -> KVCache:
        weight = self.bagel.language_model.model.embed_tokens.weight
        return KVCache.empty(self.arch.llm, b, device=weight.device, dtype=weight.dtype)

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

    def _generate_ids(self, cache: KVCache, max_new_tokens: int, temperature: float, seed: int,
                      logits_out: list[torch.Tensor] | None = None) -> list[list[int]]:
        """A text segment's token ids after each cached prefix, decoded from a bare `bos` as BAGEL does (the
        prefix cache is left as it was). `logits_out` receives each step's logits [B, vocab]."""
        tok, device = self.tokenizer, self.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        b = cache.valid.shape[0]
        new = torch.full((b, 1), tok.bos_id, device=device)
        positions = cache.next_position[:, None]
        one = torch.ones(1, 1, 1, dtype=torch.bool, device=device)
        embed = self.bagel.language_model.model.embed_tokens
        lm_head = self.bagel.language_model.lm_head
        hidden, cache = self._decode_new(cache, embed(new), None, one, positions)
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        next_pos = positions[:, -1] + 1
        for _ in range(max_new_tokens):
            logits = lm_head(hidden[:, -1]).float()
            if logits_out is not None:
                logits_out.append(logits)
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

    def _run_text(self, cache: KVCache, texts: list[str]):
        """One text segment per sample run on its cached prefix, tokenised exactly as `collate` does (bos, text,
        eos): (hidden [B, n, D], the layers' keys/values, ids [B, n], valid [B, n])."""
        tok, device = self.tokenizer, self.device
        rows = [[tok.bos_id, *tok.encode(t)[: self.max_text_tokens], tok.eos_id] for t in texts]
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
        hidden, presents = self.bagel.decode_hidden(embeds, None, positions, mask, past=cache, use_cache=True)
        return hidden, presents, ids, new_valid

    def _extend_with_text(self, cache: KVCache, texts: list[str]) -> KVCache:
        """The prefix cache continued by one text segment per sample, so an image sampled on it sees that text
        in the same context."""
        _, presents, _, new_valid = self._run_text(cache, texts)
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
                            img_uncond: KVCache | None = None, guidance: Guidance | None = None):
        """Classifier-free guidance as the official sampler (`cmrp.sampling.guidance`): `uncond` is the
        text-free prefix, `img_uncond` the image-free one (`cache` itself when the contexts hold no input
        image: that branch is then the conditional one). Without `guidance`: plain text CFG
        v_u + s·(v_c − v_u), no renorm. Outside the guidance interval only the conditional branch runs;
        inside it the needed branches run as one batch. Caches with one sample are broadcast to the batch."""
        if guidance is None:
            guidance = Guidance(text_scale=scale, renorm_type="none")
        if not guidance.enabled:
            return self._velocity_fn(cache)
        if uncond is None or (guidance.image_enabled and img_uncond is None):
            raise ValueError("guidance needs the text-free prefix (and the image-free one for image guidance)")
        b = cache.valid.shape[0]
        img_on = guidance.image_enabled
        img_is_cond = img_on and img_uncond is cache
        branches = [cache, _broadcast(uncond, b)]
        if img_on and not img_is_cond:
            branches.append(_broadcast(img_uncond, b))
        plain = self._velocity_fn(cache)
        joint = self._velocity_fn(_concat_caches(*branches))
        k = len(branches)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guidance.active(float(t.reshape(-1)[0])):
                return plain(x, t)
            v = joint(torch.cat([x] * k), torch.cat([t] * k)).split(b)
            v_img = (v[0] if img_is_cond else v[2]) if img_on else None
            return combine_guidance(v[0], v[1], v_img, guidance.text_scale, guidance.img_scale,
                                    guidance.renorm_type, guidance.renorm_min)

        return velocity

    def _unconditional_prefix(self) -> KVCache:
        """The empty context: the text-free branch of a prompt that is one text segment."""
        return self._empty_cache(1)

    def _guidance_prefixes(self, contexts: list[Example], guide: KVCache, text_free: torch.Tensor | None,
                           guidance: Guidance, grad: bool = False):
        """(text-free, image-free) prefixes of the guidance branches of `contexts`, encoded as `guide` with the
        cut points `text_free` ([B, 2] tokens and next position before the last text segment; None for empty
        contexts). The text-free one is a prefix of `guide` (nothing recomputed); the image-free one is `guide`
        itself when no context holds an input image, else the contexts without their images (every text kept).
        (None, None) when guidance is off."""
        if not guidance.enabled:
            return None, None
        text_cut = guide if text_free is None else guide.prefix(text_free[:, 0], text_free[:, 1])
        img_free = None
        if guidance.image_enabled:
            if any(_has_input_images(c) for c in contexts):
                img_free = self._encode_prefix([_without_images(c) for c in contexts], grad=grad, image_output=True)
            else:
                img_free = guide
        return text_cut, img_free

    def _uncached_velocity_fn(self, contexts: list[Example], n: int):
        repeated = [c for c in contexts for _ in range(n)]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._velocity_fn(self._encode_prefix(repeated, image_output=True))(x, t)

        return velocity

    def _decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self._latent_chw
        return self.bagel.vae.decode(unpatchify(x, self.arch.latent_patch_size, c, h, w)).float().clamp(0, 1).cpu()

    @torch.no_grad()
    def sample_images(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0,
                      reuse_prefix: bool = True) -> Rollout:
        """`n` samples per context by Euler integration of the flow head (`spec.steps` steps: the official
        sampler's `num_timesteps` is steps + 1).

        The prefix (character + prompt; input images as VAE latents and ViT tokens) is encoded once per
        context and shared by its n samples. ODE steps everywhere, except SDE steps with noise level
        `spec.noise` inside `spec.window` ([start, end) step indices), whose transitions are stored for
        `rollout_logprob`. `spec.same_noise`: the n samples of a context start from the same initial noise.
        Times follow `sampling_timesteps` with `spec.timestep_shift` (None: the card's). `seed` draws, in this
        order, the posterior samples of the input images' latents and the initial noise (the official order).
        Guidance (`spec.guidance`, `cmrp.sampling.guidance`, as the official sampler): on when its text scale
        is > 1, text-free branch = the context before its last text segment, image guidance against the
        context without its input images (the context itself when it has none), within its interval,
        renormalised per its renorm type / min; the guided velocity is the policy, so log-probs use it too.
        `reuse_prefix=False` re-encodes the prefix for every sample at every step (the naive baseline the
        benchmarks compare against).
        """
        guidance = spec.guidance or Guidance()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if not reuse_prefix:
            if guidance.enabled:
                raise ValueError("reuse_prefix=False (a benchmark baseline) does not support guidance")
            return self._sample(contexts, None, Guidance(), spec, n=n, generator=gen, seed=seed)
        prefix, batch = self._encode(contexts, image_output=True, generator=gen)
        branches = self._guidance_prefixes(contexts, prefix, None if batch is None else batch.text_free, guidance)
        return self._sample(contexts, _Prefixes(prefix, *branches), guidance, spec, n=n, generator=gen, seed=seed)

    @torch.no_grad()
    def think_and_sample(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0,
                         max_think_tokens: int = 64, temperature: float = 0.0,
                         text_seed: int = 0) -> tuple[list[str], Rollout]:
        """Think mode (BAGEL's "think"): per context, first a text segment (the thinking / plan), then `n`
        images sampled as `sample_images` would with that text in the same context. The prefix is encoded
        once; the text is decoded on its cache from a bare bos and then appended to it (tokenised as a text
        segment), so the image sees context + thinking exactly as if both had been given as one context. As
        in official BAGEL, the guidance branches leave the generated thinking out. Returns (texts, rollout)."""
        guidance = spec.guidance or Guidance()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        guide, batch = self._encode(contexts, image_output=True, generator=gen)
        ids = self._generate_ids(guide, max_think_tokens, temperature, text_seed)
        texts = [self.tokenizer.decode(x).strip() for x in ids]
        branches = self._guidance_prefixes(contexts, guide, None if batch is None else batch.text_free, guidance)
        with_thinking = [Example(c.task, [*c.segments, Segment("text", "character", t)])
                         for c, t in zip(contexts, texts, strict=True)]
        prefixes = _Prefixes(self._extend_with_text(guide, texts), *branches, guide=guide, thinking=texts)
        rollout = self._sample(with_thinking, prefixes, guidance, spec, n=n, generator=gen, seed=seed,
                               guide_contexts=contexts)
        return texts, rollout

    def _sample(self, contexts: list[Example], prefixes: _Prefixes | None, guidance: Guidance, spec: SamplerSpec,
                *, n: int, generator: torch.Generator, seed: int,
                guide_contexts: list[Example] | None = None) -> Rollout:
        """Sample from the prefixes (None: re-encode the contexts at every step, the naive baseline)."""
        steps, noise, window, sde, same_noise = spec.steps, spec.noise, spec.window, spec.sde, spec.same_noise
        timestep_shift = spec.timestep_shift
        model, device = self.bagel, self.device
        b = len(contexts) * n
        c = self._latent_chw[0]
        p = model.arch.latent_patch_size
        shape = (len(contexts), 1, self.gen_tokens, p * p * c) if same_noise else (b, self.gen_tokens, p * p * c)
        x = torch.randn(shape, generator=generator)
        if same_noise:
            x = x.expand(-1, n, -1, -1).reshape(b, self.gen_tokens, p * p * c)
        shift = model.arch.timestep_shift if timestep_shift is None else timestep_shift
        ts = sampling_timesteps(steps, shift, device)
        if prefixes is None:
            velocity = self._uncached_velocity_fn(contexts, n)
        else:
            cond, text_free, image_free = prefixes.expand(n)
            velocity = self._guided_velocity_fn(cond, text_free, img_uncond=image_free, guidance=guidance)
        traj = sample_flow(velocity, x.to(device), ts, window=window, eta=noise, kind=sde, generator=generator)
        group_ids = torch.arange(len(contexts)).repeat_interleave(n)
        t_cap = float(ts[1]) if steps > 1 else 0.99
        state = _RolloutState(contexts, n, prefixes, guidance, guide_contexts or contexts, seed)
        return Rollout(self._decode_latents(traj.final), group_ids, traj, noise, sde, t_cap, state=state)

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None,
                        *, return_mean: bool = False):
        """Log-prob [len(index)] of window transition `step` of samples `index` under the current
        weights (with gradients), with the same guidance the rollout was sampled with (so the ratio is
        1 on-policy). The cached prefixes are reused when the understanding expert is frozen (their
        keys/values cannot have changed); otherwise they are re-encoded with gradients, from the same
        seed (the same posterior samples of input images)."""
        state: _RolloutState = rollout.state
        traj = rollout.trajectory
        if traj is None or not 0 <= step < traj.times.shape[0]:
            raise ValueError(f"rollout has no stored transition {step}")
        if state.prefixes is None:
            raise ValueError("the rollout was sampled with reuse_prefix=False: it keeps no prefix to replay")
        index = torch.arange(len(rollout)) if index is None else index.cpu()
        prefixes = self._replay_prefixes(state) if self._understanding_trainable() else state.prefixes
        rows = (index // state.n).to(prefixes.cond.valid.device)
        device = self.device
        cond, text_free, image_free = prefixes.select(rows)
        velocity = self._guided_velocity_fn(cond, text_free, img_uncond=image_free, guidance=state.guidance)
        x = traj.states[index, step].to(device)
        t, t_next = (float(v) for v in traj.times[step])
        v = velocity(x, torch.full((len(index),), t, device=device))
        out = flow_step(x, v, t, t_next, eta=rollout.eta, kind=rollout.kind,
                        next_sample=traj.next_states[index, step].to(device), t_cap=rollout.t_cap)
        if out.logprob is None:
            raise ValueError("the rollout was sampled with noise 0: its transitions have no log-prob")
        return (out.logprob, out.mean, out.std) if return_mean else out.logprob

    def _replay_prefixes(self, state: _RolloutState) -> _Prefixes:
        """The rollout's prefixes encoded again with gradients (same contexts, seed and thinking)."""
        gen = torch.Generator(device="cpu").manual_seed(state.seed)
        guide, batch = self._encode(state.guide_contexts, grad=True, image_output=True, generator=gen)
        branches = self._guidance_prefixes(state.guide_contexts, guide, None if batch is None else batch.text_free,
                                           state.guidance, grad=True)
        thinking = state.prefixes.thinking
        if thinking is None:
            return _Prefixes(guide, *branches)
        return _Prefixes(self._extend_with_text(guide, thinking), *branches, guide=guide, thinking=thinking)

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
class _Prefixes:
    """The KV caches images are sampled on, one row per context: the conditional prefix and the guidance
    branches' (None when guidance is off). The image-free one is `cond` itself (the same object) for contexts
    without input images; in think mode it is `guide`, the context before the generated thinking."""

    cond: KVCache
    text_free: KVCache | None = None
    image_free: KVCache | None = None
    guide: KVCache | None = None  # think mode: the context without the thinking (the branches derive from it)
    thinking: list[str] | None = None  # think mode: the generated texts appended to `guide` to make `cond`

    def _map(self, fn) -> tuple[KVCache, KVCache | None, KVCache | None]:
        cond = fn(self.cond)
        text_free = None if self.text_free is None else fn(self.text_free)
        image_free = None if self.image_free is None else cond if self.image_free is self.cond else fn(self.image_free)
        return cond, text_free, image_free

    def expand(self, n: int) -> tuple[KVCache, KVCache | None, KVCache | None]:
        """(cond, text-free, image-free) with each context's row repeated n times."""
        return self._map(lambda cache: cache.expand(n))

    def select(self, rows: torch.Tensor) -> tuple[KVCache, KVCache | None, KVCache | None]:
        """(cond, text-free, image-free) of the given context rows."""
        return self._map(lambda cache: cache.select(rows.to(cache.valid.device)))


@dataclass
class _RolloutState:
    """What `rollout_logprob` needs to replay a rollout's velocity: per context (not per sample) the prefixes
    it was sampled on, the guidance, and how to encode them again (contexts, seed)."""

    contexts: list[Example]  # what the image saw (in think mode: context + generated thinking)
    n: int
    prefixes: _Prefixes | None  # None: sampled with reuse_prefix=False
    guidance: Guidance
    guide_contexts: list[Example]  # the contexts the guidance branches are built from (without the thinking)
    seed: int  # drew the input images' posterior samples (then the noise)


def _has_input_images(example: Example) -> bool:
    return any(s.kind == "image" and not s.generate for s in example.segments)


def _without_images(example: Example) -> Example:
    """The example without its input images (every text kept; possibly empty: the empty context)."""
    return Example(example.task, [s for s in example.segments if not (s.kind == "image" and not s.generate)])


def _broadcast(cache: KVCache, b: int) -> KVCache:
    return cache.expand(b) if cache.valid.shape[0] == 1 and b > 1 else cache


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


def _base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with BAGEL's own names (through a PEFT wrapper, with LoRA merged out of view)."""
    require_unwrapped(model)
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
