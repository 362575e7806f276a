"""Retrieve, then generate: the path of RagService.Ask.

Both halves are interfaces, so Ask works the same with the retriever and the
generator in this process or behind remote gRPC services.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

from rag_grpc.config import LimitsConfig
from rag_grpc.deadlines import in_thread
from rag_grpc.documents import SearchResult, resolve_namespace
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import Filter
from rag_grpc.generate.base import (
    AskEvent,
    AskFinished,
    AskTimings,
    Citations,
    Delta,
    Finished,
    GenerationParams,
    Generator,
    Passage,
    Usage,
    validate_generation,
)
from rag_grpc.index.retriever import Retriever, SearchQuery
from rag_grpc.lru import BoundedLRU
from rag_grpc.telemetry import OFF, Recorder


class SearchBackend(Protocol):
    """Answers one search, in process or remotely."""

    async def search(self, query: SearchQuery) -> SearchResult:
        """The hits of one query."""
        ...


class LocalSearch:
    """SearchBackend over the in-process Retriever, run on worker threads."""

    def __init__(self, retriever: Retriever, executor: Executor | None) -> None:
        self.retriever = retriever
        self.executor = executor

    async def search(self, query: SearchQuery) -> SearchResult:
        return await in_thread(self.executor, self.retriever.search, query)


@dataclass(frozen=True)
class CachedAnswer:
    """A finished answer, replayed for the same question over the same passages."""

    text: str
    finished: Finished
    cited: tuple[int, ...]


class AnswerCache(BoundedLRU[tuple[Any, ...], CachedAnswer]):
    """Answers by (question, parameters, namespace, passages, index generation).

    The key holds the generation the retrieval read, so any write to the
    namespace makes every older entry unreachable: the next Ask after a
    write generates afresh (read-your-writes). Sampled answers (temperature
    above 0) are not cached.
    """

    def __init__(self, entries: int, max_bytes: int = 32 * 1024 * 1024) -> None:
        super().__init__(entries, max_bytes, _answer_bytes)

    @staticmethod
    def key(
        question: str, namespace: str, params: GenerationParams, result: SearchResult
    ) -> tuple[Any, ...]:
        passages = tuple((h.chunk_id, round(h.score, 6)) for h in result.hits)
        return (question, namespace, params, passages, result.index_generation)

    def drop_namespace(self, namespace: str) -> None:
        """Forget every answer from a namespace (after documents in it were forgotten)."""
        self.drop(lambda key: key[1] == namespace)


def _answer_bytes(key: tuple[Any, ...], answer: CachedAnswer) -> int:
    # The question, the answer and the key's chunk ids, roughly.
    return 256 + len(str(key[0])) + len(repr(answer)) + 64 * len(key[3])


class RagPipeline:
    """Ask = search for passages, stream them as citations, then stream the answer."""

    def __init__(
        self,
        search: SearchBackend,
        generator: Generator,
        limits: LimitsConfig,
        answers: AnswerCache | None = None,
        answer_cache_on: Callable[[str], bool] | None = None,
        telemetry: Recorder = OFF,
    ) -> None:
        self.search = search
        self.generator = generator
        self.limits = limits
        self.answers = answers
        # Spans, token counts, answer cache outcomes and the first-token
        # latency go here (the server's Telemetry, or OFF).
        self.telemetry = telemetry
        # Whether a (stored) namespace uses the answer cache now (the
        # answer_cache feature flag); None: always.
        self.answer_cache_on = answer_cache_on

    async def ask(
        self,
        question: str,
        *,
        namespace: str = "",
        filter: Filter | None = None,
        k: int = 0,
        params: GenerationParams | None = None,
    ) -> AsyncIterator[AskEvent]:
        """Citations, then answer deltas, then AskFinished with usage and timings."""
        params = params or GenerationParams()
        validate_generation(question, params)
        k = k or self.limits.default_ask_k
        if not 1 <= k <= self.limits.max_ask_k:
            raise InvalidArgument(f"k must be between 1 and {self.limits.max_ask_k}, got {k}")
        started = time.perf_counter()
        with self.telemetry.span("retrieve", k=k):
            # k distinct documents, each by its best chunk: k chunks of one
            # long document would crowd every other source out of the context.
            result = await self.search.search(
                SearchQuery(
                    namespace=namespace, text=question, k=k, filter=filter, by_document=True
                )
            )
        retrieved = time.perf_counter()
        yield Citations(result.hits)
        passages: Sequence[Passage] = [
            Passage(h.document_id, h.chunk_id, h.text, h.score) for h in result.hits
        ]
        first_token: float | None = None
        finished: Finished | None = None
        cache = self.answers if self.answers is not None and not params.temperature else None
        if cache is not None and self.answer_cache_on is not None:
            cache = cache if self.answer_cache_on(namespace) else None
        # Keyed by the namespace's real name ("" is "default"), which is what
        # a forget drops.
        name = resolve_namespace(namespace)
        key = AnswerCache.key(question, name, params, result) if cache else ()
        cached = cache.get(key) if cache is not None and passages else None
        if cached is not None:
            first_token = time.perf_counter()
            yield Delta(cached.text)
            finished = cached.finished
            self.telemetry.record("answers", 1, outcome="hit")
        elif passages:
            span = self.telemetry.start_current("generate", generator=self.generator.name)
            pieces: list[str] = []
            try:
                async for event in self.generator.generate(question, passages, params):
                    if isinstance(event, Delta):
                        if first_token is None:
                            first_token = time.perf_counter()
                        pieces.append(event.text)
                        yield event
                    else:
                        finished = event
                        self.telemetry.usage(
                            event.usage.prompt_tokens,
                            event.usage.completion_tokens,
                            event.generator,
                        )
            finally:
                span.end()
            if cache is not None and finished is not None and finished.finish_reason != "error":
                cache.put(key, CachedAnswer("".join(pieces), finished, finished.cited_passages))
                self.telemetry.record("answers", 1, outcome="miss")
        else:
            answer = "No passages in this namespace match the question."
            first_token = time.perf_counter()
            yield Delta(answer)
            finished = Finished(Usage(), self.generator.name, "no_answer")
        done = time.perf_counter()
        assert finished is not None, "a generator must end with Finished"
        # What the caller waits for, retrieval included: the Ask latency SLO.
        self.telemetry.record("ask_first_token", ((first_token or done) - started) * 1000)
        timings = AskTimings(
            embed_ms=result.timings.embed_ms,
            retrieve_ms=(retrieved - started) * 1000,
            generate_ms=(done - retrieved) * 1000,
            first_token_ms=((first_token or done) - retrieved) * 1000,
            total_ms=(done - started) * 1000,
        )
        yield AskFinished(finished, timings, finished.cited_passages, cached=cached is not None)
