"""A configured bearer token guards every rag.v1 call, and remote calls send it."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient, RpcError
from tests.conftest import CORPUS, ServerThread, ask_citations


def test_calls_without_the_token_are_refused(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(server={"auth_token": "t0ken-for-tests"})
    with RagClient(server.target, token="t0ken-for-tests") as client:
        client.upsert(CORPUS)
        assert client.search("lava", k=1)[0].document_id == "volcano"
        assert isinstance(next(iter(client.ask("What is lava?"))), list)
    for token in (None, "wrong"):
        with RagClient(server.target, token=token) as client:
            with pytest.raises(RpcError) as info:
                client.search("lava")
            assert info.value.code == "UNAUTHENTICATED"
            assert "authorization: Bearer" in info.value.message
            with pytest.raises(RpcError) as info:
                list(client.ask("What is lava?"))
            assert info.value.code == "UNAUTHENTICATED"
    with grpc.insecure_channel(server.target) as channel:  # probes need no token
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_remote_retrieval_receives_the_token(start_server: Callable[..., ServerThread]) -> None:
    token = {"server": {"auth_token": "shared-secret"}}
    retrieval = start_server(services="retrieval", **token)
    with RagClient(retrieval.target, token="shared-secret") as client:
        client.upsert(CORPUS)
    rag = start_server(
        services="rag,generation",
        remote={"retrieval_target": retrieval.target},
        **token,
    )
    with RagClient(rag.target, token="shared-secret") as client:
        events = list(client.ask("What erupts from a volcano?", k=1))
    assert ask_citations(events)[0].hit.document_id == "volcano"
