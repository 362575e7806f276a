"""Observability end to end: one trace across Envoy, rag-grpc and the Triton
call (spans captured by an OTLP receiver run here), the Prometheus endpoint,
and the structured log line of each call."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from rag_grpc import telemetry
from rag_grpc.client import RagClient, RpcError
from rag_grpc.config import IndexConfig, LimitsConfig, TelemetryConfig
from rag_grpc.documents import Document
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.index.retriever import Retriever, SearchQuery
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import Telemetry
from tests.conftest import (
    CORPUS,
    MODEL_DIR,
    ServerProcess,
    ServerThread,
    ask_summary,
    free_port,
)
from tests.envoy_server import CERTS_SH, Envoy
from tests.in_process import HashEmbedder
from tests.triton_server import Triton


class OtlpReceiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """A minimal OTLP/gRPC collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_trace(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for service, span in list(self.spans):
            out.setdefault(span.trace_id.hex(), []).append((service, span.name))
        return out


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    collector = OtlpReceiver()
    yield collector
    collector.server.stop(0)


@pytest.mark.slow
def test_one_trace_covers_envoy_rag_grpc_and_the_triton_call(
    start_server: Callable[..., ServerThread], receiver: OtlpReceiver, tmp_path: Path
) -> None:
    import subprocess

    subprocess.run([str(CERTS_SH), str(tmp_path / "certs")], check=True, capture_output=True)
    triton = Triton(tmp_path / "triton.log").start()
    try:
        server = start_server(
            telemetry={"otlp_endpoint": f"127.0.0.1:{receiver.port}", "export_interval_s": 0.2},
            generation={
                "generator": "triton",
                "triton": {"url": triton.url, "probe_interval_s": 0.5},
            },
        )
        (tmp_path / "envoy").mkdir()
        proxy = Envoy(
            tmp_path / "envoy",
            tmp_path / "certs",
            server.target,
            *("--otlp", f"127.0.0.1:{receiver.port}"),
        )
        try:
            with RagClient(server.target) as direct:
                direct.upsert(CORPUS)
            with proxy.client(tmp_path / "certs", timeout=60) as client:
                summary = ask_summary(client.ask("What is a volcano?"))
            assert summary.generator == "triton"

            def complete() -> list[tuple[str, str]] | None:
                for spans in receiver.by_trace().values():
                    services = {service for service, _ in spans}
                    names = {name for _, name in spans}
                    if {"rag-grpc-gateway", "rag-grpc"} <= services and (
                        "triton ModelStreamInfer" in names
                    ):
                        return spans
                return None

            deadline = time.monotonic() + 30
            while (spans := complete()) is None:
                assert time.monotonic() < deadline, receiver.by_trace()
                time.sleep(0.3)
        finally:
            proxy.stop()
    finally:
        triton.kill()
    names = {name for _, name in spans}
    assert {"rag.v1.RagService/Ask", "retrieve", "embed", "index.search", "generate"} <= names
    assert any(service == "rag-grpc-gateway" for service, _ in spans)


def test_prometheus_endpoint_serves_metrics_that_move(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(telemetry={"prometheus_port": 0, "relevance_threshold": 0.2})
    port = server.server.telemetry.prometheus_port  # type: ignore[union-attr]
    assert port > 0

    def scrape() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def value(text: str, pattern: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if re.match(pattern, line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        before = scrape()
        for _ in range(3):  # repeats come from the result cache
            client.search("an active volcano in Sicily", mode="dense")
        client.search("zzzz qqqq xxxx", mode="dense")
        client.search("zzzz qqqq xxxx", mode="lexical")  # no word matches
        client.search("an active volcano", mode="hybrid")
        for _ in range(2):
            client.embed(["espresso crema"])  # the second is an embedding cache hit
        list(client.ask("How is espresso brewed?"))
    after = scrape()
    search_calls = r'^rag_rpc_calls_total\{.*method="/rag.v1.RetrievalService/Search".*\}'
    assert value(after, search_calls) - value(before, search_calls) == 6
    assert value(after, r'^rag_rpc_calls_total\{.*code="OK"') > value(
        before, r"^rag_rpc_calls_total"
    )
    assert value(after, r"^rag_rpc_duration_milliseconds_count") > 0
    assert value(after, r'^rag_searches_total\{.*outcome="success"') >= 3
    # Success and relevance per retrieval mode (the business metrics' mode split).
    assert value(after, r'^rag_searches_total\{(?=.*mode="lexical")(?=.*outcome="miss")') == 1
    # The explicit one and the Ask's (hybrid is the default mode).
    assert value(after, r'^rag_searches_total\{(?=.*mode="hybrid")(?=.*outcome="success")') >= 1
    assert value(after, r'^rag_searches_total\{.*mode="dense"') >= 4
    assert value(after, r"^rag_search_top_score_count") >= 4
    assert 0 < value(after, r"^rag_embed_cache_hit_ratio") < 1
    assert value(after, r"^rag_index_vectors") == len(CORPUS)
    assert value(after, r"^rag_embed_batch_size_count") >= 1
    assert value(after, r'^rag_generation_tokens_total\{.*direction="out"') > 0
    # Every call above has ended, so each method's in-flight gauge is back to
    # zero: a call that never left it would show here.
    in_flight = [line for line in after.splitlines() if line.startswith("rag_rpc_in_flight{")]
    assert any("/rag.v1.RetrievalService/Search" in line for line in in_flight)
    assert value(after, r"^rag_rpc_in_flight\{") == 0
    assert "rag_ingestion_pending_jobs" in after and "rag_embed_queue_texts" in after


@pytest.mark.slow
def test_log_lines_are_json_with_trace_and_caller_identity(tmp_path: Path) -> None:
    from rag_grpc.security.api_keys import new_api_key

    key, entry = new_api_key("alice")
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[tenants]]\nname = "acme"\n'
        '[[tenants.members]]\nidentity = "apikey:alice"\nrole = "admin"\n'
        f'[[api_keys]]\nname = "alice"\nhash = "{entry.hash}"\n'
    )
    config = tmp_path / "rag.toml"
    config.write_text(f'[logging]\njson_format = true\n[auth]\npolicy_file = "{policy}"\n')
    proc = ServerProcess(tmp_path / "data", "--config", str(config))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (
        ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),
        ("authorization", f"Bearer {key}"),
    )
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = admin_service_pb2_grpc.AdminServiceStub(channel)
            stub.Stats(admin_pb2.StatsRequest(), metadata=metadata, timeout=10)
        with RagClient(proc.target, token=key) as client:
            client.upsert(CORPUS[:1])
    finally:
        proc.stop()
    lines = [json.loads(line) for line in proc.log.read_text().splitlines() if line.startswith("{")]
    stats = [e for e in lines if e.get("method") == "/rag.v1.AdminService/Stats"]
    assert stats, lines[-5:]
    entry_line = stats[0]
    assert entry_line["trace_id"] == trace_id and entry_line["code"] == "OK"
    assert entry_line["latency_ms"] > 0
    # The authenticated caller, never its credential.
    assert entry_line["client"] == "apikey:alice"
    assert entry_line["level"] == "INFO" and entry_line["logger"] == "rag_grpc.rpc"
    # Document text and the key never reach the log at INFO.
    text = proc.log.read_text()
    assert "volcano" not in text.lower() and key not in text


def test_client_identity_is_ignored_from_untrusted_peers(
    start_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(
        server={"trusted_proxies": ["10.9.9.9"]}, logging={"call_log_sample_ratio": 1.0}
    )
    with caplog.at_level("INFO", logger="rag_grpc.rpc"), grpc.insecure_channel(server.target) as ch:
        stub = admin_service_pb2_grpc.AdminServiceStub(ch)
        xfcc = (("x-forwarded-client-cert", "URI=spiffe://forged/identity"),)
        stub.Stats(admin_pb2.StatsRequest(), metadata=xfcc, timeout=10)
    records = [
        r for r in caplog.records if getattr(r, "method", "") == "/rag.v1.AdminService/Stats"
    ]
    assert records and getattr(records[0], "client", None) == ""


def test_successful_calls_are_logged_by_sample_errors_always(
    start_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(logging={"call_log_sample_ratio": 0.0})
    with caplog.at_level("DEBUG", logger="rag_grpc.rpc"), RagClient(server.target) as client:
        for _ in range(5):
            client.stats()
        with pytest.raises(RpcError):
            client.search("lava", namespace="nowhere")
        # The server logs a call as it ends, which may be just after the
        # client has its answer.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(caplog.records) < 6:
            time.sleep(0.05)
    by_method: dict[str, list[logging.LogRecord]] = {}
    for record in caplog.records:
        by_method.setdefault(getattr(record, "method", ""), []).append(record)
    stats = by_method["/rag.v1.AdminService/Stats"]
    assert len(stats) == 5 and {r.levelno for r in stats} == {logging.DEBUG}
    (failed,) = by_method["/rag.v1.RetrievalService/Search"]
    assert failed.levelno == logging.INFO and getattr(failed, "code", "") == "NOT_FOUND"


def _searches(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    """rag_searches by (mode, outcome), as the reader collects them now."""
    counts: dict[tuple[str, str], int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "rag_searches":
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        attributes = dict(point.attributes or {})
                        key = (str(attributes["mode"]), str(attributes["outcome"]))
                        counts[key] = int(point.value)
    return counts


def _retriever(data: Path, **recording: Any) -> Retriever:
    store = DocumentStore(data / "rag.sqlite3")
    chunker = TokenChunker(MODEL_DIR / "tokenizer.json", chunk_tokens=8, overlap_tokens=0)
    return Retriever(
        store, HashEmbedder(), chunker, data / "index", IndexConfig(), LimitsConfig(), **recording
    )


def test_components_record_into_the_telemetry_they_are_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A core component records into the Telemetry it was built with; one
    built without it (telemetry.OFF) records nothing, even while a server's
    Telemetry is installed."""
    reader = InMemoryMetricReader()
    monkeypatch.setattr(
        telemetry,
        "MeterProvider",
        lambda resource, metric_readers: MeterProvider(
            resource=resource, metric_readers=[*metric_readers, reader]
        ),
    )
    recording = Telemetry(TelemetryConfig())
    telemetry.install(recording)
    try:
        silent = _retriever(tmp_path / "off")
        # A hash embedder's scores mean nothing: any dense hit is a success.
        loud = _retriever(tmp_path / "on", telemetry=recording, relevance_threshold=-1.0)
        for retriever in (silent, loud):
            retriever.upsert("", [Document("a", "the quick brown fox")])
            retriever.search(SearchQuery(text="quick fox", k=1, mode="dense"))
            retriever.search(SearchQuery(text="quick fox", k=1, mode="lexical"))
            if retriever is silent:
                assert silent.searcher.telemetry is telemetry.OFF
                assert _searches(reader) == {}
        assert _searches(reader) == {("dense", "success"): 1, ("lexical", "success"): 1}
    finally:
        telemetry.install(None)
        recording.shutdown()
