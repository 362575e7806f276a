"""The server as a user runs it: `rag-grpc serve` processes, grpcurl through
reflection, health checking, SIGTERM, restarts and split microservices."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.generate.base import AskFinished, Citations
from tests.conftest import (
    CORPUS,
    ROOT,
    ServerProcess,
    ask_answer,
    ask_citations,
    free_port,
    health_status,
    tool,
    wait_for,
)

# `rag-grpc serve` as child processes, grpcurl.
pytestmark = pytest.mark.slow

SERVICES = [
    "rag.v1.RetrievalService",
    "rag.v1.EmbeddingService",
    "rag.v1.GenerationService",
    "rag.v1.RagService",
    "rag.v1.IngestionService",
    "rag.v1.AdminService",
]


def grpcurl(*args: str) -> str:
    result = subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_describes_and_calls(server_process: Callable[..., ServerProcess]) -> None:
    proc = server_process()
    with RagClient(proc.target) as client:
        client.upsert(CORPUS)
    listed = grpcurl("-plaintext", proc.target, "list").split()
    for service in [*SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]:
        assert service in listed
    described = grpcurl("-plaintext", proc.target, "describe", "rag.v1.RetrievalService")
    assert "rpc Search ( .rag.v1.SearchRequest ) returns ( .rag.v1.SearchResponse )" in described
    message = grpcurl("-plaintext", proc.target, "describe", "rag.v1.Filter")
    assert "FieldCondition field" in message
    body = json.dumps(
        {
            "text": "which board game has knights and bishops?",
            "k": 2,
            "filter": {"field": {"key": "year", "range": {"lte": 2020}}},
        }
    )
    reply = json.loads(
        grpcurl("-plaintext", "-d", body, proc.target, "rag.v1.RetrievalService/Search")
    )
    assert [h["document_id"] for h in reply["hits"]] == ["chess", "volcano"]
    assert reply["hits"][0]["metadata"]["topic"] == {"string_value": "games"}
    health = json.loads(
        grpcurl(
            "-plaintext",
            "-d",
            '{"service": "rag.v1.RagService"}',
            proc.target,
            "grpc.health.v1.Health/Check",
        )
    )
    assert health == {"status": "SERVING"}
    proc.stop()


def test_health_reports_each_service(server_process: Callable[..., ServerProcess]) -> None:
    proc = server_process()
    for service in ["", *SERVICES]:
        assert health_status(proc.target, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health_status(proc.target, "rag.v1.NoSuchService")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # Watch (what Envoy and Kubernetes probes may use) streams the status,
    # and a change: NOT_SERVING when the server starts draining.
    with grpc.insecure_channel(proc.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        proc.proc.send_signal(15)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    proc.stop()


def test_sigterm_drains_then_restart_keeps_everything(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    proc = server_process(data_dir)
    with RagClient(proc.target) as client:
        client.upsert(CORPUS)
        client.upsert(CORPUS[:2], namespace="other")
        client.delete(["chess"])
        before = client.stats().namespaces
        hits_before = [(h.chunk_id, round(h.score, 4)) for h in client.search("pressure", k=4)]
        # A stream opened before SIGTERM still ends with its summary. (The
        # extractive answer may be sent whole by then; test_triton.py holds a
        # slow Triton stream open across SIGTERM to prove the drain itself.)
        stream = client.ask("What is espresso?")
        first = next(stream)
        assert isinstance(first, Citations)
        proc.proc.send_signal(15)
        rest = list(stream)
        assert rest and isinstance(rest[-1], AskFinished)  # ended with its summary
    assert proc.stop(timeout=30) == 0
    assert "draining in-flight calls" in proc.log.read_text()

    restarted = server_process(data_dir, port=proc.port)
    with RagClient(restarted.target) as client:
        assert client.stats().namespaces == before
        hits_after = [(h.chunk_id, round(h.score, 4)) for h in client.search("pressure", k=4)]
        assert hits_after == hits_before
        assert client.get(["chess"]) == ([], ["chess"])
        assert "loaded index default" in restarted.log.read_text()
    restarted.stop()


def test_index_is_rebuilt_from_the_store_after_a_crash(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    proc = server_process(data_dir)
    with RagClient(proc.target) as client:
        client.upsert(CORPUS)
    proc.stop(sig=9)  # no chance to save the index
    restarted = server_process(data_dir)
    with RagClient(restarted.target) as client:
        assert client.search("lava", k=1)[0].document_id == "volcano"
        assert client.stats().namespaces[0].vectors == len(CORPUS)
    assert "rebuilt index default from the store" in restarted.log.read_text()
    restarted.stop()


def test_a_saved_index_catches_up_with_newer_rows_and_a_damaged_one_is_rebuilt(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    proc = server_process(data_dir)
    with RagClient(proc.target) as client:
        client.upsert(CORPUS[:3])
    assert proc.stop(timeout=30) == 0  # saves the index with its last label
    proc = server_process(data_dir, port=proc.port)
    with RagClient(proc.target) as client:
        client.upsert(CORPUS[3:])
        client.delete(["chess"])
    proc.stop(sig=9)  # the saved index is now behind the store
    restarted = server_process(data_dir, port=proc.port)
    with RagClient(restarted.target) as client:
        assert client.search("espresso coffee", k=1)[0].document_id == "espresso"
        assert "chess" not in {h.document_id for h in client.search("chess openings", k=20)}
        assert client.stats().namespaces[0].vectors == len(CORPUS) - 1  # a chunk each
    log = restarted.log.read_text()
    assert f"{len(CORPUS) - 3} newer vectors applied" in log and "rebuilt index" not in log
    restarted.stop(sig=9)
    (data_dir / "index" / "default.hnsw").write_bytes(b"not an index")
    again = server_process(data_dir, port=proc.port)
    with RagClient(again.target) as client:
        assert client.search("lava", k=1)[0].document_id == "volcano"
    assert "rebuilding index default" in again.log.read_text()
    again.stop()


def test_microservices_split_and_dependency_health(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    retrieval_port = free_port()
    retrieval = server_process(
        tmp_path / "retrieval-data", "--services", "retrieval,ingestion,admin", port=retrieval_port
    )
    rag = server_process(
        tmp_path / "rag-data",
        "--services",
        "rag,generation",
        "--retrieval-target",
        retrieval.target,
    )
    with RagClient(retrieval.target) as client:
        client.upsert(CORPUS)
        assert "rag.v1.RagService" not in client.stats().services
    with RagClient(rag.target) as client:
        with pytest.raises(RpcError) as info:
            client.search("lava")  # the rag process serves no RetrievalService
        assert info.value.code == "UNIMPLEMENTED"
        events = list(client.ask("What erupts from a volcano?", k=2))
        assert ask_citations(events)[0].document_id == "volcano"
        assert "lava" in ask_answer(events)

    rag_service = "rag.v1.RagService"
    wait_for(
        lambda: health_status(rag.target, rag_service) == health_pb2.HealthCheckResponse.SERVING
    )
    retrieval.stop(sig=9)
    wait_for(
        lambda: health_status(rag.target, rag_service) == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert (
        health_status(rag.target, "rag.v1.GenerationService")
        == health_pb2.HealthCheckResponse.SERVING
    )
    with RagClient(rag.target) as client:
        with pytest.raises(RpcError) as info:
            list(client.ask("What erupts from a volcano?"))
        assert info.value.code == "UNAVAILABLE" and "RetrievalService" in info.value.message

    back = server_process(
        tmp_path / "retrieval-data", "--services", "retrieval", port=retrieval_port
    )
    wait_for(
        lambda: health_status(rag.target, rag_service) == health_pb2.HealthCheckResponse.SERVING
    )
    with RagClient(rag.target) as client:
        events = list(client.ask("What erupts from a volcano?", k=1))
        assert ask_citations(events)[0].document_id == "volcano"
    back.stop()
    rag.stop()


def wait_for_log(proc: ServerProcess, text: str, timeout: float = 60) -> str:
    wait_for(lambda: text in proc.log.read_text(), timeout=timeout)
    return proc.log.read_text()


def test_a_deadline_that_expires_while_the_server_works_is_seen_by_the_server(
    server_process: Callable[..., ServerProcess],
) -> None:
    """The deadline reaches the server and expires during the work (embedding
    a large upsert takes far longer than the deadline): the server records
    DEADLINE_EXCEEDED and stores nothing. A client-side timeout=0 would fail
    before sending and prove nothing about the server."""
    proc = server_process()
    words = " ".join(f"word{i}" for i in range(150))
    # 1000 documents of ~150 tokens: seconds of embedding even on many cores.
    documents = [Document(f"late-{i}", f"{i} {words}") for i in range(1000)]
    with RagClient(proc.target, timeout=0.5) as client, pytest.raises(RpcError) as info:
        client.upsert(documents)
    assert info.value.code == "DEADLINE_EXCEEDED"
    log = wait_for_log(proc, "rpc /rag.v1.RetrievalService/Upsert ")
    assert "rpc /rag.v1.RetrievalService/Upsert DEADLINE_EXCEEDED" in log, log[-2000:]
    with RagClient(proc.target, timeout=120) as client:
        client.upsert(CORPUS[:1])  # the server still serves, and its store is consistent
        assert client.get(["late-0", "late-999"])[1] == ["late-0", "late-999"]
        assert client.stats().namespaces[0].documents == 1
    proc.stop(sig=9)  # the abandoned embedding may still be running; nothing to save


def test_the_service_registry_names_every_proto_service_once() -> None:
    from rag_grpc.pb import SERVICE_FILES
    from rag_grpc.services.registry import SERVICES as REGISTRY

    assert [entry.full_name for entry in REGISTRY.values()] == SERVICES
    declared = [
        service.full_name
        for module in SERVICE_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
    ]
    assert sorted(declared) == sorted(SERVICES)
    for entry in REGISTRY.values():
        assert entry.health_name == entry.full_name
        assert entry.name in entry.proto_name.lower()


def test_the_gateway_and_the_config_read_the_registry() -> None:
    import importlib.util

    from rag_grpc.config import Settings

    assert Settings.model_fields["services"].default == (
        "retrieval",
        "embedding",
        "generation",
        "rag",
        "ingestion",
        "admin",
    )
    spec = importlib.util.spec_from_file_location("envoy_render", ROOT / "envoy" / "render.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.SERVICES == SERVICES


def test_reading_the_config_does_not_load_the_native_core_or_grpc() -> None:
    probe = (
        "import sys, rag_grpc.config as c; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'onnxruntime', 'numpy') or m.startswith('rag_grpc.native'))); "
        "print(c.DEFAULT_EXACT_THRESHOLD)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded, threshold = result.stdout.splitlines()
    assert loaded == "[]"
    from rag_grpc.native import DEFAULT_EXACT_THRESHOLD

    assert int(threshold) == DEFAULT_EXACT_THRESHOLD
