"""Janus's tokenizer: a Hugging Face tokenizer plus the special ids its sequences need."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmrp.backbones.tokenizer import TextTokenizer
from cmrp.errors import WeightsError

__all__ = ["JANUS_TOKENS", "JanusTokenizer"]

# Janus's special tokens (names as in the released tokenizer) when the tokenizer does not name them
JANUS_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}


class JanusTokenizer:
    """A Hugging Face tokenizer plus the ids Janus needs (bos/eos/pad, image placeholder, begin/end of image)."""

    def __init__(self, hf: Any):
        self.hf = hf
        self.image_id, self.boi_id, self.eoi_id = (self._special(attr) for attr in JANUS_TOKENS)
        self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise WeightsError("the Janus tokenizer defines no bos/eos token; use the checkpoint's own tokenizer files")
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id

    def _special(self, attr: str) -> int:
        token = getattr(self.hf, attr, None) or JANUS_TOKENS[attr]
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or self.hf.convert_ids_to_tokens(tid) != token:
            raise WeightsError(f"the tokenizer has no Janus token {token!r} ({attr}); use the checkpoint's own "
                               "tokenizer files (tokenizer.json + tokenizer_config.json)")
        return int(tid)

    @classmethod
    def train_bpe(cls, corpus: Sequence[str], vocab_size: int) -> JanusTokenizer:
        """The byte-level BPE of tiny backbones (`tokenizer: train-bpe`) with Janus's image tokens added."""
        from transformers import PreTrainedTokenizerFast

        base = TextTokenizer.train_bpe(corpus, vocab_size=max(64, vocab_size - len(JANUS_TOKENS)))
        base.backend.add_special_tokens(list(JANUS_TOKENS.values()))
        hf = PreTrainedTokenizerFast(
            tokenizer_object=base.backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
            pad_token="<|endoftext|>", extra_special_tokens=dict(JANUS_TOKENS),
        )
        return cls(hf)

    @classmethod
    def load(cls, ref: str | Path) -> JanusTokenizer:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise WeightsError(
                f"cannot load the Janus tokenizer from {str(ref)!r} ({err}). Point `tokenizer` (or `weights`) at a "
                "folder with tokenizer.json + tokenizer_config.json, download the checkpoint into the Hugging Face "
                "cache (`hf download deepseek-community/Janus-Pro-1B`), or use `tokenizer: train-bpe` for a tiny card."
            ) from None
        return cls(hf)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

