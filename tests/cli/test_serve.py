"""`rag-grpc serve` and `rag-grpc config` (rag_grpc/cli/serve.py): the effective
configuration with secrets redacted, settings refused before the server
starts, credentials kept out of the output and the log, and the server's bound
on calls in progress."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
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

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.pb import ingestion_pb2, ingestion_service_pb2_grpc
from tests.cli.command import cli
from tests.conftest import ServerProcess, free_port

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def test_config_shows_effective_values_with_secrets_redacted(tmp_path: Path) -> None:
    config = tmp_path / "rag.toml"
    config.write_text(
        'port = 6000\n[limits]\nmax_k = 42\n[server]\nauth_token = "s3cret-token-of-the-tests"\n'
    )
    shown = cli("config", "--config", str(config), env={"RAG_GRPC_PORT": "7000"})
    assert shown.returncode == 0, shown.stderr
    effective = json.loads(shown.stdout)
    assert effective["port"] == 7000  # the environment overrides the file
    assert effective["limits"]["max_k"] == 42
    assert effective["server"]["auth_token"] == "**********"
    assert "s3cret" not in shown.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_k = 0\nunknown_option = 1\n")
    rejected = cli("config", "--config", str(bad))
    assert rejected.returncode == 2
    assert "limits.max_k" in rejected.stderr and "unknown_option" in rejected.stderr
    env_bad = cli("config", env={"RAG_GRPC_SERVICES": "retrieval,teleport"})
    assert env_bad.returncode == 2 and "teleport" in env_bad.stderr


def test_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    result = cli(
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
        env={"RAG_GRPC_EMBEDDING__MODEL_DIR": str(tmp_path / "no-model")},
    )
    assert result.returncode == 2
    assert "not a prepared model directory" in result.stderr


class _OtlpCollector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """An OTLP/gRPC collector that keeps the authorization header of each export."""

    def __init__(self) -> None:
        self.port = free_port()
        self.authorizations: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization", ""))
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_url_credentials_stay_out_of_config_output_and_the_server_log(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    collector = _OtlpCollector()
    config = tmp_path / "rag.toml"
    config.write_text(
        '[ingestion]\nnats_url = "nats://user:s3cret@127.0.0.1:4222"\n'
        f'[telemetry]\notlp_endpoint = "http://otel:s3cret@127.0.0.1:{collector.port}"\n'
        "export_interval_s = 0.2\n"
    )
    try:
        shown = cli("config", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert "s3cret" not in shown.stdout
        effective = json.loads(shown.stdout)
        assert effective["ingestion"]["nats_url"] == "nats://***@127.0.0.1:4222"
        assert effective["telemetry"]["otlp_endpoint"] == f"http://***@127.0.0.1:{collector.port}"

        proc = server_process(None, "--config", str(config))
        with RagClient(proc.target) as client:
            client.stats()
        deadline = time.monotonic() + 30
        while not collector.authorizations and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.stop()
    finally:
        collector.server.stop(0)
    # The credentials reached the collector, as Basic auth, not the log.
    assert collector.authorizations
    assert set(collector.authorizations) == {"Basic " + base64.b64encode(b"otel:s3cret").decode()}
    log = proc.log.read_text()
    assert "s3cret" not in log
    assert f"OTLP to http://127.0.0.1:{collector.port}" in log


def test_grpc_targets_with_credentials_are_refused_without_echoing_them(tmp_path: Path) -> None:
    for variable in ("RAG_GRPC_REMOTE__RETRIEVAL_TARGET", "RAG_GRPC_GENERATION__TRITON__URL"):
        refused = cli("config", env={variable: "user:s3cret@127.0.0.1:50051"})
        assert refused.returncode == 2, refused.stdout
        assert "must not contain user:password@" in refused.stderr
        assert "s3cret" not in refused.stderr + refused.stdout


def test_max_concurrent_rpcs_bounds_calls_in_progress(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    default = json.loads(cli("config").stdout)
    assert default["server"]["max_concurrent_rpcs"] == 1000  # bounded unless configured
    config = tmp_path / "rag.toml"
    config.write_text("[server]\nmax_concurrent_rpcs = 2\n")
    proc = server_process(None, "--config", str(config))
    filler = " ".join(f"token{i}" for i in range(180))
    with RagClient(proc.target) as client:
        # A job long enough (hundreds of passages to embed) to stay running
        # while the test holds two WatchJob streams on it.
        job_id = client.submit([Document(f"d{i}", f"{i} {filler}") for i in range(400)])
        with grpc.insecure_channel(proc.target) as channel:
            ingestion = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
            request = ingestion_pb2.WatchJobRequest(job_id=job_id)
            watches = [ingestion.WatchJob(request), ingestion.WatchJob(request)]
            for watch in watches:
                assert next(watch).job_id == job_id  # both streams are in progress
            with pytest.raises(RpcError) as info:
                client.stats()
            assert info.value.code == "RESOURCE_EXHAUSTED"
            watches[0].cancel()
            deadline = time.monotonic() + 10
            while True:  # the server frees the slot once it sees the cancel
                try:
                    client.stats()
                    break
                except RpcError as exc:
                    assert exc.code == "RESOURCE_EXHAUSTED" and time.monotonic() < deadline
                    time.sleep(0.05)
            watches[1].cancel()
    # SIGKILL: a graceful stop would first finish the embedding batch in progress.
    proc.stop(sig=9)
