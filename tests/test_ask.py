"""RagService.Ask and GenerationService.Generate: streamed, cited, timed."""

from __future__ import annotations

import grpc
import pytest

from rag_grpc.client import RagClient
from rag_grpc.filters import Equals
from rag_grpc.generate.base import AskFinished, Citations, Delta, GenerationParams
from rag_grpc.pb import (
    common_pb2,
    generation_pb2,
    generation_service_pb2_grpc,
    rag_pb2,
    rag_service_pb2_grpc,
)


def test_ask_streams_citations_then_text_then_summary(seeded: RagClient) -> None:
    events = list(seeded.ask("What gas do plants release during photosynthesis?", k=3))
    citations, *middle, summary = events
    assert isinstance(citations, Citations) and len(citations.hits) == 3
    assert citations.hits[0].document_id == "photosynthesis"
    # On the wire each citation carries its number, 1, 2, 3 in order.
    stub = rag_service_pb2_grpc.RagServiceStub(seeded.channel)
    request = rag_pb2.AskRequest(question="What gas do plants release?", k=3)
    first = next(iter(stub.Ask(request, timeout=30)))
    assert [c.index for c in first.citations.citations] == [1, 2, 3]
    deltas = [e.text for e in middle if isinstance(e, Delta)]
    assert len(deltas) == len(middle) and len(deltas) > 3  # streamed in pieces
    answer = "".join(deltas)
    assert "oxygen" in answer
    assert isinstance(summary, AskFinished)
    assert summary.generator == "extractive"
    assert summary.finish_reason == "stop"
    assert 1 in summary.cited and "[1]" in answer
    for index in summary.cited:
        assert f"[{index}]" in answer
    assert summary.usage.completion_tokens > 0
    assert summary.usage.prompt_tokens > summary.usage.completion_tokens
    t = summary.timings
    assert t.total_ms >= t.retrieve_ms > 0 and t.generate_ms > 0
    assert t.total_ms >= t.first_token_ms


def test_ask_respects_filter_and_max_tokens(seeded: RagClient) -> None:
    events = list(seeded.ask("What is a volcano?", k=2, filter=Equals("topic", "games")))
    assert [h.document_id for h in events[0].hits] == ["chess"]  # type: ignore[union-attr]
    short = list(seeded.ask("What is a volcano?", params=GenerationParams(max_tokens=5)))
    summary = short[-1]
    assert isinstance(summary, AskFinished)
    assert summary.finish_reason == "length"
    assert summary.usage.completion_tokens <= 5


def test_ask_with_no_matching_passages_says_so(seeded: RagClient) -> None:
    events = list(seeded.ask("What is a volcano?", filter=Equals("topic", "astronomy")))
    assert events[0] == Citations([])
    summary = events[-1]
    assert isinstance(summary, AskFinished) and summary.finish_reason == "no_answer"
    assert "No passages" in "".join(e.text for e in events if isinstance(e, Delta))


def test_generate_streams_deltas_then_summary(server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(
            prompt="How many pieces does a chess player start with?",
            context=[
                common_pb2.ContextPassage(
                    document_id="chess",
                    chunk_id="chess#0",
                    text="Chess is a board game. Each player starts with sixteen pieces. "
                    "The goal is to checkmate the king.",
                ),
                common_pb2.ContextPassage(
                    document_id="tea", chunk_id="tea#0", text="Green tea is steeped briefly."
                ),
            ],
        )
        responses = list(stub.Generate(request, timeout=30))
        kinds = [r.WhichOneof("event") for r in responses]
        assert kinds[-1] == "summary" and set(kinds[:-1]) == {"delta"}
        answer = "".join(r.delta for r in responses[:-1])
        assert answer.split(" [")[0].strip() == "Each player starts with sixteen pieces."
        summary = responses[-1].summary
        assert summary.generator == "extractive" and summary.cited_passages[0] == 1
        assert summary.usage.total_tokens == (
            summary.usage.prompt_tokens + summary.usage.completion_tokens
        )

        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(generation_pb2.GenerateRequest(prompt="no context"), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context" in (info.value.details() or "")
        bad = generation_pb2.GenerateRequest(
            prompt="x",
            context=request.context,
            parameters=common_pb2.GenerationParameters(temperature=5),
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "temperature" in (info.value.details() or "")


def test_cancelling_ask_leaves_the_server_healthy(seeded: RagClient) -> None:
    from rag_grpc.pb import rag_pb2, rag_service_pb2_grpc

    stub = rag_service_pb2_grpc.RagServiceStub(seeded.channel)
    call = stub.Ask(rag_pb2.AskRequest(question="What is espresso?"), timeout=30)
    first = next(call)
    assert first.WhichOneof("event") == "citations"
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert seeded.search("espresso", k=1)[0].document_id == "espresso"
