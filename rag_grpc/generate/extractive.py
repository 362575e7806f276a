"""The extractive generator: the answer is the context sentences closest in
meaning to the question, each followed by its citation. It invents nothing,
needs no GPU, and says in every response that it is extractive."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor

import numpy as np

from rag_grpc.deadlines import in_thread
from rag_grpc.embed.encoder import Embedder, OnnxEncoder
from rag_grpc.generate.base import (
    Delta,
    Finished,
    GenerationEvent,
    GenerationParams,
    Passage,
    Usage,
    require_context,
    validate_generation,
)
from rag_grpc.generate.markup import clean_markup, is_markup_only

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_MIN_SENTENCE_CHARS = 12
# Sentences ranked per request at most (a few batches of the embedder).
MAX_CANDIDATES = 512


def answer_sentences(text: str) -> list[str]:
    """The sentences of a passage the answer may quote: markup cleaned from them
    (see generate/markup.py), too-short and markup-only ones left out. The
    passage itself is not changed; citations show it as stored."""
    sentences = []
    for sentence in _SENTENCE_END.split(clean_markup(text)):
        sentence = " ".join(sentence.split())
        if len(sentence) >= _MIN_SENTENCE_CHARS and not is_markup_only(sentence):
            sentences.append(sentence)
    return sentences


class ExtractiveGenerator:
    """Ranks context sentences by cosine similarity to the question."""

    name = "extractive"

    def __init__(
        self,
        encoder: OnnxEncoder,
        executor: Executor | None,
        *,
        embedder: Embedder | None = None,
        sentences: int = 3,
        default_max_tokens: int = 256,
    ) -> None:
        self.encoder = encoder
        # Sentences are embedded through the server's batching embedder when
        # given, so they queue with every other embedding and its bound applies.
        self.embedder: Embedder = embedder or encoder
        self.executor = executor
        self.sentences = sentences
        self.default_max_tokens = default_max_tokens

    async def generate(
        self, prompt: str, passages: Sequence[Passage], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        validate_generation(prompt, params)
        require_context(passages, "the extractive generator answers only from context: ")
        chosen, prompt_tokens = await in_thread(self.executor, self._choose, prompt, passages)
        max_tokens = params.max_tokens or self.default_max_tokens
        produced = 0
        cited: list[int] = []
        finish = "stop" if chosen else "no_answer"
        for number, sentence in chosen:
            piece = f"{sentence} [{number}]"
            stop_at = min((piece.index(s) for s in params.stop if s and s in piece), default=None)
            if stop_at is not None:
                piece = piece[:stop_at].rstrip()
            tokens = self.encoder.count_tokens(piece)
            if produced + tokens > max_tokens:
                finish = "length"
                break
            text = piece if produced == 0 else " " + piece
            produced += tokens
            if f"[{number}]" in piece and number not in cited:
                cited.append(number)
            # Word-sized deltas, so clients see the stream the way an LLM sends it.
            for word in re.findall(r"\s*\S+", text):
                yield Delta(word)
            if stop_at is not None:
                break
        yield Finished(Usage(prompt_tokens, produced), self.name, finish, tuple(cited))

    def _choose(
        self, prompt: str, passages: Sequence[Passage]
    ) -> tuple[list[tuple[int, str]], int]:
        candidates: list[tuple[int, str]] = []
        seen: set[str] = set()
        for number, passage in enumerate(passages, start=1):
            for sentence in answer_sentences(passage.text):
                if sentence not in seen:
                    seen.add(sentence)
                    candidates.append((number, sentence))
        # The answer comes from the first sentences of a huge context; the
        # cap keeps one request's embedding work bounded.
        candidates = candidates[:MAX_CANDIDATES]
        prompt_tokens = self.encoder.count_tokens(prompt) + sum(
            self.encoder.count_tokens(p.text) for p in passages
        )
        if not candidates:
            return [], prompt_tokens
        vectors = self.embedder.embed([prompt] + [s for _, s in candidates]).vectors
        scores = vectors[1:] @ vectors[0]
        best = np.argsort(-scores, kind="stable")[: self.sentences]
        return [candidates[i] for i in best], prompt_tokens
