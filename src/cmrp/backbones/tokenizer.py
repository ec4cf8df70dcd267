"""Text tokenizers for backbones: a real tokenizer.json, or a byte-level BPE trained locally.

Tiny backbones cannot download a tokenizer, so `train_bpe` builds one from a corpus in about a
second (byte-level: any text still encodes). Real checkpoints ship Hugging Face tokenizer files
(BAGEL-7B-MoT: the Qwen2 tokenizer's `tokenizer.json`, `vocab.json`, `merges.txt`,
`tokenizer_config.json`), loaded with `load`. Either way the chat/vision special tokens BAGEL uses are
present: `<|im_start|>` (bos), `<|im_end|>` (eos), `<|vision_start|>` / `<|vision_end|>` (image
markers) and `<|endoftext|>` (padding); Qwen2's vocabulary already has them, others get them added.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmrp.errors import WeightsError

__all__ = ["QWEN2_SPLIT", "SPECIAL_TOKENS", "BackendTokenizer", "TextTokenizer"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
# Qwen2's pre-tokenization pattern (its tokenizer.json and the official Qwen2Tokenizer split text this way)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


class BackendTokenizer:
    """What every wrapper over a `tokenizers.Tokenizer` shares: encode / decode without special tokens,
    the vocabulary size with added tokens, and saving as tokenizer.json. Subclasses set `_tok`."""

    _tok: Any

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / "tokenizer.json"
        self._tok.save(str(out))
        return out

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer` (e.g. to add an adapter's own special tokens)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class TextTokenizer(BackendTokenizer):
    """Thin wrapper over `tokenizers.Tokenizer` exposing the ids a backbone needs."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.pad_id = ids["<|endoftext|>"]
        self.bos_id = ids["<|im_start|>"]
        self.eos_id = ids["<|im_end|>"]
        self.start_of_image = ids["<|vision_start|>"]
        self.end_of_image = ids["<|vision_end|>"]

    @classmethod
    def train_bpe(cls, corpus: Iterable[str], vocab_size: int = 1024, pretokenizer: str = "bytelevel") -> TextTokenizer:
        """`pretokenizer`: `bytelevel` (GPT-2's split) or `qwen2` (NFC + Qwen2's split, as Qwen2's tokenizer
        files and the official Qwen2Tokenizer do: ids survive a round trip through vocab.json/merges.txt)."""
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        if pretokenizer == "qwen2":
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        elif pretokenizer == "bytelevel":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            raise ValueError(f"pretokenizer {pretokenizer!r}: use bytelevel or qwen2")
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(corpus), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """A `tokenizer.json` file, or a folder of Hugging Face tokenizer files: its `tokenizer.json`, or
        else `vocab.json` + `merges.txt` (+ `tokenizer_config.json`) read by transformers' AutoTokenizer
        from the local folder only (never remote code)."""
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file():
            return cls(Tokenizer.from_file(str(file)))
        if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_hf_folder(path)
        raise WeightsError(
            f"tokenizer file {file} not found: point the backbone card's `tokenizer` at a folder with "
            "tokenizer.json (or vocab.json + merges.txt), e.g. the checkpoint folder, or set it to "
            "`train-bpe` to build one locally."
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> TextTokenizer:
        """A Hugging Face (fast) tokenizer from a local folder, e.g. Qwen2's vocab.json + merges.txt."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            raise WeightsError(
                f"{path}: cannot load its Hugging Face tokenizer files ({err}); the folder needs tokenizer.json, "
                "or vocab.json + merges.txt + tokenizer_config.json as in the official checkpoint"
            ) from None
        backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if backend is None:
            raise WeightsError(f"{path}: {type(hf).__name__} is not a fast tokenizer; add its tokenizer.json")
        # vocab.json lists BAGEL's markers as ordinary tokens; make them special (kept ids, skipped in decode)
        backend.add_special_tokens([t for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None])
        return cls(backend)
