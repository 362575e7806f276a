"""The rag-grpc command against a real server process."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
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
from tests.conftest import CORPUS, EXPORT_DIR, MODEL_DIR, ServerProcess, free_port, tool

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("rag-grpc"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "notes").mkdir(parents=True)
    records = [
        {
            "id": "kiwi",
            "text": "The kiwi is a flightless bird native to New Zealand.",
            "metadata": {"kind": "animal"},
        },
        {
            "id": "fjord",
            "text": "A fjord is a long, narrow inlet with steep sides, carved by a glacier.",
            "metadata": {"kind": "landform"},
        },
    ]
    (corpus / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (corpus / "notes" / "bread.md").write_text(
        "# Bread\n\nSourdough is leavened with a culture of wild yeast and lactic acid bacteria.\n"
    )
    (corpus / "notes" / "tides.txt").write_text(
        "Tides are caused by the gravitational pull of the Moon and the Sun on the oceans.\n"
    )
    return corpus


def test_ingest_search_ask_get(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc = server_process()
    target = ("--target", proc.target)
    corpus = write_corpus(tmp_path)

    ingested = cli("ingest", str(corpus), *target)
    assert ingested.returncode == 0, ingested.stderr
    assert "ingested 4 of 4 documents" in ingested.stdout
    assert "docs/s" in ingested.stdout

    found = cli("search", "bird that cannot fly", "-k", "2", "--json", *target)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert len(hits) == 2
    assert {"document_id", "chunk_id", "score", "text"} <= hits[0].keys()
    assert hits[0]["document_id"] == "kiwi" and hits[0]["chunk_id"] == "kiwi#0"

    plain = cli("search", "what makes sourdough rise", *target)
    assert plain.returncode == 0 and "notes/bread.md#0" in plain.stdout.splitlines()[0]

    filtered = cli(
        "search",
        "bird",
        "--json",
        "--filter",
        '{"field": {"key": "kind", "equals": {"stringValue": "landform"}}}',
        *target,
    )
    assert [h["document_id"] for h in json.loads(filtered.stdout)] == ["fjord"]

    asked = cli("ask", "What causes tides?", "--json", *target)
    assert asked.returncode == 0, asked.stderr
    messages = [json.loads(line) for line in asked.stdout.splitlines()]
    assert "citations" in messages[0]
    assert messages[0]["citations"][0]["document_id"] == "notes/tides.txt"
    assert all("delta" in m for m in messages[1:-1]) and len(messages) > 3
    assert "Moon" in "".join(m["delta"] for m in messages[1:-1])
    assert {"usage", "timings"} <= messages[-1].keys()
    assert messages[-1]["usage"]["completion_tokens"] > 0

    streamed = cli("ask", "What causes tides?", *target)
    assert "Moon" in streamed.stdout and "extractive" in streamed.stdout
    assert "notes/tides.txt#0" in streamed.stdout

    got = cli("get", "kiwi", "fjord", "--json", *target)
    assert got.returncode == 0
    assert [d["id"] for d in json.loads(got.stdout)] == ["kiwi", "fjord"]
    assert json.loads(got.stdout)[0]["metadata"] == {"kind": "animal"}

    partly = cli("get", "kiwi", "nope", "--json", *target)
    assert partly.returncode != 0
    assert [d["id"] for d in json.loads(partly.stdout)] == ["kiwi"]
    assert "nope" in partly.stderr
    proc.stop()


def test_client_errors_exit_nonzero_with_status(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc = server_process()
    target = ("--target", proc.target)
    missing_ns = cli("search", "x", "--namespace", "ghost", *target)
    assert missing_ns.returncode == 1
    assert missing_ns.stderr.startswith("rag-grpc: NOT_FOUND: namespace 'ghost' does not exist")
    empty = cli("search", "x", "--json", *target)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []  # fresh server: no hits
    bad_k = cli("search", "x", "-k", "5000", *target)
    assert bad_k.returncode == 1 and "INVALID_ARGUMENT" in bad_k.stderr
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    ingest = cli("ingest", str(bad_line), *target)
    assert ingest.returncode == 2 and "bad.jsonl:2" in ingest.stderr
    proc.stop()
    down = cli("search", "x", "--target", proc.target, "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


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


def test_model_verify_detects_tampering(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for path in MODEL_DIR.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert cli("model", "verify", "--model-dir", str(copy)).returncode == 0
    with open(copy / "tokenizer.json", "ab") as fh:
        fh.write(b" ")
    tampered = cli("model", "verify", "--model-dir", str(copy))
    assert tampered.returncode == 2 and "does not match its sha256" in tampered.stderr


def test_ingest_shows_a_progress_bar_on_a_terminal(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    import pty

    proc = server_process()
    corpus = write_corpus(tmp_path)
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [tool("rag-grpc"), "ingest", str(corpus), "--target", proc.target],
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    output = b""
    while True:
        try:
            block = os.read(leader, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not block:
            break
        output += block
    assert child.wait(timeout=60) == 0
    os.close(leader)
    text = output.decode(errors="replace")
    assert "ingesting" in text and "4/4" in text and "docs/s" in text and "ETA" in text
    assert "\x1b[" in text  # drawn with terminal control sequences, unlike piped output
    assert "ingested 4 of 4 documents" in text
    proc.stop()


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


def test_output_from_the_server_is_printed_with_controls_escaped(
    server_process: Callable[..., ServerProcess],
) -> None:
    proc = server_process()
    target = ("--target", proc.target)
    # Ids with controls are refused on write; texts and metadata values are data.
    text = "Lava \x1b[31mflows\x1b[0m from the volcano\u202e at night.\nSecond line\x9b2J."
    note = "\x1b]0;owned\x07 set the title, \u2066isolate\u2069"
    with RagClient(proc.target) as client:
        client.upsert([Document("lava", text, {"note": note})])

    def unsafe(output: str) -> list[str]:
        return [c for c in output if c in "\x1b\x07\x9b\u202e\u2066\u2069"]

    got = cli("get", "lava", *target)
    assert got.returncode == 0, got.stderr
    assert unsafe(got.stdout) == []
    assert "\\u001b[31mflows" in got.stdout and "\\u202e" in got.stdout
    assert "\nSecond line" in got.stdout  # a text keeps its lines
    as_json = cli("get", "lava", "--json", *target)
    assert unsafe(as_json.stdout) == []
    assert json.loads(as_json.stdout)[0]["metadata"] == {"note": note}  # JSON decodes to the data
    assert json.loads(as_json.stdout)[0]["text"] == text
    for command in (
        ("search", "volcano lava"),
        ("search", "volcano lava", "--json"),
        ("ask", "What flows from the volcano?"),
        ("ask", "What flows from the volcano?", "--json"),
    ):
        result = cli(*command, *target)
        assert result.returncode == 0, result.stderr
        assert "flows" in result.stdout, command
        assert unsafe(result.stdout) == [], command
    # Error messages from the server: the metadata key is echoed back.
    bad_filter = cli(
        "search",
        "x",
        "--filter",
        '{"field": {"key": "\\u001b[2Jk\\u202e", "equals": {"stringValue": "v"}}}',
        *target,
    )
    assert bad_filter.returncode in (1, 2), bad_filter.stderr
    assert unsafe(bad_filter.stderr) == []
    proc.stop()


def test_serve_leaves_no_file_readable_by_others(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    previous = os.umask(0o022)  # the usual umask, so the server must tighten it itself
    try:
        proc = server_process(data)
    finally:
        os.umask(previous)
    with RagClient(proc.target) as client:
        client.upsert(CORPUS)
        client.delete(["chess"])
    assert proc.stop() == 0
    paths = [data, *data.rglob("*")]
    assert any(p.suffix == ".hnsw" for p in paths) and any(p.name == "rag.sqlite3" for p in paths)
    open_to_others = {
        str(p.relative_to(data)): oct(p.stat().st_mode & 0o777)
        for p in paths
        if p.stat().st_mode & 0o077
    }
    assert open_to_others == {}


def test_compact_reclaims_deleted_documents_offline(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    proc = server_process(data)
    filler = " ".join(f"word{i}" for i in range(150))
    documents = [Document(f"doc{i}", f"Document {i} about item {i}. {filler}") for i in range(60)]
    documents += CORPUS
    with RagClient(proc.target) as client:
        client.upsert(documents[:30])
        client.upsert(documents[30:])
        assert client.delete([d.id for d in documents[:60]]).documents == 60
    offline = ("compact", "--data-dir", str(data))
    env = {
        "RAG_GRPC_EMBEDDING__MODEL_DIR": str(MODEL_DIR),
        "RAG_GRPC_EMBEDDING__EXPORT_DIR": str(EXPORT_DIR),
    }
    busy = cli(*offline, env=env)
    assert busy.returncode == 2 and "in use by another process" in busy.stderr
    assert proc.stop() == 0

    compacted = cli(*offline, env=env)
    assert compacted.returncode == 0, compacted.stderr
    slots = re.search(r"default: index slots (\d+) -> (\d+)", compacted.stdout)
    assert slots, compacted.stdout
    assert int(slots.group(1)) > 60 and int(slots.group(2)) == len(CORPUS)
    sizes = re.search(r"database: (\d+) -> (\d+) bytes", compacted.stdout)
    assert sizes and int(sizes.group(2)) < int(sizes.group(1)) / 2, compacted.stdout

    proc = server_process(data)
    with RagClient(proc.target) as client:
        assert client.search("What erupts from a volcano?", k=1)[0].document_id == "volcano"
        assert client.search("item 7", k=3)[0].document_id in {d.id for d in CORPUS}
        assert [ns.vectors for ns in client.stats().namespaces] == [len(CORPUS)]
    proc.stop()
    missing = cli("compact", "--data-dir", str(tmp_path / "nothing"), env=env)
    assert missing.returncode == 2 and "nothing to compact" in missing.stderr


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
