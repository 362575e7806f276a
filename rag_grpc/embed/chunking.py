"""Token-aware chunking: windows of whole tokens with overlap, cut at token
offsets in the original text so no word is split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


@dataclass(frozen=True)
class TextSpan:
    """A chunk's text and its character span in the document."""

    text: str
    start: int
    end: int


class TokenChunker:
    """Splits text into chunks of at most ``chunk_tokens`` tokens, consecutive
    chunks sharing ``overlap_tokens`` tokens."""

    def __init__(self, tokenizer_file: Path, chunk_tokens: int, overlap_tokens: int) -> None:
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError("overlap_tokens must be in [0, chunk_tokens)")
        # A tokenizer of its own: the encoder's one truncates.
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens

    def split(self, text: str) -> list[TextSpan]:
        """Chunks of text, in order; a text of only whitespace gives none."""
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        if not offsets:
            return []
        spans = []
        step = self.chunk_tokens - self.overlap_tokens
        start = 0
        while True:
            end = min(start + self.chunk_tokens, len(offsets))
            char_start = offsets[start][0]
            # A chunk that ends the document keeps its trailing text (punctuation
            # the tokenizer dropped, closing whitespace trimmed).
            char_end = len(text) if end == len(offsets) else offsets[end - 1][1]
            spans.append(TextSpan(text[char_start:char_end].strip(), char_start, char_end))
            if end == len(offsets):
                return spans
            start += step
