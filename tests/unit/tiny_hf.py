"""Tiny random-init transformers models saved as local directories, for testing the loaders of the reward
terms and the evaluation features without any download (CLIP + processor, BLIP-VQA + processor, DINOv2),
and a fake Hugging Face hub cache that makes a hub id look downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_dir(root: Path, image_size: int = 32) -> Path:
    """A CLIPModel + CLIPProcessor (character-level BPE vocabulary) in `root/clip`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = root / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def blip_dir(root: Path, image_size: int = 32) -> Path:
    """A BlipForQuestionAnswering + BlipProcessor (word-level BERT vocabulary) in `root/blip`."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = root / "blip"
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "red", "blue", "is", "it", "what",
             "colour", "?"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(0)
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def dinov2_dir(root: Path, image_size: int = 28) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    folder = root / "dino"
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=image_size, patch_size=14)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def fake_hub_cache(hub: Path, repo: str, source: Path | None = None, files: tuple[str, ...] = ()) -> Path:
    """Make `repo` look downloaded in the hub cache `hub` (the `models--org--name/snapshots/<rev>` layout):
    the files of `source`, or empty placeholders named `files`."""
    revision = "0" * 40
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    if source is not None:
        for path in source.iterdir():
            (snapshot / path.name).write_bytes(path.read_bytes())
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot
