"""Random-init BAGEL adapters and synthetic batches of chosen sizes, for benchmarks and FLOP/memory checks.

A card's `train-bpe` tokenizer is trained on a fixed word list, so text of an exact token count can be
made (`text_of_tokens`); images are in-memory tensors (no files). `sft_examples` builds the task mix a
Unified-SFT batch holds: a chat turn (text only), a T2I example (prompt -> generated image) and a VQA
example (understood image + question -> answer).
"""

from __future__ import annotations

from typing import Any

import torch

from cmrp.backbones.bagel import BagelAdapter
from cmrp.backbones.bagel.model import BagelArch
from cmrp.config import load_backbone_card
from cmrp.data.tasks import Example, Segment
from cmrp.perf.flops import vae_downsample

__all__ = ["CORPUS", "ROLEPLAY_PROMPT", "build_adapter", "card_with", "context_of_tokens", "sft_examples",
           "text_of_tokens"]

ROLEPLAY_PROMPT = (
    "You are Lupumo. Stay in character. user: Lupumo, what did you do at the beach today? Tell me everything "
    "and then show me a picture of you there with your favourite hat."
)
_WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "su", "to") for b in ("ba", "de", "fi", "go", "hu")]
CORPUS = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))] + [ROLEPLAY_PROMPT] * 20


def card_with(card: Any, **changes: Any) -> dict:
    """A plain copy of a backbone card with `architecture` keys changed: `image_size=S` sets the ViT's
    (and so the generated image's) side, `llm_layers` / `vit_layers` the depth; other keys replace
    `architecture` entries as they are. The copy has no weights (random init) and a `train-bpe` tokenizer
    unless the card names one."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(card, resolve=True) if isinstance(card, DictConfig) else dict(card)
    arch = dict(plain.get("architecture") or {})
    arch["llm"], arch["vit"] = dict(arch.get("llm", {})), dict(arch.get("vit", {}))
    if "image_size" in changes:
        arch["vit"]["image_size"] = int(changes.pop("image_size"))
    if "llm_layers" in changes:
        arch["llm"]["num_hidden_layers"] = int(changes.pop("llm_layers"))
    if "vit_layers" in changes:
        arch["vit"]["num_hidden_layers"] = int(changes.pop("vit_layers"))
    arch.update(changes)
    plain["architecture"] = arch
    plain["weights"] = None
    if not plain.get("tokenizer"):
        plain["tokenizer"] = "train-bpe"
    return plain


def build_adapter(card: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  seed: int = 0, **changes: Any):
    """A random-init BAGEL adapter of `card` (a name, path or mapping; `changes` as in `card_with`),
    its velocity head given small random weights so sampling does real work, in eval mode."""
    torch.manual_seed(seed)
    if isinstance(card, str):
        card = load_backbone_card(card)
    spec = card_with(card, **changes)
    arch = spec["architecture"]
    side = int(arch["vit"].get("image_size", 32))  # the generated image's side too: its latent grid must fit

    parsed = BagelArch.from_dict(arch)
    grid = side // (vae_downsample(parsed) * parsed.latent_patch_size)
    arch["max_latent_size"] = max(parsed.max_latent_size, grid)
    # and the understood image's patch grid its LLM-side position table
    arch["vit_max_num_patch_per_side"] = max(parsed.vit_max_num_patch_per_side, parsed.vit.num_patches_per_side)
    with torch.device(device):  # initialised where it runs: a few-billion-parameter slice builds in seconds on a GPU
        adapter = BagelAdapter.build(spec, corpus=CORPUS, dtype=dtype)
    adapter.to(device)
    torch.nn.init.normal_(adapter.bagel.llm2vae.weight, std=0.02)
    adapter.model.eval()
    adapter.max_text_tokens = 1 << 16  # benchmarks choose lengths themselves: nothing is cut
    return adapter


def text_of_tokens(tokenizer: Any, n: int) -> str:
    """Text the tokenizer encodes into exactly `n` tokens (n >= 0)."""
    if n <= 0:
        return ""
    words = (_WORDS * (n // len(_WORDS) + 2))[: n + 8]
    ids = tokenizer.encode(" ".join(words))
    while len(ids) < n:
        words = words * 2
        ids = tokenizer.encode(" ".join(words))
    text = tokenizer.decode(ids[:n])
    while len(tokenizer.encode(text)) > n:
        text = text[:-1]
    pad = 0
    while len(tokenizer.encode(text)) < n:  # a cut inside a word: finish with single letters
        text += " a"
        pad += 1
        if pad > n:
            raise ValueError(f"cannot make text of {n} tokens with this tokenizer")
    return text


def context_of_tokens(adapter: Any, n: int):
    """A T2I context (one user turn) whose collated prefix is as close to `n` tokens as the turn's fixed
    framing allows (bos, role header, eos); returns (example, its exact prefix length)."""
    framing = len(adapter.collate([Example("t2i", [Segment("text", "user", "")])]).input_ids[0])
    example = Example("t2i", [Segment("text", "user", text_of_tokens(adapter.tokenizer, max(0, n - framing)))])
    return example, int(adapter.collate([example]).input_ids.shape[1])


def sft_examples(adapter: Any, *, batch: int, text_tokens: int = 64, tasks: tuple[str, ...] = ("chat", "t2i", "vqa"),
                 seed: int = 0) -> list:
    """`batch` Unified-SFT examples cycling through `tasks`, each with about `text_tokens` of text."""
    gen = torch.Generator().manual_seed(seed)
    side = adapter.image_size
    tok = adapter.tokenizer
    half = text_tokens // 2

    def image() -> torch.Tensor:
        return torch.rand(3, side, side, generator=gen)

    def make(task: str) -> Example:
        if task == "chat":
            return Example("chat", [Segment("text", "user", text_of_tokens(tok, half)),
                                    Segment("text", "character", text_of_tokens(tok, text_tokens - half), train=True)])
        if task == "t2i":
            return Example("t2i", [Segment("text", "user", text_of_tokens(tok, text_tokens)),
                                   Segment("image", "character", pixels=image(), generate=True, train=True)])
        if task == "vqa":
            return Example("vqa", [Segment("image", "user", pixels=image()),
                                   Segment("text", "user", text_of_tokens(tok, half)),
                                   Segment("text", "character", text_of_tokens(tok, text_tokens - half), train=True)])
        raise ValueError(f"unknown task {task!r}: use chat, t2i or vqa")

    return [make(tasks[i % len(tasks)]) for i in range(batch)]
