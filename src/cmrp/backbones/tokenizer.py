"""Text tokenizers for backbones: a real tokenizer.json, or a byte-level BPE trained locally.

Tiny backbones cannot download a tokenizer, so `train_bpe` builds one from a corpus in about a
second (byte-level: any text still encodes). Real checkpoints ship a `tokenizer.json`, loaded with
`load`. Either way the chat/vision special tokens BAGEL uses are present.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cmrp.errors import WeightsError

__all__ = ["SPECIAL_TOKENS", "TextTokenizer"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


class TextTokenizer:
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
    def train_bpe(cls, corpus: Iterable[str], vocab_size: int = 1024) -> TextTokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise WeightsError(
                f"tokenizer file {file} not found: point the backbone card's `tokenizer` at a folder with "
                "tokenizer.json (e.g. the checkpoint folder), or set it to `train-bpe` to build one locally."
            )
        return cls(Tokenizer.from_file(str(file)))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / "tokenizer.json"
        self._tok.save(str(out))
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
