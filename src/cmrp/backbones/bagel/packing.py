"""Turn model-agnostic `Example`s into a padded `BagelBatch`, the way the official BAGEL packer does.

A sequence is a list of splits, each with an attention mode (BAGEL's three):
- `causal`: text — a token sees everything before it;
- `full`: an understood image (ViT tokens) or an input image's clean VAE latents — sees all before, and its
  whole split;
- `noise`: an image being generated (noisy latents) — like `full`, but no other split may see it.
A text segment is `[bos] text [eos]` whatever its role (BAGEL has no role headers: persona, turns and
replies are plain text segments, in order). Every token of an image split shares one rope position; text
advances it by one per token, an understood image or clean latents by one, a generated (noisy) image not
at all (the official packer: what follows continues at the image's position). An input image in a context
whose output is an image is given twice, as clean VAE latents and then as ViT tokens (the official
`update_context_image`); when the output is text, as ViT tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cmrp.backbones.bagel.model import BagelBatch
from cmrp.backbones.images import ImageLoader  # noqa: F401 - re-exported: the loader BAGEL's collate is given
from cmrp.backbones.tokenizer import TextTokenizer
from cmrp.data.tasks import Example

__all__ = ["ImageLoader", "SequenceBuilder", "attention_mask_from_splits", "collate"]

IGNORE = -100


@dataclass
class SequenceBuilder:
    """Accumulates one sample's tokens, splits, positions and labels."""

    ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)  # token is a target (predicted from the previous one)
    kinds: list[str] = field(default_factory=list)  # text | vit | vae
    positions: list[int] = field(default_factory=list)
    splits: list[tuple[int, str]] = field(default_factory=list)
    vit_images: list[torch.Tensor] = field(default_factory=list)
    vae_images: list[torch.Tensor] = field(default_factory=list)
    vae_noisy: list[bool] = field(default_factory=list)  # per VAE image: generated (noisy, loss) or clean input
    next_pos: int = 0
    # (tokens, next position) of the context as it was before its last text segment, or the whole context when
    # an image follows that segment: the text-free branch of classifier-free guidance (official inferencer)
    text_free: tuple[int, int] = (0, 0)

    def add_text(self, ids: list[int], train_from: int | None) -> None:
        """Add text tokens; tokens at index >= train_from are targets (None: none are)."""
        self.text_free = (len(self.ids), self.next_pos)
        for i, tok in enumerate(ids):
            self.ids.append(tok)
            self.trained.append(train_from is not None and i >= train_from)
            self.kinds.append("text")
            self.positions.append(self.next_pos)
            self.next_pos += 1
        self.splits.append((len(ids), "causal"))

    def add_image(self, n_tokens: int, kind: str, markers: tuple[int, int], pad_id: int, noisy: bool = False) -> None:
        """An image split: start marker, n image slots (`vit` or `vae` tokens), end marker, at one rope
        position; the position advances after it unless it is a generated (noisy) image."""
        start, end = markers
        self.ids += [start] + [pad_id] * n_tokens + [end]
        self.trained += [False] * (n_tokens + 2)
        self.kinds += ["text"] + [kind] * n_tokens + ["text"]
        self.positions += [self.next_pos] * (n_tokens + 2)
        self.splits.append((n_tokens + 2, "noise" if noisy else "full"))
        if not noisy:
            self.next_pos += 1
        self.text_free = (len(self.ids), self.next_pos)


def attention_mask_from_splits(splits: list[tuple[int, str]], total: int) -> torch.Tensor:
    """[total, total] bool mask for one sample (positions past the splits are padding)."""
    n = sum(length for length, _ in splits)
    split_id = torch.empty(n, dtype=torch.long)
    start = torch.empty(n, dtype=torch.long)
    causal = torch.empty(n, dtype=torch.bool)
    noise = torch.empty(n, dtype=torch.bool)
    offset = 0
    for i, (length, mode) in enumerate(splits):
        split_id[offset : offset + length] = i
        start[offset : offset + length] = offset
        causal[offset : offset + length] = mode == "causal"
        noise[offset : offset + length] = mode == "noise"
        offset += length
    idx = torch.arange(n)
    q, k = idx[:, None], idx[None, :]
    same = split_id[:, None] == split_id[None, :]
    before = k < start[:, None]
    within = same & (~causal[:, None] | (k <= q))
    allowed = (before | within) & ~(noise[None, :] & ~same)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n, :n] = allowed
    pad = torch.arange(n, total)
    mask[pad, pad] = True  # padding rows see themselves only, so attention stays finite
    return mask


