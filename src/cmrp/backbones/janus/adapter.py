"""The `janus` backbone adapter: Janus / Janus-Pro (transformers' `JanusForConditionalGeneration`).

Janus decouples visual encoding: understood images go through a SigLIP ViT and `aligner` into a Llama
language model; generated images are VQ-VAE codebook tokens, embedded by `generation_embeddings` +
`generation_aligner` and predicted by `generation_head`. One causal sequence per example (Janus-Pro's
chat format; consecutive segments of one role form one turn, their parts joined by a newline):

    <bos>system\\n\\n<|User|>: <boi><image>*N<eoi>\\nquestion\\n\\n<|Assistant|>: answer<eos>
    ...<|Assistant|>:<boi>code_1 ... code_N<eoi><eos>                  (a generated image)

- text loss: CE of `lm_head` on the trained (response) tokens;
- image loss: CE of `generation_head` on the VQ codes of the target image (teacher forcing);
- image sampling: our own loop over the language model with a KV cache, classifier-free guidance
  against Janus's unconditional prompt (every token but <bos>/<boi> replaced by padding), recording each
  token's log-prob under the guided, tempered distribution (`cmrp.sampling.tokens`). For GRPO the N
  positions are split into `steps` contiguous chunks; the chunks inside `window` are the stored steps.

Real checkpoints load from a local folder or the Hugging Face cache in the official layout
(config.json + *.safetensors + tokenizer files); never with remote code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.backbones.common import answer_questions, labelled_logprob, select_lora_targets
from cmrp.backbones.images import ImageLoader
from cmrp.backbones.janus.model import _GEN_PARAMS, _UND_PARAMS, DEFAULT_LORA_TARGETS, _check_geometry
from cmrp.backbones.janus.prompting import HEADERS, IGNORE, JanusBatch, _Prefix, _Seq
from cmrp.backbones.janus.tokenizer import JanusTokenizer
from cmrp.backbones.kit import HoldsModel, plain, require_unwrapped, resolve_weights, unwrap_peft
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.jsonio import write_json
from cmrp.registry import BACKBONES
from cmrp.sampling.rollout import Rollout, TokenTrajectory
from cmrp.sampling.spec import SamplerSpec, token_guidance_scale
from cmrp.sampling.tokens import guided_logits, sample_token_sequence, token_step

__all__ = ["JanusAdapter"]

EXTRAS_FILE = "cmrp.json"  # our settings beside the official files (sampling defaults, the card)
DEFAULT_SAMPLING = {"temperature": 1.0, "cfg_scale": 5.0, "top_k": None}


@dataclass
class _RolloutState:
    prefix: _Prefix
    n: int
    cfg_scale: float
    temperature: float
    top_k: int | None


@BACKBONES.register("janus")
class JanusAdapter(HoldsModel):
    """Owns a `JanusForConditionalGeneration`, its tokenizer and its image pre-processing."""

    image_head = "tokens"

    def __init__(self, model: torch.nn.Module, tokenizer: JanusTokenizer, card: Any = None,
                 extras: dict | None = None, max_text_tokens: int = 128):
        self.model = model
        self.tokenizer = tokenizer
        self.card = card
        extras = dict(extras or {})
        self.sampling = {**DEFAULT_SAMPLING, **(extras.get("sampling") or {})}
        self.image_mean = torch.tensor(extras.get("image_mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
        self.image_std = torch.tensor(extras.get("image_std", (0.5, 0.5, 0.5)), dtype=torch.float32)
        config = model.config
        self.image_size = int(config.vision_config.image_size)
        side = self.image_size // int(config.vision_config.patch_size)
        self.und_tokens = side * side
        self.gen_tokens = int(config.vq_config.num_patches) ** 2
        self.max_text_tokens = max_text_tokens
        self._load_image = ImageLoader(self.image_size)
        self._code_cache: dict[str, torch.Tensor] = {}

    @property
    def extras(self) -> dict:
        return {"sampling": dict(self.sampling), "image_mean": self.image_mean.tolist(),
                "image_std": self.image_std.tolist()}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> JanusAdapter:
        spec = plain(card.get("architecture") or {})
        if card.get("weights"):
            adapter = cls.from_pretrained(card["weights"], dtype=dtype)
            adapter.card = card
            adapter.sampling.update(spec.get("sampling") or {})
            return adapter
        from transformers import JanusConfig, JanusForConditionalGeneration

        name = card.get("name")
        missing = [k for k in ("text_config", "vision_config", "vq_config") if k not in spec]
        if missing:
            raise ConfigError(f"backbone card {name!r}: architecture needs {missing} (or set `weights`)")
        vocab = int(spec["text_config"].get("vocab_size", 1024))
        tok_ref = card.get("tokenizer") or "train-bpe"
        if tok_ref == "train-bpe":
            if not corpus:
                raise ConfigError("backbone card tokenizer 'train-bpe' needs a text corpus (the character's texts)")
            tokenizer = JanusTokenizer.train_bpe(corpus, vocab)
        else:
            tokenizer = JanusTokenizer.load(tok_ref)
        if tokenizer.vocab_size > vocab:
            raise ConfigError(f"backbone card {name!r}: architecture.text_config.vocab_size={vocab} is smaller than "
                              f"the tokenizer's {tokenizer.vocab_size} tokens; raise vocab_size")
        text = {"model_type": "llama", **spec["text_config"]}
        try:
            config = JanusConfig(text_config=text, vision_config=spec["vision_config"], vq_config=spec["vq_config"],
                                 image_token_id=tokenizer.image_id, tie_word_embeddings=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"backbone card {name!r}: bad architecture ({err})") from None
        _check_geometry(config, f"backbone card {name!r}")
        model = JanusForConditionalGeneration(config).to(dtype)
        extras = {k: spec[k] for k in ("sampling", "image_mean", "image_std") if k in spec}
        return cls(model, tokenizer, card, extras)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> JanusAdapter:
        """A local folder or a hub id (resolved in the Hugging Face cache) in the official layout."""
        from transformers import JanusForConditionalGeneration

        local = resolve_weights(path, "the Janus checkpoint")  # a folder here: never a download
        ref = str(local)
        if not (local / "config.json").is_file():
            raise WeightsError(f"{local / 'config.json'} not found: {local} is not a Janus checkpoint folder "
                               "(config.json + model.safetensors + tokenizer files)")
        try:
            model, info = JanusForConditionalGeneration.from_pretrained(
                ref, dtype=dtype, output_loading_info=True, trust_remote_code=False, use_safetensors=True,
                local_files_only=True)
        except (OSError, ValueError) as err:
            raise WeightsError(
                f"cannot load Janus weights from {ref} ({str(err).splitlines()[0]}): the folder needs config.json "
                "+ model.safetensors (the official layout); download it again with `hf download` if it is incomplete"
            ) from None
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            lines = [f"{ref}: the weights do not match its config.json:"]
            for title, items in problems.items():
                if items:
                    names = [str(i[0]) if isinstance(i, tuple) else str(i) for i in items]
                    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                    lines.append(f"  {title.replace('_', ' ')}: {shown}")
            raise WeightsError("\n".join(lines))
        _check_geometry(model.config, ref)
        tokenizer = JanusTokenizer.load(ref)
        extras, card = {}, None
        if (local / EXTRAS_FILE).is_file():
            saved = json.loads((local / EXTRAS_FILE).read_text())
            extras, card = saved.get("extras", {}), saved.get("card")
        elif (local / "preprocessor_config.json").is_file():
            pre = json.loads((local / "preprocessor_config.json").read_text())
            extras = {k: pre[k] for k in ("image_mean", "image_std") if k in pre}
        return cls(model.eval(), tokenizer, card, extras)

    def save_pretrained(self, path: str | Path) -> Path:
        """The official layout (config.json, model.safetensors, tokenizer files) plus cmrp.json; written to a
        temporary folder first, then moved into place."""
        require_unwrapped(self.model)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save(tmp)
        write_json(tmp / EXTRAS_FILE, {"adapter": "janus", "extras": self.extras, "card": plain(self.card)},
                   ensure_ascii=True)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @property
    def janus(self):
        """The `JanusForConditionalGeneration`, through a PEFT wrapper if there is one."""
        return unwrap_peft(self.model)

    # -- fine-tuning -----------------------------------------------------------------------------
    def lora_targets(self, kind: str = "default") -> list[str]:
        return select_lora_targets(DEFAULT_LORA_TARGETS, self.card, kind)

    def trainable_groups(self) -> dict[str, list[str]]:
        """generation: the image-token head, embeddings and aligner; understanding: the ViT, its aligner and
        the language model (which Janus shares between both tasks: GRPO that should move more than the
        head trains [generation, understanding])."""
        return {"generation": [_GEN_PARAMS], "understanding": [_UND_PARAMS]}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each Llama decoder layer in backward (`finetune.gradient_checkpointing`; transformers
        applies it in training mode)."""
        lm = self.janus.model.language_model
        if enabled:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        """One FSDP unit per Llama decoder layer and per ViT encoder layer (`trainer.strategy: fsdp`)."""
        from transformers.models.janus.modeling_janus import JanusVisionEncoderLayer
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return {LlamaDecoderLayer, JanusVisionEncoderLayer}

    # -- sequences -------------------------------------------------------------------------------
    def _clip(self, text: str) -> str:
        """A segment's text cut to `max_text_tokens` tokens (texts within the limit are untouched)."""
        ids = self.tokenizer.encode(text)
        return text if len(ids) <= self.max_text_tokens else self.tokenizer.decode(ids[: self.max_text_tokens])

    def _render(self, example: Example, stop: str | None = None) -> _Seq:
        """One example as tokens, in Janus-Pro's chat format (the chat template transformers ships with
        Janus-Pro; a persona/system text is a plain prefix, as DeepSeek's system prompt). Untrained text
        between special tokens is tokenised as one string, as the processor does; a trained text is its
        own string. `stop="generate"`: end after the <boi> of the first generated image (a sampling
        prefix); `stop="train"`: end before the first trained text (a text-generation prefix)."""
        tok = self.tokenizer
        seq = _Seq()
        seq.add([tok.bos_id])
        pending = ""

        def flush() -> None:
            nonlocal pending
            if pending:
                seq.add(tok.encode(pending))
                pending = ""

        turns: list[tuple[str, list[Segment]]] = []
        for seg in example.segments:
            if turns and turns[-1][0] == seg.role:
                turns[-1][1].append(seg)
            else:
                turns.append((seg.role, [seg]))
        for role, segs in turns:
            if role == "system":
                pending += "\n".join(s.text for s in segs if s.kind == "text") + "\n\n"
                continue
            pending += HEADERS[role]
            for j, seg in enumerate(segs):
                if seg.kind == "text":
                    if stop == "train" and seg.train:
                        flush()
                        return seq
                    if role == "user":  # the template strips a turn's outer whitespace, joins texts by a space
                        body = seg.text.lstrip() if j == 0 else seg.text
                        body = body.rstrip() if j == len(segs) - 1 else body
                        lead = " " if j and segs[j - 1].kind == "text" else ""
                    else:
                        body, lead = seg.text, " "
                    text = lead + self._clip(body)
                    if seg.train:
                        flush()
                        seq.add(tok.encode(text), trained=True)
                    else:
                        pending += text
                    continue
                if role == "user" and j:
                    pending += "\n"
                flush()
                if seg.generate:
                    seq.add([tok.boi_id])
                    if stop == "generate":
                        return seq
                    seq.gen.append(self._load_image(seg))
                    seq.gen_keys.append(str(seg.image) if seg.pixels is None and seg.image is not None else None)
                    seq.add([tok.pad_id] * self.gen_tokens, "gen")
                    seq.add([tok.eoi_id])
                else:
                    seq.und.append(self._load_image(seg))
                    seq.add([tok.boi_id])
                    seq.add([tok.image_id] * self.und_tokens, "und")
                    seq.add([tok.eoi_id])
                if role == "user" and j < len(segs) - 1:
                    pending += "\n"
            if role == "character":
                flush()
                last = segs[-1]
                seq.add([tok.eos_id], trained=last.kind == "text" and last.train)
            else:
                pending += "\n\n"
        flush()
        if stop is not None:
            raise ValueError(f"context has no {'generated image' if stop == 'generate' else 'trained text'} to stop at")
        return seq

    def collate(self, examples: list[Example]) -> JanusBatch:
        seqs = [self._render(ex) for ex in examples]
        b, length = len(seqs), max(len(s.ids) for s in seqs)
        ids = torch.full((b, length), self.tokenizer.pad_id, dtype=torch.long)
        valid = torch.zeros((b, length), dtype=torch.bool)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        und = torch.zeros_like(valid)
        gen = torch.zeros_like(valid)
        gen_pred = torch.zeros_like(valid)
        und_images, gen_images, gen_keys = [], [], []
        for i, s in enumerate(seqs):
            n = len(s.ids)
            ids[i, :n] = torch.tensor(s.ids)
            valid[i, :n] = True
            trained = torch.tensor(s.trained[1:] + [False])
            nxt = torch.tensor(s.ids[1:] + [IGNORE])
            labels[i, :n] = torch.where(trained, nxt, torch.full_like(nxt, IGNORE))
            kinds = s.kinds
            und[i, :n] = torch.tensor([k == "und" for k in kinds])
            gen[i, :n] = torch.tensor([k == "gen" for k in kinds])
            gen_pred[i, :n] = torch.tensor([k == "gen" for k in kinds[1:]] + [False])
            und_images += s.und
            gen_images += s.gen
            gen_keys += s.gen_keys
        return JanusBatch(ids, valid, labels, und, gen, gen_pred,
                          torch.stack(und_images) if und_images else None,
                          torch.stack(gen_images) if gen_images else None,
                          [ex.task for ex in examples], gen_keys)

    # -- model pieces ----------------------------------------------------------------------------
    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = self.image_mean.to(pixels.device)[:, None, None]
        std = self.image_std.to(pixels.device)[:, None, None]
        dtype = self.janus.model.aligner.fc1.weight.dtype
        return self.janus.model.get_image_features((pixels - mean) / std).pooler_output.to(dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VQ codes [N, gen_tokens] of images [N, 3, S, S] in [0, 1] (the frozen VQ-VAE encoder)."""
        vq = self.janus.model.vqmodel
        x = (pixels.to(self.device) * 2 - 1).to(vq.quant_conv.weight.dtype)
        return vq.encode(x).image_tokens.reshape(pixels.shape[0], -1)

    def _target_codes(self, batch: JanusBatch) -> torch.Tensor | None:
        """VQ codes of a batch's generated images; codes of image files are cached (the VQ-VAE is frozen)."""
        if batch.gen_pixels is None:
            return None
        keys = batch.gen_keys or [None] * len(batch.gen_pixels)
        todo = [i for i, k in enumerate(keys) if k is None or k not in self._code_cache]
        codes = torch.empty(len(keys), self.gen_tokens, dtype=torch.long, device=self.device)
        if todo:
            fresh = self.encode_images(batch.gen_pixels[todo])
            codes[todo] = fresh
            for i, c in zip(todo, fresh, strict=True):
                if keys[i] is not None:
                    self._code_cache[keys[i]] = c.cpu()
        for i, k in enumerate(keys):
            if i not in todo:
                codes[i] = self._code_cache[k].to(self.device)
        return codes

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, S, S] in [0, 1] on the CPU from VQ codes [N, gen_tokens]."""
        pixels = self.janus.model.vqmodel.decode(codes.to(self.device))
        return ((pixels.float() + 1) / 2).clamp(0, 1).cpu()

    def _gen_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        return self.janus.prepare_embeddings_for_image_generation(codes)

    def _embed(self, ids: torch.Tensor, und_mask: torch.Tensor, und_pixels, gen_mask=None, codes=None):
        embeds = self.janus.get_input_embeddings()(ids)
        if und_pixels is not None and bool(und_mask.any()):
            feats = self._vision_features(und_pixels.to(ids.device))
            embeds = embeds.masked_scatter(und_mask[..., None], feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        if codes is not None:
            gen = self._gen_embeds(codes)
            embeds = embeds.masked_scatter(gen_mask[..., None], gen.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        return embeds

    def _lm(self, embeds, mask, positions=None, past=None, use_cache: bool = False):
        out = self.janus.model.language_model(inputs_embeds=embeds, attention_mask=mask.long(),
                                              position_ids=positions, past_key_values=past, use_cache=use_cache)
        return out.last_hidden_state, out.past_key_values

    # -- training --------------------------------------------------------------------------------
    def losses(self, batch: JanusBatch, *, timestep_shift: float | None = None) -> dict[str, torch.Tensor]:
        """{"text": text CE, "image": image-token CE} (`timestep_shift` only matters to flow heads)."""
        batch = batch.to(self.device)
        codes = self._target_codes(batch)
        embeds = self._embed(batch.input_ids, batch.und_mask, batch.und_pixels, batch.gen_mask, codes)
        hidden, _ = self._lm(embeds, batch.attention_mask)
        sel = batch.labels != IGNORE
        if bool(sel.any()):
            logits = self.janus.lm_head(hidden[sel])
            ce = F.cross_entropy(logits.float(), batch.labels[sel])
        else:
            ce = hidden.sum() * 0.0
        if codes is not None:
            logits = self.janus.model.generation_head(hidden[batch.gen_pred_mask])
            image = F.cross_entropy(logits.float(), codes.reshape(-1))
        else:
            image = hidden.sum() * 0.0
        return {"text": ce, "image": image}

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_text(self, examples: list[Example]) -> torch.Tensor:
        batch = self.collate(examples).to(self.device)
        codes = self._target_codes(batch)
        embeds = self._embed(batch.input_ids, batch.und_mask, batch.und_pixels, batch.gen_mask, codes)
        hidden, _ = self._lm(embeds, batch.attention_mask)
        return labelled_logprob(hidden, batch.labels, self.janus.lm_head, IGNORE)

    def _prefix(self, contexts: list[Example], stop: str, unconditional: bool) -> _Prefix:
        """Left-padded prefixes (all rows end at the same column); with `unconditional`, Janus's
        unconditional copies follow: every token but <bos>/<boi> replaced by padding, no image."""
        tok = self.tokenizer
        if stop == "generate":
            seqs = [self._render(Example(c.task, [*c.segments, Segment("image", "character", generate=True)]), stop)
                    for c in contexts]
        else:
            seqs = [self._render(Example(c.task, [*c.segments, Segment("text", "character", train=True)]), stop)
                    for c in contexts]
        c, length = len(seqs), max(len(s.ids) for s in seqs)
        ids = torch.full((c, length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((c, length), dtype=torch.bool)
        und = torch.zeros_like(mask)
        images = []
        for i, s in enumerate(seqs):
            n = len(s.ids)
            ids[i, length - n:] = torch.tensor(s.ids)
            mask[i, length - n:] = True
            und[i, length - n:] = torch.tensor([k == "und" for k in s.kinds])
            images += s.und
        if unconditional:
            keep = (ids == tok.bos_id) | (ids == tok.boi_id)
            ids = torch.cat([ids, torch.where(keep, ids, torch.full_like(ids, tok.pad_id))])
            mask = torch.cat([mask, mask])
            und = torch.cat([und, torch.zeros_like(und)])
        return _Prefix(ids, mask, und, torch.stack(images) if images else None, c)

    def _encode(self, prefix: _Prefix, rows: torch.Tensor | None = None):
        """Run a prefix (optionally some of its rows) through the language model with a cache."""
        device = self.device
        ids, mask, und = prefix.ids, prefix.mask, prefix.und_mask
        pixels = prefix.und_pixels
        if rows is not None:
            if pixels is not None:  # the understood images of the selected rows, in row order
                owner = torch.repeat_interleave(torch.arange(len(und)), und.sum(1) // self.und_tokens)
                picked = torch.cat([(owner == r).nonzero()[:, 0] for r in rows.tolist()])
                pixels = pixels[picked] if len(picked) else None
            ids, mask, und = ids[rows], mask[rows], und[rows]
        ids, mask, und = ids.to(device), mask.to(device), und.to(device)
        embeds = self._embed(ids, und, pixels)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        return embeds, mask, positions

    @torch.no_grad()
    def generate_text(self, contexts: list[Example], *, max_new_tokens: int = 64, temperature: float = 0.0,
                      seed: int = 0) -> list[str]:
        """Continue each context with a character turn (after `<|Assistant|>:`, until the end of sentence)."""
        ids, _ = self._decode(contexts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return [self.tokenizer.decode(t).strip() for t in ids]

    @torch.no_grad()
    def _decode(self, contexts: list[Example], *, max_new_tokens: int, temperature: float = 0.0,
                seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
        """Token ids of each answer (without <eos>) and the logits [B, steps, vocab] of every step: the
        context once, then one token at a time on the key/value cache."""
        tok, device = self.tokenizer, self.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        embeds, mask, positions = self._encode(self._prefix(contexts, "train", False))
        hidden, cache = self._lm(embeds, mask, positions, use_cache=True)
        last, next_pos = hidden[:, -1], positions[:, -1] + 1
        b = len(contexts)
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        steps = []
        for _ in range(max_new_tokens):
            logits = self.janus.lm_head(last).float()
            steps.append(logits)
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=gen)[:, 0]
                token = token.to(device)
            else:
                token = logits.argmax(-1)
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    if t == tok.eos_id:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], 1)
            embeds = self.janus.get_input_embeddings()(token[:, None])
            hidden, cache = self._lm(embeds, mask, next_pos[:, None], past=cache, use_cache=True)
            last, next_pos = hidden[:, -1], next_pos + 1
        return out, torch.stack(steps, 1).cpu()

    def _chunks(self, steps: int) -> list[torch.Tensor]:
        if not 1 <= steps <= self.gen_tokens:
            raise ValueError(f"steps={steps}: a Janus image has {self.gen_tokens} tokens; use 1..{self.gen_tokens} "
                             "steps (each step is a chunk of consecutive image tokens)")
        return list(torch.arange(self.gen_tokens).tensor_split(steps))

    @torch.no_grad()
    def sample_images(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0,
                      temperature: float | None = None, top_k: int | None = None) -> Rollout:
        """`n` images per context, image tokens drawn one by one with a KV cache (the context is encoded
        once and shared by its n samples). Token sampling is always stochastic, at `temperature` with
        classifier-free guidance at the spec's text scale (defaults: the card's `sampling`); `noise`, `sde`
        and `timestep_shift` belong to flow heads and are not used. The gen_tokens positions form
        `spec.steps` chunks; the chunks in `spec.window` ([start, end)) are stored for `rollout_logprob`,
        each with the mean log-prob of its tokens."""
        if spec.same_noise:
            raise ValueError("same_noise has no meaning for a token head (Janus): set grpo.same_noise: false")
        steps, window = spec.steps, spec.window
        cfg = token_guidance_scale(spec, float(self.sampling["cfg_scale"]), "Janus")
        temp = float(self.sampling["temperature"] if temperature is None else temperature)
        top_k = self.sampling.get("top_k") if top_k is None else top_k
        chunks = self._chunks(steps)
        start, end = window if window is not None else (0, 0)
        guided = cfg != 1.0
        prefix = self._prefix(contexts, "generate", guided)
        embeds, mask, positions = self._encode(prefix)
        hidden, cache = self._lm(embeds, mask, positions, use_cache=True)
        cache.batch_repeat_interleave(n)
        b = len(contexts) * n
        st = {"last": hidden[:, -1].repeat_interleave(n, 0), "cache": cache,
              "mask": mask.repeat_interleave(n, 0), "pos": (positions[:, -1] + 1).repeat_interleave(n, 0)}

        def next_logits(done: torch.Tensor):
            if done.shape[1]:
                token = done[:, -1]
                token = torch.cat([token, token]) if guided else token
                st["mask"] = torch.cat([st["mask"], st["mask"].new_ones(st["mask"].shape[0], 1)], 1)
                h, st["cache"] = self._lm(self._gen_embeds(token[:, None]), st["mask"], st["pos"][:, None],
                                          past=st["cache"], use_cache=True)
                st["last"], st["pos"] = h[:, -1], st["pos"] + 1
            logits = self.janus.model.generation_head(st["last"]).float()
            return (logits[:b], logits[b:]) if guided else (logits, None)

        gen = torch.Generator(device="cpu").manual_seed(seed)
        sampled = sample_token_sequence(next_logits, b, self.gen_tokens, cfg_scale=cfg, temperature=temp,
                                        top_k=top_k, generator=gen, device=self.device)
        kept = chunks[start:end]
        positions_mask = torch.zeros(b, len(kept), self.gen_tokens, dtype=torch.bool)
        for k, chunk in enumerate(kept):
            positions_mask[:, k, chunk] = True
        logps = sampled.logprob.float().cpu()
        step_logps = (logps[:, None, :] * positions_mask).sum(-1) / positions_mask.sum(-1).clamp(min=1)
        trajectory = TokenTrajectory(sampled.tokens.cpu(), positions_mask, step_logps)
        group_ids = torch.arange(len(contexts)).repeat_interleave(n)
        state = _RolloutState(prefix, n, cfg, temp, top_k)
        return Rollout(self.decode_images(sampled.tokens), group_ids, trajectory, 0.0, "tokens", state=state)

    @torch.no_grad()
    def think_and_sample(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0,
                         max_think_tokens: int = 64, temperature: float = 0.0,
                         text_seed: int = 0) -> tuple[list[str], Rollout]:
        """Think mode: per context a character text turn first (the thinking / plan), then images sampled
        with it in the same context, exactly as if both had been given as one context (Janus's
        unconditional prompt drops the thinking with the rest). Returns (texts, rollout)."""
        texts = self.generate_text(contexts, max_new_tokens=max_think_tokens, temperature=temperature, seed=text_seed)
        with_thinking = [Example(c.task, [*c.segments, Segment("text", "character", t)])
                         for c, t in zip(contexts, texts, strict=True)]
        return texts, self.sample_images(with_thinking, spec, n=n, seed=seed)

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None,
                        *, return_mean: bool = False):
        """Mean log-prob [len(index)] of stored step `step`'s tokens under the current weights (with
        gradients), by teacher forcing the sampled tokens in one pass. With `return_mean`: (logp,
        per-token log-probs [len(index), gen_tokens] (0 off the step), the step's positions) for the KL."""
        state: _RolloutState = rollout.state
        traj = rollout.trajectory
        if not isinstance(traj, TokenTrajectory) or not 0 <= step < traj.logprobs.shape[1]:
            raise ValueError(f"rollout has no stored step {step}")
        index = torch.arange(len(rollout)) if index is None else index.cpu()
        positions = traj.steps[index, step]
        end = int(positions.nonzero()[:, 1].max()) + 1
        rows = index // state.n
        guided = state.cfg_scale != 1.0
        if guided:
            rows = torch.cat([rows, rows + state.prefix.contexts])
        embeds, mask, pos = self._encode(state.prefix, rows)
        device = embeds.device
        tokens = traj.tokens[index, :end].to(device)
        inputs = torch.cat([tokens, tokens]) if guided else tokens
        gen_embeds = self._gen_embeds(inputs[:, : end - 1])
        embeds = torch.cat([embeds, gen_embeds.to(embeds.dtype)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], end - 1)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(end - 1, device=device)[None]], 1)
        hidden, _ = self._lm(embeds, mask, pos)
        p = state.prefix.ids.shape[1]
        logits = self.janus.model.generation_head(hidden[:, p - 1: p - 1 + end]).float()
        b = len(index)
        cond, uncond = (logits[:b], logits[b:]) if guided else (logits, None)
        scored = token_step(guided_logits(cond, uncond, state.cfg_scale), temperature=state.temperature,
                            top_k=state.top_k, tokens=tokens)
        on = positions.to(device)
        token_logp = F.pad(scored.logprob * on[:, :end], (0, self.gen_tokens - end))
        logp = token_logp.sum(1) / on.sum(1).clamp(min=1)
        return (logp, token_logp, on) if return_mean else logp

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], options: list[list[str] | None]) -> list[str]:
        """VQA: multiple choice by option likelihood, open questions by greedy decoding. `images`
        [N, 3, H, W] in [0, 1]; returns the chosen option's text or the free answer."""
        return answer_questions(self, images, questions, options, score_batch=64)
