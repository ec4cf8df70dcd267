"""A tiny CLIP-style image/text dual encoder for the sandbox world, trained by the project.

Trained contrastively (symmetric InfoNCE, learned temperature) on (render, `describe(attrs)`) pairs of
uniformly random attribute combinations, so the rewards' `clip_similarity` and evaluation's CLIP-I /
CLIP-T mean something in the sandbox without downloaded weights. Image tower: the sandbox ConvTrunk;
text tower: word embeddings + positions into a bidirectional GRU (word order matters: the body's colour
comes before the accessory's). The vocabulary is every word the sandbox's captions use; other words
map to <unk>.

Shipped weights: `cmrp/sandbox/assets/clip.safetensors` + `clip.json` (manifest with architecture,
vocabulary, seed, training settings, held-out retrieval accuracy, commit). Retrain with
`cmrp sandbox train-features --out DIR`.
"""

from __future__ import annotations

import functools
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrp.errors import WeightsError
from cmrp.sandbox.nets import (
    IMAGE_SIZE,
    ConvTrunk,
    git_commit,
    load_asset,
    random_attrs,
    render_batch,
    save_asset,
    to_input,
    train_on_renders,
)
from cmrp.sandbox.probe import load_probe
from cmrp.sandbox.renderer import ATTRIBUTE_VALUES
from cmrp.sandbox.templates import describe

__all__ = ["SandboxClip", "caption_vocab", "evaluate_clip", "load_sandbox_clip", "tokenize", "train_clip"]

NAME = "clip"
PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+|\d+")


def caption_vocab() -> list[str]:
    """Every word `describe` can say (sorted), after <pad> and <unk>."""
    words: set[str] = set()
    base = {k: v[0] for k, v in ATTRIBUTE_VALUES.items()}
    for key, values in ATTRIBUTE_VALUES.items():
        for value in values:
            for accessory in ATTRIBUTE_VALUES["accessory"]:
                attrs = {**base, key: value, "accessory": accessory if key != "accessory" else value}
                for text in (describe(attrs), describe(attrs, identity_only=True)):
                    words.update(_WORD.findall(text.lower()))
    return [PAD, UNK, *sorted(words)]


def tokenize(texts: Sequence[str], vocab: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, max_len] padded with 0, lengths [B] >= 1)."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    lengths = torch.ones(len(texts), dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [index.get(w, 1) for w in _WORD.findall(str(text).lower())][:max_len] or [1]
        ids[i, :len(tokens)] = torch.tensor(tokens)
        lengths[i] = len(tokens)
    return ids, lengths


