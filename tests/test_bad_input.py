"""Bad input gets a clear status and message; the server stays up and the
stored data is unchanged."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.filters import AnyOf, Range
from rag_grpc.pb import (
    common_pb2,
    generation_pb2,
    generation_service_pb2_grpc,
    retrieval_pb2,
    retrieval_service_pb2_grpc,
)
from tests.conftest import CORPUS, ServerThread


def snapshot(client: RagClient) -> tuple[object, ...]:
    """What a client can see of the stored data."""
    stats = client.stats()
    docs, _ = client.get([d.id for d in CORPUS])
    return (
        tuple((n.name, n.documents, n.chunks, n.vectors, n.generation) for n in stats.namespaces),
        tuple(docs),
    )


@pytest.fixture
def unchanged(seeded: RagClient):  # type: ignore[no-untyped-def]
    """Asserts after the test that the data is exactly as seeded and the server answers."""
    before = snapshot(seeded)
    yield seeded
    assert snapshot(seeded) == before
    assert seeded.search("lava", k=1)[0].document_id == "volcano"


def expect(code: str, call: Callable[[], object], *words: str) -> str:
    with pytest.raises(RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)  # type: ignore[call-overload]
    assert info.value.code == code, info.value
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value.message


def test_empty_query(unchanged: RagClient) -> None:
    expect("INVALID_ARGUMENT", lambda: unchanged.search(""), "empty")
    expect("INVALID_ARGUMENT", lambda: unchanged.search("   "), "empty")


@pytest.mark.parametrize("k", [101, 100000])
def test_k_above_maximum(unchanged: RagClient, k: int) -> None:
    expect("INVALID_ARGUMENT", lambda: unchanged.search("lava", k=k), "between 1 and 100")


def test_k_zero_means_default_but_negative_is_impossible_on_the_wire(unchanged: RagClient) -> None:
    # k is uint32: zero asks for the default (10); the Ask limit is enforced too.
    assert len(unchanged.search("lava", k=0)) == len(CORPUS)
    expect("INVALID_ARGUMENT", lambda: unchanged.ask("lava?", k=51), "between 1 and 50")


def test_query_vector_of_wrong_dimension(unchanged: RagClient) -> None:
    expect("INVALID_ARGUMENT", lambda: unchanged.search([0.1] * 383), "383", "dimension 384")
    expect("INVALID_ARGUMENT", lambda: unchanged.search([float("nan")] * 384), "NaN")
    expect("INVALID_ARGUMENT", lambda: unchanged.search([0.0] * 384), "zero")


def test_unknown_namespace(unchanged: RagClient) -> None:
    message = expect("NOT_FOUND", lambda: unchanged.search("lava", namespace="nope"), "'nope'")
    # The error names what was asked for, never the other tenants' namespaces.
    assert "default" not in message
    assert unchanged.search("lava", namespace="default")  # always exists
    expect("NOT_FOUND", lambda: unchanged.ask("lava?", namespace="nope"), "'nope'")
    expect("NOT_FOUND", lambda: unchanged.get(["volcano"], namespace="nope"))
    expect("INVALID_ARGUMENT", lambda: unchanged.search("lava", namespace="bad name!"), "namespace")


def test_malformed_filters(unchanged: RagClient) -> None:
    stub = retrieval_service_pb2_grpc.RetrievalServiceStub(unchanged.channel)
    bad_filters = {
        "no clause": common_pb2.Filter(),
        "no match": common_pb2.Filter(field=common_pb2.FieldCondition(key="topic")),
        "empty all": common_pb2.Filter(all=common_pb2.FilterList()),
        "bad key": common_pb2.Filter(
            field=common_pb2.FieldCondition(
                key="bad key!", equals=common_pb2.MetadataValue(string_value="x")
            )
        ),
        "value kind unset": common_pb2.Filter(
            field=common_pb2.FieldCondition(key="topic", equals=common_pb2.MetadataValue())
        ),
    }
    for name, flt in bad_filters.items():
        request = retrieval_pb2.SearchRequest(text="lava", filter=flt)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        details = info.value.details() or ""
        assert "filter" in details or "metadata" in details, name
    expect("INVALID_ARGUMENT", lambda: unchanged.search("x", filter=Range("year")), "bound")
    expect(
        "INVALID_ARGUMENT",
        lambda: unchanged.search("x", filter=Range("year", gte=5, lte=1)),
        "empty",
    )
    expect("INVALID_ARGUMENT", lambda: unchanged.search("x", filter=AnyOf("topic", ())), "1 to")


def test_duplicate_ids_in_one_upsert(unchanged: RagClient) -> None:
    docs = [Document("new-1", "one"), Document("new-1", "two")]
    expect("INVALID_ARGUMENT", lambda: unchanged.upsert(docs), "'new-1'", "more than once")
    assert unchanged.get(["new-1"]) == ([], ["new-1"])


def test_bad_documents_store_nothing(unchanged: RagClient) -> None:
    good = Document("new-good", "A perfectly fine document.")
    cases = {
        "no text": Document("new-empty", "   "),
        "empty id": Document("", "text"),
        "bad metadata key": Document("new-meta", "text", {"bad key": 1}),
        "infinite number": Document("new-inf", "text", {"x": float("inf")}),
    }
    for name, bad in cases.items():
        with pytest.raises(RpcError) as info:
            unchanged.upsert([good, bad])
        assert info.value.code == "INVALID_ARGUMENT", name
    # All or nothing: the good document of each failed request was not stored.
    assert unchanged.get(["new-good"]) == ([], ["new-good"])


def test_document_over_the_size_limit(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(limits={"max_document_bytes": 2000})
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        before = snapshot(client)
        big = Document("big", "word " * 1000)
        expect("INVALID_ARGUMENT", lambda: client.upsert([big]), "5000 bytes", "2000")
        assert snapshot(client) == before


def test_non_utf8_text(unchanged: RagClient) -> None:
    # A Document{id: "bad", text: b"\xff\xfe"} inside an UpsertRequest, written by hand:
    # protobuf clients refuse to build such a message, but other encoders may send it.
    document = b"\x0a\x03bad" + b"\x12\x02\xff\xfe"
    raw = b"\x12" + bytes([len(document)]) + document
    upsert = unchanged.channel.unary_unary(
        "/rag.v1.RetrievalService/Upsert",
        request_serializer=None,
        response_deserializer=retrieval_pb2.UpsertResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        upsert(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (info.value.details() or "")
    assert unchanged.get(["bad"]) == ([], ["bad"])


def test_message_over_the_size_limit(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(server={"max_message_bytes": 64 * 1024})
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        before = snapshot(client)
        huge = Document("huge", "x" * 100_000)
        expect("RESOURCE_EXHAUSTED", lambda: client.upsert([huge]), "larger than max")
        assert snapshot(client) == before


def test_empty_requests(unchanged: RagClient) -> None:
    expect("INVALID_ARGUMENT", lambda: unchanged.upsert([]), "at least one document")
    expect("INVALID_ARGUMENT", lambda: unchanged.get([]), "at least one")
    expect("INVALID_ARGUMENT", lambda: unchanged.delete([]), "ids or a filter")
    expect("INVALID_ARGUMENT", lambda: unchanged.embed([]), "at least one")
    expect("INVALID_ARGUMENT", lambda: unchanged.embed(["fine", ""]), "text 1 is empty")
    expect("NOT_FOUND", lambda: unchanged.embed(["x"], model_id="no-such-model"), "not loaded")
    expect("INVALID_ARGUMENT", lambda: unchanged.search_batch([]), "at least one")
    expect("INVALID_ARGUMENT", lambda: unchanged.ask(""), "empty")


def test_generate_context_is_bounded(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(limits={"max_generate_passages": 3, "max_generate_context_bytes": 2000})
    passage = "The tide rises twice a day. " * 10  # 280 bytes
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)

        def generate(count: int, text: str = passage) -> list[generation_pb2.GenerateResponse]:
            context = [
                common_pb2.ContextPassage(document_id=f"d{i}", chunk_id=f"d{i}#0", text=text)
                for i in range(count)
            ]
            request = generation_pb2.GenerateRequest(prompt="When is the tide?", context=context)
            return list(stub.Generate(request, timeout=30))

        for call, words in (
            (lambda: generate(4), "max_generate_passages"),
            (lambda: generate(2, passage * 5), "max_generate_context_bytes"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in (info.value.details() or "")
        # Within the bounds it answers, from the context.
        assert "tide" in "".join(r.delta for r in generate(3)[:-1])
