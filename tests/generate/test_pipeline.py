"""RagPipeline built directly over a Retriever (word embedder) and a scripted
generator: the order of an Ask's events, what reaches the generator, the
answer cache and its invalidation by writes, and the checks on a question."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from rag_grpc.config import LimitsConfig
from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import Equals
from rag_grpc.generate.base import (
    AskEvent,
    AskFinished,
    Citations,
    Delta,
    Finished,
    GenerationEvent,
    GenerationParams,
    Passage,
    Usage,
)
from rag_grpc.generate.pipeline import AnswerCache, LocalSearch, RagPipeline
from rag_grpc.index.retriever import Retriever
from tests.conftest import CORPUS, ask_answer, ask_citations, ask_summary
from tests.in_process import open_retriever


class QuotingGenerator:
    """Answers with the first passage's document id, in two deltas, citing [1];
    records what it was asked."""

    name = "quoting"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Passage], GenerationParams]] = []

    async def generate(
        self, prompt: str, passages: Sequence[Passage], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        self.calls.append((prompt, list(passages), params))
        yield Delta("See ")
        yield Delta(f"{passages[0].document_id} [1].")
        yield Finished(Usage(len(prompt.split()), 3), self.name, "stop", (1,))


@pytest.fixture
def retriever(tmp_path: Path) -> Retriever:
    r = open_retriever(tmp_path / "data")
    r.upsert("", CORPUS)
    return r


@pytest.fixture
def generator() -> QuotingGenerator:
    return QuotingGenerator()


def pipeline(
    retriever: Retriever, generator: QuotingGenerator, cache: AnswerCache | None = None
) -> RagPipeline:
    return RagPipeline(LocalSearch(retriever, None), generator, LimitsConfig(), answers=cache)


def ask(pipe: RagPipeline, question: str, **options: object) -> list[AskEvent]:
    async def collect() -> list[AskEvent]:
        return [e async for e in pipe.ask(question, **options)]  # type: ignore[arg-type]

    return asyncio.run(collect())


def test_an_ask_streams_citations_then_deltas_then_its_summary(
    retriever: Retriever, generator: QuotingGenerator
) -> None:
    events = ask(pipeline(retriever, generator), "volcanic lava eruptions", k=2)
    assert isinstance(events[0], Citations)
    assert all(isinstance(e, Delta) for e in events[1:-1]) and len(events) == 4
    assert ask_answer(events) == "See volcano [1]."
    summary = ask_summary(events)
    assert (summary.generator, summary.finish_reason, summary.cited) == ("quoting", "stop", (1,))
    assert summary.usage == Usage(3, 3) and not summary.cached
    timings = summary.timings
    assert 0 <= timings.first_token_ms <= timings.generate_ms
    assert timings.retrieve_ms + timings.generate_ms <= timings.total_ms + 1e-6


def test_the_generator_gets_the_cited_passages_one_per_document(
    retriever: Retriever, generator: QuotingGenerator
) -> None:
    events = ask(pipeline(retriever, generator), "chess pieces and the king", k=3)
    citations = ask_citations(events)
    ((prompt, passages, _),) = generator.calls
    assert prompt == "chess pieces and the king"
    assert len(passages) == len(citations) == 3
    assert [p.chunk_id for p in passages] == [h.chunk_id for h in citations]
    assert passages[0].document_id == "chess"
    assert len({p.document_id for p in passages}) == 3
    assert passages[0].text == CORPUS[2].text


def test_a_filter_limits_the_passages(retriever: Retriever, generator: QuotingGenerator) -> None:
    events = ask(
        pipeline(retriever, generator), "volcano", k=5, filter=Equals("topic", "computing")
    )
    assert [h.document_id for h in ask_citations(events)] == ["gil"]


def test_nothing_to_cite_answers_without_the_generator(
    tmp_path: Path, generator: QuotingGenerator
) -> None:
    empty = open_retriever(tmp_path / "empty")
    events = ask(pipeline(empty, generator), "anything at all?")
    assert ask_citations(events) == []
    assert "No passages" in ask_answer(events)
    assert ask_summary(events).finish_reason == "no_answer"
    assert generator.calls == []


def test_the_same_question_is_answered_from_the_cache_until_a_write(
    retriever: Retriever, generator: QuotingGenerator
) -> None:
    pipe = pipeline(retriever, generator, AnswerCache(16))
    first = ask(pipe, "espresso crema", k=2)
    second = ask(pipe, "espresso crema", k=2)
    assert len(generator.calls) == 1
    assert ask_summary(second).cached and not ask_summary(first).cached
    assert ask_answer(second) == ask_answer(first)
    assert ask_summary(second).finished == ask_summary(first).finished
    # Another question, or other parameters, is another entry.
    ask(pipe, "espresso crema", k=3)
    assert len(generator.calls) == 2
    # Any write to the namespace makes older answers unreachable.
    retriever.upsert("", [Document("new", "an unrelated note")])
    third = ask(pipe, "espresso crema", k=2)
    assert len(generator.calls) == 3 and not ask_summary(third).cached


def test_sampled_answers_are_never_cached(
    retriever: Retriever, generator: QuotingGenerator
) -> None:
    pipe = pipeline(retriever, generator, AnswerCache(16))
    sampled = GenerationParams(temperature=0.7)
    ask(pipe, "espresso", params=sampled)
    events = ask(pipe, "espresso", params=sampled)
    assert len(generator.calls) == 2 and not ask_summary(events).cached


def test_the_answer_cache_flag_is_asked_per_namespace(
    retriever: Retriever, generator: QuotingGenerator
) -> None:
    asked: list[str] = []

    def enabled(namespace: str) -> bool:
        asked.append(namespace)
        return False

    pipe = RagPipeline(
        LocalSearch(retriever, None),
        generator,
        LimitsConfig(),
        answers=AnswerCache(16),
        answer_cache_on=enabled,
    )
    ask(pipe, "espresso")
    ask(pipe, "espresso")
    assert len(generator.calls) == 2 and asked == ["", ""]


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("", {}),
        ("   ", {}),
        ("x" * (16 * 1024 + 1), {}),
        ("espresso", {"k": -1}),
        ("espresso", {"k": LimitsConfig().max_ask_k + 1}),
        ("espresso", {"params": GenerationParams(temperature=2.5)}),
        ("espresso", {"params": GenerationParams(top_p=1.5)}),
        ("espresso", {"params": GenerationParams(max_tokens=4097)}),
        ("espresso", {"params": GenerationParams(stop=("x",) * 9)}),
        ("espresso", {"namespace": "bad/name"}),
    ],
    ids=[
        "empty",
        "blank",
        "too-long",
        "k-negative",
        "k-over-max",
        "temperature",
        "top_p",
        "max_tokens",
        "stops",
        "namespace",
    ],
)
def test_a_malformed_ask_is_invalid_before_any_work(
    retriever: Retriever,
    generator: QuotingGenerator,
    question: str,
    options: dict[str, object],
) -> None:
    with pytest.raises(InvalidArgument):
        ask(pipeline(retriever, generator), question, **options)
    assert generator.calls == []


def test_the_cache_is_dropped_with_a_forgotten_namespace(
    retriever: Retriever, generator: QuotingGenerator
) -> None:
    cache = AnswerCache(16)
    pipe = pipeline(retriever, generator, cache)
    ask(pipe, "espresso")
    cache.drop_namespace("default")
    events = ask(pipe, "espresso")
    assert len(generator.calls) == 2 and not ask_summary(events).cached
    assert isinstance(events[-1], AskFinished)
