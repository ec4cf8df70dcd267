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
from cmrp.backbones.tokenizer import TextTokenizer
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.registry import BACKBONES
from cmrp.sampling.flow import flow_step, sample_flow, sampling_timesteps
from cmrp.sampling.rollout import Rollout

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

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> BagelAdapter:
        if card.get("weights"):
            return cls.from_pretrained(card["weights"], dtype=dtype)
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
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> BagelAdapter:
        from safetensors.torch import load_file

        path = Path(path)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for needed in (config_file, weights_file, path / "tokenizer.json"):
            if not needed.is_file():
                raise WeightsError(
                    f"{needed} not found: {path} is not a saved cmrp BAGEL backbone. Pass a folder written by "
                    "`cmrp fit` (output_dir/checkpoint/backbone) or by BagelAdapter.save_pretrained."
                )
        config = json.loads(config_file.read_text())
        model = Bagel(BagelArch.from_dict(config["architecture"]))
        state = load_file(str(weights_file))
        _load_state(model, state, str(weights_file))
        return cls(model.to(dtype), TextTokenizer.load(path), config.get("card"))

    def save_pretrained(self, path: str | Path) -> Path:
        from cmrp.checkpoint import save_safetensors_atomic

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(_base_state_dict(self.model), path / WEIGHTS_FILE)
        card = _plain(self.card)
        config = {"adapter": "bagel", "architecture": asdict(self.arch), "card": card}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
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
        targets = dict(DEFAULT_LORA_TARGETS)
        if self.card is not None and self.card.get("lora_targets"):
            targets.update({k: list(v) for k, v in self.card["lora_targets"].items()})
        if kind not in targets:
            raise ConfigError(f"finetune.targets: unknown LoRA target set {kind!r}; known: {sorted(targets)}")
        return targets[kind]

    def trainable_groups(self) -> dict[str, list[str]]:
        return {"generation": [_GEN_PARAMS], "understanding": [r"(?!" + _GEN_PARAMS + r"$).*"]}

    # -- training --------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> BagelBatch:
        return collate(
            examples, self.tokenizer, self._load_image,
            vit_tokens=self.vit_tokens, gen_tokens=self.gen_tokens, max_text_tokens=self.max_text_tokens,
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
        tok, device = self.tokenizer, self.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cache = self._encode_prefix(contexts)
        header = [tok.bos_id, *tok.encode("character\n")]
        b = len(contexts)
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
        return [tok.decode(ids).strip() for ids in out]

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

    def _guided_velocity_fn(self, cache: KVCache, uncond: KVCache | None, scale: float):
        """Text classifier-free guidance: v_u + s·(v_c − v_u), v_u without the context (BAGEL's text CFG,
        no renorm). Both branches run as one batch; s = 1 or no unconditional prefix: plain v_c."""
        if uncond is None or scale == 1.0:
            return self._velocity_fn(cache)
        b = cache.valid.shape[0]
        both = _concat_caches(cache, uncond.expand(b))
        joint = self._velocity_fn(both)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = joint(torch.cat([x, x]), torch.cat([t, t]))
            v_cond, v_uncond = v[:b], v[b:]
            return v_uncond + scale * (v_cond - v_uncond)

        return velocity

    def _unconditional_prefix(self) -> KVCache:
        """The empty context (no character, no prompt) the guidance pushes away from."""
        return self._encode_prefix([Example("t2i", [Segment("text", "user", "")])])

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
                      reuse_prefix: bool = True, cfg_scale: float = 1.0) -> Rollout:
        """`n` samples per context by Euler integration of the flow head.

        The prefix (character + prompt) is encoded once per context and shared by its n samples.
        ODE steps everywhere, except SDE steps with noise level `noise` inside `window` ([start, end)
        step indices), whose transitions are stored for `rollout_logprob`. `same_noise`: the n
        samples of a context start from the same initial noise. `cfg_scale` > 1: text classifier-free
        guidance (the guided velocity is the policy, so log-probs use it too). `reuse_prefix=False` re-encodes the
        prefix for every sample at every step (the naive baseline the benchmarks compare against).
        """
        model, device = self.bagel, self.device
        prefix = self._encode_prefix(contexts)
        cache = prefix.expand(n)
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
        uncond = self._unconditional_prefix() if cfg_scale != 1.0 else None
        if reuse_prefix:
            velocity = self._guided_velocity_fn(cache, uncond, cfg_scale)
        else:
            if cfg_scale != 1.0:
                raise ValueError("reuse_prefix=False (a benchmark baseline) does not support cfg_scale")
            velocity = self._uncached_velocity_fn(contexts, n)
        traj = sample_flow(velocity, x.to(device), ts, window=window, eta=noise, kind=sde, generator=gen)
        group_ids = torch.arange(len(contexts)).repeat_interleave(n)
        t_cap = float(ts[1]) if steps > 1 else 0.99
        return Rollout(self._decode_latents(traj.final), group_ids, traj, noise, sde, t_cap,
                       state=_RolloutState(contexts, n, prefix, uncond, cfg_scale))

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None,
                        *, return_mean: bool = False):
        """Log-prob [len(index)] of window transition `step` of samples `index` under the current
        weights (with gradients). The cached prefix is reused when the understanding expert is frozen
        (its keys/values cannot have changed); otherwise it is re-encoded with gradients."""
        state: _RolloutState = rollout.state
        traj = rollout.trajectory
        if traj is None or not 0 <= step < traj.times.shape[0]:
            raise ValueError(f"rollout has no stored transition {step}")
        index = torch.arange(len(rollout)) if index is None else index.cpu()
        if self._understanding_trainable():
            prefix = self._encode_prefix(state.contexts, grad=True)
        else:
            prefix = state.prefix
        cache = prefix.select((index // state.n).to(prefix.valid.device))
        device = self.device
        x = traj.states[index, step].to(device)
        t, t_next = (float(v) for v in traj.times[step])
        v = self._guided_velocity_fn(cache, state.uncond, state.cfg_scale)(
            x, torch.full((len(index),), t, device=device))
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
        from cmrp.data.character import MultipleChoice
        from cmrp.data.tasks import mcq_option_examples

        answers: list[str] = [""] * len(questions)
        mcq_examples, spans, open_idx = [], [], []
        for i, (q, opts) in enumerate(zip(questions, options, strict=True)):
            image = Segment("image", "user", pixels=images[i])
            if opts:
                item = MultipleChoice(q, list(opts), 0)
                spans.append((i, len(mcq_examples), len(opts)))
                mcq_examples += mcq_option_examples([image], item, "vqa")
            else:
                open_idx.append(i)
        if mcq_examples:
            scores = torch.cat([self.score_text(mcq_examples[k:k + 64]) for k in range(0, len(mcq_examples), 64)])
            for i, first, count in spans:
                answers[i] = options[i][int(scores[first:first + count].argmax())]
        if open_idx:
            contexts = [Example("vqa", [Segment("image", "user", pixels=images[i]),
                                        Segment("text", "user", text=questions[i])])
                        for i in open_idx]
            for i, text in zip(open_idx, self.generate_text(contexts, max_new_tokens=24), strict=True):
                answers[i] = text
        return answers


@dataclass
class _RolloutState:
    contexts: list[Example]
    n: int
    prefix: KVCache
    uncond: KVCache | None = None
    cfg_scale: float = 1.0


def _concat_caches(a: KVCache, b: KVCache) -> KVCache:
    """Stack two prefixes' caches along the batch, padding the shorter on the right (masked out)."""
    la, lb = a.valid.shape[1], b.valid.shape[1]
    length = max(la, lb)

    def pad(t: torch.Tensor, current: int) -> torch.Tensor:
        if current == length:
            return t
        shape = list(t.shape)
        shape[2] = length - current
        return torch.cat([t, t.new_zeros(shape)], dim=2)

    def pad_valid(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, v.new_zeros(v.shape[0], length - v.shape[1])], dim=1)

    return KVCache(
        [torch.cat([pad(x, la), pad(y, lb)]) for x, y in zip(a.keys, b.keys, strict=True)],
        [torch.cat([pad(x, la), pad(y, lb)]) for x, y in zip(a.values, b.values, strict=True)],
        torch.cat([pad_valid(a.valid), pad_valid(b.valid)]),
        torch.cat([a.next_position, b.next_position]),
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
