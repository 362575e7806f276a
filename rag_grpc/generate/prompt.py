"""The prompt a generator model is sent: the configured template filled with
the question and the numbered passages ([1], [2], ...), cut to a token
budget, and the token counts that go with it. Used by TritonGenerator and by
bench/ask.py; independent of Triton."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rag_grpc.generate.base import Passage
from rag_grpc.lru import BoundedLRU


class PromptBuilder:
    """The prompt template filled with numbered passages cut to a token budget.

    Tokenising the passages is most of the cost of a prompt (~0.4 ms per
    1,000 characters here), and retrieved chunks repeat across questions, so
    each passage's encoding is kept in a small LRU cache; the prompt's token
    count is the sum of its parts' counts.
    """

    def __init__(
        self, tokenizer_path: Path, template: str, budget: int, cache_entries: int = 4096
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.template = template
        self.budget = budget
        # Keyed by the passage text; an encoding costs about 40 bytes a token.
        self._cache: BoundedLRU[str, Any] = BoundedLRU(
            cache_entries,
            cache_entries * 4096,
            lambda text, encoding: len(text) + 40 * len(encoding.ids),
        )

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _encodings(self, texts: list[str]) -> list[Any]:
        found = {text: self._cache.get(text) for text in dict.fromkeys(texts)}
        missing = [text for text, encoding in found.items() if encoding is None]
        if missing:
            for text, encoding in zip(
                missing,
                self.tokenizer.encode_batch(missing, add_special_tokens=False),
                strict=True,
            ):
                found[text] = encoding
                self._cache.put(text, encoding)
        return [found[text] for text in texts]

    def build(self, question: str, passages: Sequence[Passage]) -> tuple[str, int, int]:
        """(prompt, passages included, prompt tokens): whole passages while
        they fit, then the first part of the next one, cut at a token boundary."""
        left = self.budget
        lines: list[str] = []
        tokens = 0
        texts = [" ".join(p.text.split()) for p in passages]
        for number, (text, encoding) in enumerate(
            zip(texts, self._encodings(texts), strict=True), start=1
        ):
            if left <= 0:
                break
            used = len(encoding.ids)
            if used > left:
                text = text[: encoding.offsets[left - 1][1]]
                used = left
            left -= used
            tokens += used + self.count(f"[{number}]")
            lines.append(f"[{number}] {text}")
        frame = self.template.format(context="", question=question.strip())
        prompt = self.template.format(context="\n".join(lines), question=question.strip())
        return prompt, len(lines), tokens + self.count(frame)
