"""Show-o's text tokenizer: Phi-1.5's (a local `tokenizer.json`), or a byte-level BPE trained locally
for tiny cards. `<|sot|>` / `<|eot|>` are the tokenizer's begin / end of text (`<|endoftext|>` for
Phi); Show-o's own special tokens live at fixed ids after the text vocabulary (`ShowoVocab`), so they
are never added to the tokenizer itself."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cmrp.backbones.tokenizer import BackendTokenizer, TextTokenizer
from cmrp.errors import WeightsError

__all__ = ["ShowoText"]


class ShowoText(BackendTokenizer):
    def __init__(self, tokenizer):
        self._tok = tokenizer
        start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
        if start is not None and end is not None:  # a locally trained BPE
            self.sot, self.eot = start, end
        else:
            eos = tokenizer.token_to_id("<|endoftext|>")
            if eos is None:
                raise WeightsError("the text tokenizer has no <|endoftext|> token; Show-o needs Phi-1.5's tokenizer "
                                   "(microsoft/phi-1_5 tokenizer.json)")
            self.sot = self.eot = eos

    @classmethod
    def train_bpe(cls, corpus: Iterable[str], vocab_size: int) -> ShowoText:
        return cls(TextTokenizer.train_bpe(corpus, vocab_size=vocab_size).backend)

    @classmethod
    def load(cls, path: str | Path) -> ShowoText:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise WeightsError(
                f"text tokenizer {file} not found: Show-o uses Phi-1.5's tokenizer. Point the backbone card's "
                "`tokenizer` at a local folder holding its tokenizer.json (e.g. `hf download "
                "microsoft/phi-1_5 tokenizer.json --local-dir phi-1_5`), or use `train-bpe` for a tiny card."
            )
        return cls(Tokenizer.from_file(str(file)))
