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

from bench.common import BENCH_DIR, command_line, record, table
from bench.embed import our_encoder, texts
from bench.load import start_server
from rag_grpc.client import RagClient
from rag_grpc.config import load_settings
from rag_grpc.documents import Document
from rag_grpc.embed.chunking import TokenChunker
from tests.conftest import free_port

MODEL_DIR = BENCH_DIR.parent / "models" / "all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=120, help="words per document")
    parser.add_argument("--job-size", type=int, default=1000)
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
    port = free_port()
    server = start_server(work / "data", port, work / "server.log", "retrieval,ingestion,admin")
    try:
        with RagClient(f"127.0.0.1:{port}", timeout=600) as client:
            started = time.perf_counter()
            jobs = [
                client.submit(docs[i : i + args.job_size])
                for i in range(0, len(docs), args.job_size)
            ]
            stored_chunks = 0
            for job_id in jobs:
                for info in client.watch_job(job_id, timeout=3600):
                    if info.done:
                        assert info.state == "SUCCEEDED", info
                        stored_chunks += info.chunks
            pipeline_s = time.perf_counter() - started
            assert stored_chunks == len(chunks), (stored_chunks, len(chunks))
            vectors = sum(ns.vectors for ns in client.stats().namespaces)
            assert vectors == len(chunks)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        ["raw: chunk + embed in process", args.docs / raw_s, len(chunks) / raw_s, raw_s],
        [
            f"pipeline: Submit (jobs of {args.job_size}) -> stored and indexed",
            args.docs / pipeline_s,
            len(chunks) / pipeline_s,
            pipeline_s,
        ],
    ]
    overhead = 1 - (len(chunks) / pipeline_s) / (len(chunks) / raw_s)
    body = "\n\n".join(
        [
            f"{args.docs} documents of {args.words} words from CPython's documentation, "
            f"{len(chunks)} chunks; our int8 export on ONNX Runtime CPU, 2 threads; the "
            "pipeline server runs as its own process.",
            table(["path", "docs/s", "chunks/s", "seconds"], rows),
            table(["measure", "value"], [["pipeline overhead (1 - pipeline/raw)", overhead]]),
        ]
    )
    record(
        "Ingestion end to end vs raw embedding",
        command_line(),
        "raw embedding of the same chunks with the same encoder (same run)",
        body,
        {"rows": rows, "overhead": overhead},
        save=not args.no_record,
    )


if __name__ == "__main__":
    main()