def build_sequence(
    example: Example,
    tok: TextTokenizer,
    load_image,
    *,
    vit_tokens: int | Callable[[torch.Tensor], int],
    gen_tokens: int,
    max_text_tokens: int,
    load_vit_image=None,
    image_output: bool | None = None,
) -> SequenceBuilder:
    """One example as a token sequence. Understood images go through `load_vit_image` when given (e.g.
    aspect-preserving sizes), images to generate and VAE-encoded input images through `load_image` (one
    fixed size). `image_output`: whether the example's output is an image, so that its input images also
    enter as clean VAE latents (None: whether it holds an image to generate)."""
    if image_output is None:
        image_output = any(seg.kind == "image" and seg.generate for seg in example.segments)
    markers = (tok.start_of_image, tok.end_of_image)
    seq = SequenceBuilder()
    for seg in example.segments:
        if seg.kind == "text":
            ids = [tok.bos_id, *tok.encode(seg.text)[:max_text_tokens], tok.eos_id]
            seq.add_text(ids, train_from=1 if seg.train else None)
        elif seg.generate:
            seq.vae_images.append(load_image(seg))
            seq.vae_noisy.append(True)
            seq.add_image(gen_tokens, "vae", markers, tok.pad_id, noisy=True)
        else:
            if image_output:
                seq.vae_images.append(load_image(seg))
                seq.vae_noisy.append(False)
                seq.add_image(gen_tokens, "vae", markers, tok.pad_id)
            image = (load_vit_image or load_image)(seg)
            seq.vit_images.append(image)
            n = vit_tokens(image) if callable(vit_tokens) else vit_tokens
            seq.add_image(n, "vit", markers, tok.pad_id)
    return seq


def collate(
    examples: list[Example],
    tok: TextTokenizer,
    load_image,
    *,
    vit_tokens: int | Callable[[torch.Tensor], int],
    gen_tokens: int,
    max_text_tokens: int,
    load_vit_image=None,
    image_output: bool | None = None,
):
    """Pad examples into a `BagelBatch`. `vit_tokens`: ViT tokens per understood image, or a function
    of the loaded image (variable-size images: `Bagel.vit_token_count`); images of different sizes
    come as a list in `vit_pixels`. `load_vit_image`: the loader of understood images, if not `load_image`.
    `image_output`: see `build_sequence` (None: per example)."""
    seqs = [
        build_sequence(ex, tok, load_image, vit_tokens=vit_tokens, gen_tokens=gen_tokens,
                       max_text_tokens=max_text_tokens, load_vit_image=load_vit_image, image_output=image_output)
        for ex in examples
    ]
    b, length = len(seqs), max(len(s.ids) for s in seqs)
    input_ids = torch.full((b, length), tok.pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    is_gen = torch.zeros((b, length), dtype=torch.bool)
    is_vit = torch.zeros((b, length), dtype=torch.bool)
    valid = torch.zeros((b, length), dtype=torch.bool)
    masks = torch.zeros((b, length, length), dtype=torch.bool)
    vit_images, vae_images, vae_noisy = [], [], []
    for i, s in enumerate(seqs):
        n = len(s.ids)
        if n:
            input_ids[i, :n] = torch.tensor(s.ids)
            position_ids[i, :n] = torch.tensor(s.positions)
            is_gen[i, :n] = torch.tensor([k == "vae" for k in s.kinds])
            is_vit[i, :n] = torch.tensor([k == "vit" for k in s.kinds])
            trained = torch.tensor(s.trained[1:] + [False])
            nxt = torch.tensor(s.ids[1:] + [IGNORE])
            labels[i, :n] = torch.where(trained, nxt, torch.full_like(nxt, IGNORE))
        position_ids[i, n:] = s.next_pos
        valid[i, :n] = True
        masks[i] = attention_mask_from_splits(s.splits, length)
        vit_images += s.vit_images
        vae_images += s.vae_images
        vae_noisy += s.vae_noisy
    return BagelBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=masks,
        is_gen=is_gen,
        is_vit=is_vit,
        labels=labels,
        vit_pixels=_stack_or_list(vit_images),
        vae_pixels=torch.stack(vae_images) if vae_images else None,
        vae_noisy=torch.tensor(vae_noisy, dtype=torch.bool) if vae_images else None,
        valid=valid,
        text_free=torch.tensor([s.text_free for s in seqs], dtype=torch.long),
        task_ids=[ex.task for ex in examples],
    )


def _stack_or_list(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor] | None:
    if not images:
        return None
    if all(img.shape == images[0].shape for img in images):
        return torch.stack(images)
    return images
