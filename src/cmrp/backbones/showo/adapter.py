"""The `showo` backbone adapter: Show-o (Phi + MAGVIT-v2 tokens, omni-attention, MaskGIT) behind the
backbone protocol.

Sequences follow Show-o's official templates (`prompting.render`): `<|t2i|> <|sot|> text <|eot|> <|soi|>
codes <|eoi|>` to generate an image, `<|mmu|> <|soi|> codes <|eoi|> <|sot|> USER: \nquestion ASSISTANT: answer
<|eot|>` to understand one, `<|sot|> text <|eot|>` for text alone; role-play turns are USER / ASSISTANT
messages after the persona text. Text trains by next-token CE on the character's turns; a generated
image trains by masked-token CE: a cosine-schedule fraction of its codes is replaced by the mask token
and predicted at their own positions, with the image's <|soi|> / <|eoi|> (the official t2i loss;
`architecture.training.image_loss_markers: false` keeps the masked codes only). `sample_images` runs
Show-o's MaskGIT with classifier-free guidance (the unconditional branch: the empty prompt
`<|t2i|> <|sot|> <|eot|>`); each MaskGIT step is one GRPO step whose log-prob is the mean categorical
log-prob of the tokens it committed. Positions count real tokens only (the official code counts its
left padding too; rotary embeddings see only differences of positions, so the logits are the same).

Checkpoint folder (the official layout): `config.json` (Showo's fields: vocab_size, llm_vocab_size,
llm_model_path, codebook_size, num_vq_tokens, ...), `pytorch_model.safetensors` (keys `showo.*`), the
language model's config + tokenizer under `llm_model_path`, and the MAGVIT-v2 tokenizer in its own
folder (`vq/config.json` + `vq/pytorch_model.safetensors`, the `showlab/magvitv2` layout).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmrp.backbones.common import answer_questions, labelled_logprob, select_lora_targets
from cmrp.backbones.images import ImageLoader
from cmrp.backbones.kit import HoldsModel, plain, require_unwrapped, resolve_weights, unwrap_peft
from cmrp.backbones.showo.magvit import MagvitConfig, MAGVITv2
from cmrp.backbones.showo.maskgit import (
    choice_temperatures,
    commit_counts,
    commit_logprob,
    cosine_schedule,
    maskgit_step,
    showo_guidance,
)
from cmrp.backbones.showo.model import PHI_1_5, SHOWO_PHI, Showo, ShowoArch, ShowoVocab, omni_attention_mask
from cmrp.backbones.showo.prompting import render
from cmrp.backbones.showo.text import ShowoText
from cmrp.checkpoint import save_safetensors_atomic
from cmrp.data.tasks import Example, Segment
from cmrp.errors import ConfigError, WeightsError
from cmrp.jsonio import write_json
from cmrp.registry import BACKBONES
from cmrp.sampling.rollout import Rollout, TokenTrajectory
from cmrp.sampling.spec import SamplerSpec, token_guidance_scale
from cmrp.sampling.tokens import token_step

__all__ = ["ShowoAdapter", "load_showo_state"]

IGNORE = -100
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.safetensors"  # the official ModelMixin's safetensors file name
WEIGHTS_ALTERNATIVES = ("pytorch_model.safetensors", "model.safetensors", "pytorch_model.bin")
LLM_DIR = "llm"
VQ_DIR = "vq"
DEFAULT_VQ = "showlab/magvitv2"
SAMPLING_KEYS = {"temperature": float, "choice_temperature": float, "min_mask_rate": float}


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


TRAINING_KEYS = {"image_loss_markers": _as_bool}

_LINEAR = r"showo\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|dense)|mlp\.(fc1|fc2))"
DEFAULT_LORA_TARGETS = {"default": [_LINEAR], "generation": [_LINEAR], "understanding": [_LINEAR]}


@dataclass
class _Seq:
    ids: list[int] = field(default_factory=list)
    span: list[int] = field(default_factory=list)  # 0 text, k >= 1: the k-th image span
    trained: list[bool] = field(default_factory=list)  # text token that is a next-token target
    slot: list[str] = field(default_factory=list)  # "" | "und" | "gen" (an image code) | "gen_marker"
    und: list[torch.Tensor] = field(default_factory=list)
    gen: list[torch.Tensor] = field(default_factory=list)

    def add(self, ids: list[int], span: int = 0, trained: bool | list[bool] = False, slot: str = "") -> None:
        self.ids += ids
        self.span += [span] * len(ids)
        self.trained += trained if isinstance(trained, list) else [trained] * len(ids)
        self.slot += [slot] * len(ids)


@dataclass
class ShowoBatch:
    input_ids: torch.Tensor  # [B, L] (image slots hold the pad id until codes are filled in)
    labels: torch.Tensor  # [B, L] next-token label of text positions, IGNORE elsewhere
    position_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L, L] bool, omni-attention
    valid: torch.Tensor  # [B, L] bool
    und_slots: torch.Tensor  # [B, L] bool: codes of understood images
    gen_slots: torch.Tensor  # [B, L] bool: codes of generated images
    gen_markers: torch.Tensor  # [B, L] bool: the <|soi|> / <|eoi|> of generated images
    und_pixels: torch.Tensor | None
    gen_pixels: torch.Tensor | None
    spans: torch.Tensor  # [B, L] long: 0 text, k >= 1 the k-th image span (markers included)
    task_ids: list[str] = field(default_factory=list)

    def to(self, device) -> ShowoBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return ShowoBatch(**moved)


@dataclass
class _RolloutState:
    """What `rollout_logprob` needs besides the TokenTrajectory: the contexts, the full commit order and
    the sampling settings (the prompt rows are packed once, on first use, with gradients re-computed)."""

    contexts: list[Example]
    n: int
    commit_step: torch.Tensor  # [B, N] long: the MaskGIT step that committed each code
    recorded: list[int]  # MaskGIT step index of each stored (trainable) step
    cfg_scale: float
    temperature: float
    rows: ShowoBatch | None = None  # n rows per context (+ 1 uncond row), packed on first recompute


@BACKBONES.register("showo")
class ShowoAdapter(HoldsModel):
    """Owns the Show-o transformer (`model`, trainable), the MAGVIT-v2 tokenizer (`vq`, frozen) and the
    text tokenizer."""

    image_head = "tokens"

    def __init__(self, model: Showo, vq: MAGVITv2, text: ShowoText, card: Any = None, max_text_tokens: int = 128,
                 *, temperature: float = 1.0, choice_temperature: float = 1.0, min_mask_rate: float = 0.0,
                 image_loss_markers: bool = True):
        self.model = model
        self.vq = vq.eval().requires_grad_(False)
        self.text = text
        self.card = card
        self.arch = model.arch
        self.vocab = ShowoVocab(model.arch.llm_vocab_size, model.arch.codebook_size, text.sot, text.eot,
                                model.arch.num_new_special_tokens)
        self.image_size = model.arch.image_size
        self.num_vq_tokens = model.arch.num_vq_tokens
        self.max_text_tokens = max_text_tokens
        self.temperature = temperature
        self.choice_temperature = choice_temperature
        self.min_mask_rate = min_mask_rate
        self.image_loss_markers = image_loss_markers
        self._load_image = ImageLoader(self.image_size)
        if vq.codebook_size != model.arch.codebook_size:
            raise WeightsError(f"MAGVIT-v2 has {vq.codebook_size} codes but Show-o expects {model.arch.codebook_size}")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, card: Any, *, corpus: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> ShowoAdapter:
        spec = plain(card.get("architecture") or {})
        settings = _settings(spec.pop("sampling", {}) or {}, spec.pop("training", {}) or {}, card)
        if card.get("weights"):
            adapter = cls.from_pretrained(card["weights"], dtype=dtype, tokenizer=card.get("tokenizer"))
            adapter.card = card
            for key, value in settings.items():
                setattr(adapter, key, value)
            return adapter
        try:
            arch = ShowoArch.from_dict(spec)
        except TypeError as err:
            raise ConfigError(f"backbone card {card.get('name')!r}: bad architecture key ({err})") from None
        tok_ref = card.get("tokenizer") or "train-bpe"
        if tok_ref == "train-bpe":
            if not corpus:
                raise ConfigError("backbone card tokenizer 'train-bpe' needs a text corpus (the character's texts)")
            text = ShowoText.train_bpe(corpus, vocab_size=arch.llm_vocab_size)
        else:
            text = ShowoText.load(tok_ref)
        if text.vocab_size > arch.llm_vocab_size:
            raise ConfigError(
                f"backbone card {card.get('name')!r}: architecture.llm_vocab_size={arch.llm_vocab_size} is smaller "
                f"than the tokenizer's {text.vocab_size} tokens; raise llm_vocab_size"
            )
        model = Showo(arch).to(dtype)
        return cls(model, MAGVITv2(arch.vq), text, card, **settings)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        tokenizer: str | None = None) -> ShowoAdapter:
        """A folder in the official layout (or a Hugging Face hub id already in the local cache, e.g.
        `showlab/show-o`): Show-o weights + config, the Phi config and tokenizer, the MAGVIT-v2 folder."""
        root = resolve_weights(path, "the Show-o checkpoint")
        config_file = root / CONFIG_FILE
        if not config_file.is_file():
            raise WeightsError(f"{config_file} not found: {root} is not a Show-o checkpoint (official layout: "
                               "config.json + pytorch_model.safetensors, as written by ShowoAdapter.save_pretrained)")
        config = json.loads(config_file.read_text())
        cmrp = config.get("cmrp", {})
        phi = _phi_sizes(root, config)
        vq_root = root / VQ_DIR if (root / VQ_DIR / CONFIG_FILE).is_file() else resolve_weights(
            cmrp.get("vq_model", DEFAULT_VQ), "the MAGVIT-v2 tokenizer")
        vq_cfg = _magvit_config(vq_root)
        num_vq = int(config.get("num_vq_tokens", 256))
        side = int(round(num_vq**0.5))
        arch = ShowoArch(
            phi=phi, llm_vocab_size=int(config["llm_vocab_size"]),
            num_new_special_tokens=int(config.get("num_new_special_tokens", 10)),
            codebook_size=int(config.get("codebook_size", 8192)),
            image_size=int(cmrp.get("image_size", side * vq_cfg.downsample)), vq=vq_cfg,
        )
        if arch.num_vq_tokens != num_vq:
            raise WeightsError(f"{config_file}: num_vq_tokens={num_vq} is not a square grid of MAGVIT-v2 tokens")
        if int(config.get("vocab_size", arch.vocab_size)) != arch.vocab_size:
            raise WeightsError(f"{config_file}: vocab_size={config['vocab_size']} but llm_vocab_size + special tokens + "
                               f"codebook + mask = {arch.vocab_size}")
        model = Showo(arch)
        load_showo_state(model, _read_weights(root, "Show-o"), str(root))
        vq = MAGVITv2(vq_cfg)
        load_showo_state(vq, _read_weights(vq_root, "MAGVIT-v2"), str(vq_root))
        text = ShowoText.load(tokenizer) if tokenizer and tokenizer != "train-bpe" else _load_text(root, config)
        return cls(model.to(dtype), vq, text, cmrp.get("card"),
                   **_settings(cmrp.get("sampling", {}), cmrp.get("training", {}), None))

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.showo_module
        require_unwrapped(self.model)
        save_safetensors_atomic({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path / WEIGHTS_FILE)
        arch = self.arch
        config = {
            "_class_name": "Showo", "w_clip_vit": False, "vocab_size": arch.vocab_size,
            "llm_vocab_size": arch.llm_vocab_size, "llm_model_path": LLM_DIR, "codebook_size": arch.codebook_size,
            "num_vq_tokens": arch.num_vq_tokens, "num_new_special_tokens": arch.num_new_special_tokens,
            "mask_token_id": self.vocab.mask,
            "cmrp": {"image_size": arch.image_size, "card": plain(self.card),
                     "sampling": {"temperature": self.temperature, "choice_temperature": self.choice_temperature,
                                  "min_mask_rate": self.min_mask_rate},
                     "training": {"image_loss_markers": self.image_loss_markers}},
        }
        write_json(path / CONFIG_FILE, config, ensure_ascii=True)
        (path / LLM_DIR).mkdir(exist_ok=True)
        model.showo.config.to_json_file(str(path / LLM_DIR / CONFIG_FILE))
        self.text.save(path / LLM_DIR)
        (path / VQ_DIR).mkdir(exist_ok=True)
        vq_state = {k: v.detach().contiguous() for k, v in self.vq.state_dict().items()}
        save_safetensors_atomic(vq_state, path / VQ_DIR / WEIGHTS_FILE)
        vq_config = {"_class_name": "MAGVITv2", **self.vq.cfg.to_dict()}
        write_json(path / VQ_DIR / CONFIG_FILE, vq_config, ensure_ascii=True)
        return path

    def to(self, device) -> ShowoAdapter:
        self.vq.to(device)  # the VQ model is not part of self.model
        return super().to(device)

    @property
    def showo_module(self) -> Showo:
        """The Show-o module, through a PEFT wrapper if there is one."""
        return unwrap_peft(self.model)

    def _vq(self) -> MAGVITv2:
        device = self.device
        if next(self.vq.parameters()).device != device:
            self.vq.to(device)
        return self.vq

    # -- fine-tuning -----------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each Phi decoder layer in backward (`finetune.gradient_checkpointing`); transformers
        applies it in training mode."""
        phi = self.showo_module.showo
        if enabled:
            phi.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            phi.gradient_checkpointing_disable()

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        """One FSDP unit per Phi decoder layer."""
        from transformers.models.phi.modeling_phi import PhiDecoderLayer

        return {PhiDecoderLayer}

    def lora_targets(self, kind: str = "default") -> list[str]:
        return select_lora_targets(DEFAULT_LORA_TARGETS, self.card, kind)

    def trainable_groups(self) -> dict[str, list[str]]:
        """Show-o shares every weight between understanding and generation (one transformer, one
        vocabulary), so both groups name the whole model."""
        return {"generation": [r"showo\..*"], "understanding": [r"showo\..*"]}

    # -- sequences -------------------------------------------------------------------------------
    def _clip(self, text: str) -> str:
        """A segment's text cut to `max_text_tokens` tokens (texts within the limit are untouched)."""
        ids = self.text.encode(text)
        return text if len(ids) <= self.max_text_tokens else self.text.decode(ids[: self.max_text_tokens])

    def _special(self, name: str) -> int:
        return {"<|sot|>": self.vocab.sot, "<|eot|>": self.vocab.eot, "<|t2i|>": self.vocab.t2i,
                "<|mmu|>": self.vocab.mmu}[name]

    def _sequence(self, example: Example, *, generate_after: bool = False, stop: bool = False) -> _Seq:
        """The example in Show-o's official layout (`prompting.render`). Untrained text between special
        tokens is tokenised as one string (as the official prompts are); a trained text is its own string,
        starting at a word boundary. In an understanding sequence the task token and the images form one
        bidirectional span (the official understanding mask); elsewhere each image is its own span."""
        segments = [replace(s, text=self._clip(s.text)) if s.kind == "text" else s for s in example.segments]
        task, pieces = render(segments, generate_after=generate_after, stop=stop)
        seq, spans, pending = _Seq(), 0, ""

        def flush() -> None:
            nonlocal pending
            if pending:
                seq.add(self.text.encode(pending))
                pending = ""

        for piece in pieces:
            if piece.kind == "text" and not piece.trained:
                pending += piece.text
                continue
            flush()
            if piece.kind == "text":
                seq.add(self.text.encode(piece.text), trained=True)
            elif piece.kind == "token":
                seq.add([self._special(piece.text)], span=1 if task == "mmu" and piece.text == "<|mmu|>" else 0,
                        trained=piece.trained)
            else:
                if not (task == "mmu" and spans == 1):
                    spans += 1
                slot = "gen" if piece.generate else "und"
                if piece.segment is not None:
                    (seq.gen if piece.generate else seq.und).append(self._load_image(piece.segment))
                fill = self.vocab.mask if piece.segment is None else self.vocab.pad
                marker = "gen_marker" if piece.generate else ""
                seq.add([self.vocab.soi], span=spans, slot=marker)
                seq.add([fill] * self.num_vq_tokens, span=spans, slot=slot)
                seq.add([self.vocab.eoi], span=spans, slot=marker)
        flush()
        return seq

    def _pack(self, seqs: list[_Seq], *, left: bool = False, task_ids: list[str] | None = None) -> ShowoBatch:
        b, length = len(seqs), max(len(s.ids) for s in seqs)
        ids = torch.full((b, length), self.vocab.pad, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        span = torch.zeros((b, length), dtype=torch.long)
        valid = torch.zeros((b, length), dtype=torch.bool)
        und = torch.zeros((b, length), dtype=torch.bool)
        gen = torch.zeros((b, length), dtype=torch.bool)
        markers = torch.zeros((b, length), dtype=torch.bool)
        und_pixels, gen_pixels = [], []
        for i, s in enumerate(seqs):
            n = len(s.ids)
            cols = slice(length - n, length) if left else slice(0, n)
            ids[i, cols] = torch.tensor(s.ids)
            # labels[j] = the token at j + 1 when that token is trained (next-token prediction)
            nxt = torch.tensor(s.ids[1:] + [IGNORE])
            trained = torch.tensor(s.trained[1:] + [False])
            labels[i, cols] = torch.where(trained, nxt, torch.full_like(nxt, IGNORE))
            span[i, cols] = torch.tensor(s.span)
            valid[i, cols] = True
            und[i, cols] = torch.tensor([k == "und" for k in s.slot])
            gen[i, cols] = torch.tensor([k == "gen" for k in s.slot])
            markers[i, cols] = torch.tensor([k == "gen_marker" for k in s.slot])
            und_pixels += s.und
            gen_pixels += s.gen
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        return ShowoBatch(ids, labels, positions, omni_attention_mask(span, valid), valid, und, gen, markers,
                          torch.stack(und_pixels) if und_pixels else None,
                          torch.stack(gen_pixels) if gen_pixels else None, span, list(task_ids or []))

    # -- training --------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> ShowoBatch:
        return self._pack([self._sequence(ex) for ex in examples], task_ids=[ex.task for ex in examples])

    def _fill_codes(self, batch: ShowoBatch, mask_gen: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input ids with image codes filled in (generated images partly masked when `mask_gen`), and
        the image targets [B, L]: the masked codes, and the generated images' <|soi|> / <|eoi|> when
        `image_loss_markers` (the official t2i loss), IGNORE elsewhere. The masks are drawn as Show-o
        draws them (`mask_or_random_replace_tokens`: one uniform time per image, then a random order)."""
        ids = batch.input_ids.clone()
        offset = self.vocab.image_offset
        if batch.und_pixels is not None:
            ids[batch.und_slots] = (self._vq().encode_codes(batch.und_pixels) + offset).reshape(-1).to(ids.device)
        targets = None
        if batch.gen_pixels is not None:
            codes = self._vq().encode_codes(batch.gen_pixels).to(ids.device)
            g, n = codes.shape
            tokens = codes + offset
            if mask_gen:
                ratio = cosine_schedule(torch.rand(g)).clip(self.min_mask_rate)
                count = (n * ratio).round().clamp(min=1).to(ids.device)
                masked = torch.rand(g, n).argsort(dim=-1).to(ids.device) < count[:, None]
                targets = torch.full_like(ids, IGNORE)
                targets[batch.gen_slots] = torch.where(masked, tokens, torch.full_like(tokens, IGNORE)).reshape(-1)
                if self.image_loss_markers:
                    targets[batch.gen_markers] = ids[batch.gen_markers]
                tokens = torch.where(masked, torch.full_like(tokens, self.vocab.mask), tokens)
            ids[batch.gen_slots] = tokens.reshape(-1)
        return ids, targets

    def losses(self, batch: ShowoBatch, *, timestep_shift: float | None = None) -> dict[str, torch.Tensor]:
        """{"text": next-token CE over trained text, "image": CE over the masked codes (and the <|soi|> /
        <|eoi|> markers, `image_loss_markers`) predicted in place}. `timestep_shift` belongs to flow heads
        and does not apply."""
        ids, targets = self._fill_codes(batch, mask_gen=True)
        model = self.showo_module
        hidden = model.hidden(ids, batch.attention_mask, batch.position_ids)
        head = model.showo.lm_head  # logits only where a loss needs them (full-vocabulary logits are large)
        sel = batch.labels != IGNORE
        ce = F.cross_entropy(head(hidden[sel]).float(), batch.labels[sel]) if bool(sel.any()) else hidden.sum() * 0.0
        if targets is not None:
            img = targets != IGNORE
            image = F.cross_entropy(head(hidden[img]).float(), targets[img])
        else:
            image = hidden.sum() * 0.0
        return {"text": ce, "image": image}

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_text(self, examples: list[Example]) -> torch.Tensor:
        batch = self.collate(examples).to(self.device)
        ids, _ = self._fill_codes(batch, mask_gen=False)
        model = self.showo_module
        hidden = model.hidden(ids, batch.attention_mask, batch.position_ids)
        return labelled_logprob(hidden, batch.labels, model.showo.lm_head, IGNORE)

    @torch.no_grad()
    def generate_text(self, contexts: list[Example], *, max_new_tokens: int = 64, temperature: float = 0.0,
                      seed: int = 0) -> list[str]:
        """Continue each context with a character turn: the official prompt ends with `ASSISTANT:` and the
        answer runs until `<|eot|>` (greedy at temperature 0, as Show-o's understanding demo)."""
        ids, _ = self._decode(contexts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return [self.text.decode(t).strip() for t in ids]

    @torch.no_grad()
    def _decode(self, contexts: list[Example], *, max_new_tokens: int, temperature: float = 0.0,
                seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
        """Token ids of each answer (without <|eot|>) and the text logits [B, steps, llm_vocab] of every step:
        the prompt once under the omni-attention mask, then one token at a time on the key/value cache
        (a new token sees everything before it). Only text ids are drawn (image codes and special tokens
        are not answers)."""
        device = self.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        seqs = [self._sequence(Example(c.task, [*c.segments, Segment("text", "character", "", train=True)]),
                               stop=True) for c in contexts]
        batch = self._pack(seqs, left=True).to(device)
        ids, _ = self._fill_codes(batch, mask_gen=False)
        valid = batch.valid
        phi = self.showo_module.showo
        b = len(contexts)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        steps = []
        result = phi(input_ids=ids, attention_mask=batch.attention_mask[:, None], position_ids=batch.position_ids,
                     use_cache=True, logits_to_keep=1)
        cache, next_pos = result.past_key_values, batch.position_ids[:, -1] + 1
        for _ in range(max_new_tokens):
            logits = result.logits[:, -1, : self.vocab.llm_vocab_size].float()
            steps.append(logits)
            if temperature > 0:
                token = token_step(logits, temperature=temperature, generator=gen).tokens
            else:
                token = logits.argmax(dim=-1)
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    if t == self.vocab.eot:
                        done[i] = True
                    else:
                        out[i].append(t)
            if all(done):
                break
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            result = phi(input_ids=token[:, None], attention_mask=valid[:, None, None, :], position_ids=next_pos[:, None],
                         past_key_values=cache, use_cache=True)
            cache, next_pos = result.past_key_values, next_pos + 1
        return out, torch.stack(steps, 1).cpu()

    def _uncond_sequence(self) -> _Seq:
        """Show-o's unconditional prompt `<|t2i|> <|sot|> <|eot|>` with the image block to generate."""
        seq = _Seq()
        seq.add([self.vocab.t2i, self.vocab.sot, self.vocab.eot])
        seq.add([self.vocab.soi], span=1, slot="gen_marker")
        seq.add([self.vocab.mask] * self.num_vq_tokens, span=1, slot="gen")
        seq.add([self.vocab.eoi], span=1, slot="gen_marker")
        return seq

    def _prompt_rows(self, contexts: list[Example], n: int, guided: bool) -> ShowoBatch:
        """Left-padded rows `context <|soi|> [mask]*N <|eoi|>`: each context repeated n times, then (guided)
        one unconditional row (the empty prompt)."""
        seqs = [self._sequence(ctx, generate_after=True) for ctx in contexts for _ in range(n)]
        if guided:
            seqs.append(self._uncond_sequence())
        batch = self._pack(seqs, left=True).to(self.device)
        ids, _ = self._fill_codes(batch, mask_gen=False)
        batch.input_ids = ids
        return batch

    def _encode_prompts(self, contexts: list[Example], guided: bool):
        """Each context's prompt (`<|t2i|> ... <|eot|>`) encoded once, plus the empty prompt when guided:
        (per-layer keys/values, valid [P, Lp], next position [P]). The image block is run on top of it at
        every MaskGIT step; the prompt is causal text, so it never sees the block."""
        block = self.num_vq_tokens + 2
        seqs = [self._sequence(ctx, generate_after=True) for ctx in contexts]
        if guided:
            seqs.append(self._uncond_sequence())
        for seq in seqs:  # drop the image block: it is run at every step
            for name in ("ids", "span", "trained", "slot"):
                setattr(seq, name, getattr(seq, name)[:-block])
        batch = self._pack(seqs, left=True).to(self.device)
        ids, _ = self._fill_codes(batch, mask_gen=False)
        out = self.showo_module.showo.model(input_ids=ids, attention_mask=batch.attention_mask[:, None],
                                            position_ids=batch.position_ids, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return layers, batch.valid, batch.position_ids[:, -1] + 1

    def _cached_image_logits(self, prompt, rows: torch.Tensor, codes: torch.Tensor, uncond_row: int | None,
                             cfg_scale: float) -> torch.Tensor:
        """Like `_image_logits`, on encoded prompts: `rows` [B] the prompt of each sample."""
        from transformers import DynamicCache

        layers, valid, next_pos = prompt
        n_tok, offset = self.num_vq_tokens, self.vocab.image_offset
        guided = uncond_row is not None and cfg_scale != 1.0
        pick = torch.cat([rows, torch.full_like(rows, uncond_row)]) if guided else rows
        image = torch.where(codes < 0, torch.full_like(codes, self.vocab.mask), codes + offset)
        image = torch.cat([image, image]) if guided else image
        r = pick.shape[0]
        ids = torch.cat([torch.full((r, 1), self.vocab.soi, device=image.device), image,
                         torch.full((r, 1), self.vocab.eoi, device=image.device)], dim=1)
        block = ids.shape[1]
        keys_valid = torch.cat([valid[pick], torch.ones(r, block, dtype=torch.bool, device=valid.device)], dim=1)
        mask = keys_valid[:, None, None, :].expand(r, 1, block, keys_valid.shape[1])
        positions = next_pos[pick][:, None] + torch.arange(block, device=ids.device)[None]
        cache = DynamicCache(ddp_cache_data=[(k[pick], v[pick]) for k, v in layers],
                             config=self.showo_module.showo.config)
        logits = self.showo_module.showo(input_ids=ids, attention_mask=mask, position_ids=positions,
                                         past_key_values=cache, use_cache=True, logits_to_keep=n_tok + 1).logits
        logits = logits[:, :-1, offset:offset + self.vocab.codebook_size]
        if guided:
            cond, uncond = logits.chunk(2)
            return showo_guidance(cond, uncond, cfg_scale)
        return logits.float()

    def _image_logits(self, rows: ShowoBatch, index: torch.Tensor, codes: torch.Tensor, n_cond: int,
                      cfg_scale: float) -> torch.Tensor:
        """Guided logits [len(index), N, codebook] over the codes for cond rows `index` whose image codes are
        `codes` (-1: masked). The unconditional row (if any) sees the same image tokens."""
        n_tok, offset = self.num_vq_tokens, self.vocab.image_offset
        guided = cfg_scale != 1.0
        pick = torch.cat([index, torch.full_like(index, n_cond)]) if guided else index
        ids = rows.input_ids[pick].clone()
        image = torch.where(codes < 0, torch.full_like(codes, self.vocab.mask), codes + offset)
        ids[:, -n_tok - 1:-1] = torch.cat([image, image]) if guided else image
        logits = self.model(ids, rows.attention_mask[pick], rows.position_ids[pick], last=n_tok + 1)
        logits = logits[:, :-1, offset:offset + self.vocab.codebook_size]
        if guided:
            cond, uncond = logits.chunk(2)
            return showo_guidance(cond, uncond, cfg_scale)
        return logits.float()

    @torch.no_grad()
    def sample_images(self, contexts: list[Example], spec: SamplerSpec, *, n: int = 1, seed: int = 0,
                      temperature: float | None = None) -> Rollout:
        """`n` images per context by MaskGIT: `spec.steps` parallel-decoding steps from an all-masked image,
        committing the cosine schedule's share of tokens at each (`commit_counts`) by Gumbel-perturbed
        confidence, the choice temperature compounding from the card's `choice_temperature` (Show-o's
        `generation_temperature`). Every step samples from the categorical at `temperature` (the card's,
        default 1 = Show-o's); the steps inside `spec.window` ([start, end) step indices) are stored as GRPO
        steps with their log-probs. The guidance text scale s (default 1: none): guidance on the logits,
        s·cond − (s − 1)·uncond (Show-o's `guidance_scale` g is s − 1). With the same seed the tokens are
        `Showo.t2i_generate`'s. `noise`, `sde`, `same_noise` and `timestep_shift` belong to flow heads and do
        not apply."""
        steps, window = spec.steps, spec.window
        cfg_scale = token_guidance_scale(spec, 1.0, "Show-o")
        temperature = self.temperature if temperature is None else temperature
        start, end = window if window is not None else (0, 0)
        device, n_tok = self.device, self.num_vq_tokens
        counts = commit_counts(n_tok, steps)
        b = len(contexts) * n
        guided = cfg_scale != 1.0
        prompt = self._encode_prompts(contexts, guided)  # once per context, shared by its n samples
        prompt_of = torch.arange(len(contexts), device=device).repeat_interleave(n)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        codes = torch.full((b, n_tok), -1, dtype=torch.long, device=device)
        commit_step = torch.full((b, n_tok), -1, dtype=torch.long, device=device)
        taus = choice_temperatures(self.choice_temperature, steps)
        stored_steps, stored_logps = [], []
        for k in range(steps):
            logits = self._cached_image_logits(prompt, prompt_of, codes, len(contexts) if guided else None, cfg_scale)
            step = maskgit_step(logits, codes, codes < 0, counts[k], temperature=temperature,
                                choice_temperature=taus[k], generator=gen)
            codes = step.tokens
            commit_step[step.committed] = k
            if start <= k < end:
                stored_steps.append(step.committed)
                stored_logps.append(step.logprob)
        images = self._vq().decode_codes(codes).cpu()
        traj = TokenTrajectory(
            tokens=codes.cpu(),
            steps=(torch.stack(stored_steps, 1) if stored_steps else torch.zeros(b, 0, n_tok, dtype=torch.bool)).cpu(),
            logprobs=(torch.stack(stored_logps, 1) if stored_logps else torch.zeros(b, 0)).float().cpu(),
        )
        state = _RolloutState(contexts, n, commit_step, list(range(start, end)), cfg_scale, temperature)
        group_ids = torch.arange(len(contexts)).repeat_interleave(n)
        return Rollout(images, group_ids, traj, spec.noise, "maskgit", 0.0, state)

    def rollout_logprob(self, rollout: Rollout, step: int, index: torch.Tensor | None = None,
                        *, return_mean: bool = False):
        """Mean log-prob [len(index)] of the tokens stored step `step` committed, recomputed from the state
        before that step under the current weights (with gradients). With `return_mean`: (logp,
        per-position log-probs [B, N], committed positions [B, N]) for the token KL estimate."""
        state: _RolloutState = rollout.state
        traj = rollout.trajectory
        if not isinstance(traj, TokenTrajectory) or not 0 <= step < traj.logprobs.shape[1]:
            raise ValueError(f"rollout has no stored MaskGIT step {step}")
        device = self.device
        index = torch.arange(len(rollout)) if index is None else index.cpu()
        idx = index.to(device)
        k = state.recorded[step]
        tokens = traj.tokens[index].to(device)
        before = torch.where(state.commit_step[idx] < k, tokens, torch.full_like(tokens, -1))
        committed = traj.steps[index, step].to(device)
        if state.rows is None:
            state.rows = self._prompt_rows(state.contexts, state.n, state.cfg_scale != 1.0)
        logits = self._image_logits(state.rows, idx, before, len(rollout), state.cfg_scale)
        token_logp = token_step(logits, temperature=state.temperature, tokens=tokens).logprob
        logp = commit_logprob(token_logp, committed)
        return (logp, token_logp, committed) if return_mean else logp

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], options: list[list[str] | None]) -> list[str]:
        """VQA through `<|mmu|>` sequences: multiple choice by option likelihood, open questions by
        greedy decoding. `images` [N, 3, H, W] in [0, 1]."""
        return answer_questions(self, images, questions, options, score_batch=32)


def _settings(sampling: dict, training: dict, card: Any) -> dict:
    """The adapter's keyword settings from a card's `architecture.sampling` / `architecture.training`."""
    name = card.get("name") if card is not None else "checkpoint"
    out: dict[str, Any] = {}
    for section, values, allowed in (("sampling", sampling, SAMPLING_KEYS), ("training", training, TRAINING_KEYS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(f"backbone card {name!r}: architecture.{section} has unknown keys {unknown}; "
                              f"known: {sorted(allowed)}")
        for key, value in values.items():
            try:
                out[key] = allowed[key](value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"backbone card {name!r}: architecture.{section}.{key}: {err}") from None
    return out






def _read_weights(root: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in WEIGHTS_ALTERNATIVES:
        file = root / name
        if file.is_file():
            if name.endswith(".safetensors"):
                return load_file(str(file))
            return torch.load(str(file), map_location="cpu", weights_only=True)
    raise WeightsError(f"{root}: no {what} weights ({' / '.join(WEIGHTS_ALTERNATIVES)}); the folder is incomplete")


def _phi_sizes(root: Path, config: dict) -> dict:
    """The Phi sizes: `llm_model_path`'s config.json (a sub-folder, or a hub id in the cache), or the
    built-in Phi-1.5 sizes when it names microsoft/phi-1_5. `qk_layernorm` is always on: the official
    Show-o Phi forces it whatever the language model's config.json says (Phi-1.5's says false)."""
    ref = str(config.get("llm_model_path", "microsoft/phi-1_5"))
    local = root / ref
    file = local / CONFIG_FILE if local.is_dir() else None
    if file is None:
        try:
            file = resolve_weights(ref, "the language model config") / CONFIG_FILE
        except WeightsError:
            if ref.rstrip("/").endswith("phi-1_5"):
                return dict(SHOWO_PHI)
            raise
    phi = json.loads(file.read_text())
    keys = set(PHI_1_5) | {"qk_layernorm", "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout",
                           "initializer_range", "tie_word_embeddings", "rope_scaling"}
    return {**{k: v for k, v in phi.items() if k in keys and v is not None}, "qk_layernorm": True}


def _magvit_config(root: Path) -> MagvitConfig:
    file = root / CONFIG_FILE
    spec = json.loads(file.read_text()) if file.is_file() else {}
    known = set(MagvitConfig.__dataclass_fields__)
    return MagvitConfig(**{k: v for k, v in spec.items() if k in known})


def _load_text(root: Path, config: dict) -> ShowoText:
    local = root / str(config.get("llm_model_path", LLM_DIR))
    if (local / "tokenizer.json").is_file():
        return ShowoText.load(local)
    return ShowoText.load(resolve_weights(str(config.get("llm_model_path", "microsoft/phi-1_5")), "the Phi tokenizer"))


def load_showo_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load by name; missing / unexpected keys and shape mismatches are reported by name (`WeightsError`)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the architecture in its config.json:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)
