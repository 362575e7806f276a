"""Shared helpers for the benchmarks: data, timing, tables, RESULTS.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnxruntime loads only for the benchmarks that embed
    from rag_grpc.embed.encoder import OnnxEncoder

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
MODEL_DIR = BENCH_DIR.parent / "models" / "all-MiniLM-L6-v2"
# Our ONNX exports for the benchmarks, kept apart from a server's data dir.
EXPORT_DIR = BENCH_DIR / ".cache" / "model-exports"


def our_encoder(variant: str = "auto", batch_size: int = 32) -> OnnxEncoder:
    """Our export of the prepared model, loaded the way the server loads it
    (through the embedding config), cached under bench/.cache."""
    from rag_grpc.config import load_settings
    from rag_grpc.embed.loader import load_encoder

    settings = load_settings(
        None,
        embedding={"model_dir": MODEL_DIR, "export_dir": EXPORT_DIR, "variant": variant},
    )
    return load_encoder(settings.embedding, settings.data_dir, batch_size=batch_size)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors (float32), seeded."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest inner products per query (ground truth)."""
    k = min(k, len(data))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ data.T
        top = (
            np.argpartition(-scores, k, axis=1)[:, :k]
            if k < len(data)
            else np.tile(np.arange(k), (len(scores), 1))
        )
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true k nearest found, over all queries."""
    k = truth.shape[1]
    hits = sum(
        len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / truth.size


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def latencies_ms(fn: Callable[[int], object], count: int) -> np.ndarray:
    """Per-call latency in ms of fn(i) for i in range(count)."""
    out = np.empty(count)
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        out[i] = (time.perf_counter() - started) * 1000
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return (
                f"{value:.3f}"
                if abs(value) < 10
                else f"{value:,.0f}"
                if abs(value) >= 1000
                else f"{value:.1f}"
            )
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line about this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"
    )


def record(
    title: str, command: str, peers: str, body: str, data: dict[str, object], save: bool = True
) -> None:
    """Append a run to bench/RESULTS.md and write its JSON beside it (save=False: print only)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH_DIR
        ).stdout.strip()
    except OSError:
        commit = "?"
    section = (
        f"\n## {title}\n\n- date: {stamp}\n- machine: {machine()}\n- commit: {commit}\n"
        f"- command: `{command}`\n- peers in the same run: {peers}\n\n{body}\n"
    )
    print(section)
    if not save:
        return
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach run appends its tables here.\n")
    with open(RESULTS, "a") as fh:
        fh.write(section)
    out = BENCH_DIR / "results"
    out.mkdir(exist_ok=True)
    name = title.lower().replace(" ", "-").replace("/", "-")
    (out / f"{name}.json").write_text(json.dumps({"date": stamp, **data}, indent=2, default=str))


def command_line() -> str:
    """How this benchmark was started."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def embedding_like(n: int, seed: int, sample: int = 4000) -> np.ndarray:
    """Unit vectors with the mean and covariance of real MiniLM embeddings.

    Random uniform 384-d vectors have no neighbourhood structure (every
    library's recall@10 stays near 0.25 at ef=256 on them), unlike real
    embeddings, whose variance sits in a few dozen directions. Embedding 100k
    texts takes minutes here, so this fits a Gaussian to `sample` real
    embeddings of CPython's documentation (cached under bench/.cache) and
    draws from it.
    """
    cache = BENCH_DIR / ".cache" / f"minilm-pydoc-{sample}.npy"
    if cache.exists():
        real = np.load(cache)
    else:
        from pydoc_data.topics import topics

        words = " ".join(topics[name] for name in sorted(topics)).split()
        texts = [" ".join(words[i : i + 12]) for i in range(0, len(words) - 12, 12)][:sample]
        encoder = our_encoder(batch_size=128)
        real = encoder.embed(texts).vectors
        cache.parent.mkdir(exist_ok=True)
        np.save(cache, real)
    rng = np.random.default_rng(seed)
    mean = real.mean(axis=0)
    covariance = np.cov(real, rowvar=False)
    data = rng.multivariate_normal(mean, covariance, size=n, method="cholesky").astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data