class SandboxClip(nn.Module):
    """`encode_image(images [B,3,H,W] in [0,1]) -> [B, dim]`, `encode_text(list[str]) -> [B, dim]`,
    both L2-normalised; the cosine is the match score."""

    def __init__(self, vocab: Sequence[str] | None = None, dim: int = 64, channels: Sequence[int] = (16, 32, 64, 64),
                 width: int = 64, max_len: int = 32, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.vocab = list(vocab or caption_vocab())
        self.dim, self.channels, self.width, self.max_len, self.image_size = dim, tuple(channels), width, max_len, image_size
        self.image = ConvTrunk(self.channels, 128)
        self.image_proj = nn.Linear(128, dim)
        self.embed = nn.Embedding(len(self.vocab), width, padding_idx=0)
        self.position = nn.Embedding(max_len, width)
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.text_proj = nn.Linear(2 * width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = to_input(images.to(self.device), self.image_size)
        return nn.functional.normalize(self.image_proj(torch.relu(self.image(x))), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        ids, lengths = tokenize(list(texts), self.vocab, self.max_len)
        ids = ids.to(self.device)
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=self.device))[None]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # [2, B, width]
        return nn.functional.normalize(self.text_proj(torch.cat([h[0], h[1]], dim=-1)), dim=-1)

    def architecture(self) -> dict[str, Any]:
        return {"kind": "SandboxClip", "dim": self.dim, "image": {"trunk": "ConvTrunk", "channels": list(self.channels),
                "image_size": self.image_size}, "text": {"embedding": self.width, "gru": "1 layer, bidirectional",
                "max_len": self.max_len, "vocab_size": len(self.vocab)}}


def _contrastive(model: SandboxClip, images: torch.Tensor, texts: list[str], hard: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; each image also has to beat `hard` (per image, its caption with one
    attribute changed), so fine details (expression, eyes, accessory colour) are not left to chance."""
    img, txt = model.encode_image(images), model.encode_text(texts + hard)
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    b = len(texts)
    logits = scale * img @ txt[:b].T
    labels = torch.arange(b)
    # identical captions in one batch are positives of each other: mask them out of the negatives
    same = torch.tensor([[x == y for y in texts] for x in texts]) & ~torch.eye(b, dtype=torch.bool)
    logits = logits.masked_fill(same, -1e4)
    hard_logits = scale * (img * txt[b:]).sum(-1, keepdim=True)
    image_to_text = nn.functional.cross_entropy(torch.cat([logits, hard_logits], dim=1), labels)
    return (image_to_text + nn.functional.cross_entropy(logits.T, labels)) / 2


def changeable(attrs: dict[str, str]) -> list[str]:
    """The attributes whose change alters the caption (not the accessory colour without an accessory)."""
    return [k for k in ATTRIBUTE_VALUES if not (k == "accessory_color" and attrs["accessory"] == "none")]


def _one_changed(attrs: dict[str, str], key: str, rng: random.Random) -> dict[str, str]:
    changed = dict(attrs)
    changed[key] = rng.choice([v for v in ATTRIBUTE_VALUES[key] if v != attrs[key]])
    return changed


@torch.no_grad()
def evaluate_clip(model: SandboxClip, n: int = 1024, candidates: int = 64, seed: int = 12345) -> dict[str, Any]:
    """On fresh renders: text->image and image->text top-1 retrieval among `candidates`, mean cosine of
    matched and mismatched pairs, and per attribute how often the true caption beats the same caption
    with only that attribute changed (skipped for accessory colour without an accessory)."""
    model.eval()
    rng = random.Random(f"cmrp-clip-eval:{seed}")
    t2i = i2t = 0
    matched: list[float] = []
    mismatched: list[float] = []
    beats: dict[str, list[int]] = {k: [] for k in ATTRIBUTE_VALUES}
    groups = max(1, n // candidates)
    for _ in range(groups):
        attrs = [random_attrs(rng) for _ in range(candidates)]
        img = model.encode_image(render_batch(attrs, model.image_size))
        txt = model.encode_text([describe(a) for a in attrs])
        sims = txt @ img.T
        labels = torch.arange(candidates)
        t2i += int((sims.argmax(dim=1) == labels).sum())
        i2t += int((sims.argmax(dim=0) == labels).sum())
        matched += sims.diag().tolist()
        mismatched += sims[~torch.eye(candidates, dtype=torch.bool)].tolist()
        for key in ATTRIBUTE_VALUES:
            rows = [i for i, a in enumerate(attrs) if not (key == "accessory_color" and a["accessory"] == "none")]
            if not rows:
                continue
            other = model.encode_text([describe(_one_changed(attrs[i], key, rng)) for i in rows])
            true = sims.diag()[rows]
            beats[key] += (true > (other * img[rows]).sum(-1)).int().tolist()
    total = groups * candidates
    return {
        "n": total, "candidates": candidates,
        "text_to_image_top1": t2i / total, "image_to_text_top1": i2t / total,
        "matched_cosine_mean": sum(matched) / len(matched), "mismatched_cosine_mean": sum(mismatched) / len(mismatched),
        "true_caption_beats_one_attribute_changed": {k: sum(v) / len(v) for k, v in beats.items() if v},
    }


def train_clip(out_dir: Path | str | None = None, *, seed: int = 0, steps: int = 700, batch_size: int = 128,
               lr: float = 3e-3, pool_size: int = 40000, eval_n: int = 1024, time_budget_s: float | None = None,
               image_init: Path | str | None = "shipped", trunk_lr_factor: float = 0.2,
               log: Callable[[str], None] | None = print) -> tuple[SandboxClip, dict[str, Any]]:
    """Contrastive training on (render, describe(attrs)) pairs of random combinations drawn from `seed`;
    half of each batch's images perturbed as for the probe. `image_init`: start the image tower from an
    attribute probe's trunk (`"shipped"`, a folder from `train-probe`, or None for random init), trained at
    `trunk_lr_factor` x `lr` — the probe already sees small details (expression, eyes) that a few minutes of
    contrastive training alone learns poorly. With `out_dir`, writes clip.safetensors + clip.json."""
    torch.manual_seed(seed)
    rng, gen = random.Random(f"cmrp-clip-train:{seed}"), torch.Generator().manual_seed(seed)
    model = SandboxClip()
    init: dict[str, Any] = {"image_tower": "random"}
    if image_init is not None:  # start the image tower from the attribute probe's trunk (same architecture)

        probe = load_probe(None if image_init == "shipped" else image_init)
        if tuple(probe.channels) != model.channels or probe.dim != 128:
            raise WeightsError(f"image_init {image_init!r}: the probe's trunk {probe.channels}/{probe.dim} does not "
                               f"match the CLIP image tower {model.channels}/128")
        model.image.load_state_dict(probe.trunk.state_dict())
        init = {"image_tower": f"attribute probe trunk ({image_init})",
                "probe_commit": getattr(probe, "manifest", {}).get("git_commit"), "trunk_lr_factor": trunk_lr_factor}
    trunk = set(map(id, model.image.parameters()))
    groups = [{"params": [p for p in model.parameters() if id(p) not in trunk], "lr": lr},
              {"params": list(model.image.parameters()), "lr": lr * (trunk_lr_factor if image_init else 1.0)}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                pct_start=0.15)
    t0 = time.perf_counter()
    losses, done = train_on_renders(model, lambda attrs, images: _contrastive(model, images, [describe(a) for a in attrs],
                                           [describe(_one_changed(a, rng.choice(changeable(a)), rng)) for a in attrs]),
                                    opt, sched, rng, gen, steps=steps, batch_size=batch_size,
                                    pool_size=pool_size, label="clip", time_budget_s=time_budget_s, log=log)
    pool_size = max(1, min(pool_size, steps * batch_size))  # what train_on_renders rendered
    manifest = {
        "name": "cmrp sandbox CLIP-style dual encoder",
        "architecture": model.architecture(),
        "vocab": model.vocab,
        "seed": seed,
        "init": init,
        "training": {"steps": done, "batch_size": batch_size, "lr": lr, "pool_size": pool_size, "optimizer": "AdamW(wd=1e-4), one-cycle",
                     "loss": "symmetric InfoNCE, learned temperature; per image one hard negative caption (one attribute changed)",
                     "data": "a pool of uniform random attribute combinations rendered at 32 px (sampled with replacement) with describe(attrs); half "
                     "of each batch's images perturbed (blur, Gaussian noise, brightness/contrast)",
                     "first_loss": losses[0] if losses else None, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                     "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__},
        "heldout": evaluate_clip(model, eval_n, seed=seed + 1) if eval_n else {},
        "git_commit": git_commit(),
    }
    if out_dir is not None:
        save_asset(model, manifest, Path(out_dir), NAME)
    return model, manifest


@functools.lru_cache(maxsize=4)
def _cached(path: str | None) -> SandboxClip:
    state, manifest = load_asset(path, NAME)
    try:
        arch = manifest["architecture"]
        model = SandboxClip(manifest["vocab"], arch["dim"], arch["image"]["channels"], arch["text"]["embedding"],
                            arch["text"]["max_len"], arch["image"]["image_size"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise WeightsError(f"{path or 'the shipped sandbox CLIP'}: weights do not match their manifest "
                           f"({type(err).__name__}: {str(err)[:200]}); retrain with "
                           "`cmrp sandbox train-features --out DIR`") from None
    model.manifest = manifest  # type: ignore[attr-defined]
    return model.eval().requires_grad_(False)


def load_sandbox_clip(path: Path | str | None = None) -> SandboxClip:
    """The dual encoder in `path` (a folder with clip.safetensors + clip.json), or the shipped one; cached."""
    return _cached(str(Path(path).expanduser().resolve()) if path is not None else None)
