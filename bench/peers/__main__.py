"""The orchestrator of `python -m bench.peers` (the project venv): the data
and exact answers, each peer's venv and driver run one after another, and
the table appended to bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import bench.peers
from bench.common import exact_top_k
from bench.peers import (
    CACHE,
    CLIENTS,
    EF,
    EF_CONSTRUCTION,
    RECALL_QUERIES,
    ROOT,
    SELECTIVITY_KEYS,
    STRONG_QUERIES,
    VENVS,
    K,
    M,
)
from bench.peers.driver import driver_main


def venv_python(system: str) -> Path:
    """The interpreter that drives `system`, its venv made on first use."""
    if system == "rag-grpc":
        return Path(sys.executable)
    venv, packages = VENVS[system]
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def run_system(system: str, workdir: Path, seconds: float, efs: list[int]) -> dict[str, Any]:
    load_before = load_average()
    command = [
        str(venv_python(system)),
        "-m",
        "bench.peers",
        "--driver",
        system,
        "--workdir",
        str(workdir),
        "--seconds",
        str(seconds),
        "--ef",
        *map(str, efs),
    ]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads((workdir / f"{system}.json").read_text())
    result["load"] = f"{load_before} → {load_average()}"
    return result


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth, strict=False))
    return hits / (len(found) * truth.shape[1])


def exact(vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Ids of the K best allowed vectors per query."""
    return allowed[exact_top_k(np.ascontiguousarray(vectors[allowed]), queries, K)]


def wait_for_quiet(limit: float, patience_s: float) -> None:
    """Wait (up to patience_s) for a 1-minute load average under limit: other
    people's tests share this machine's cores."""
    deadline = time.monotonic() + patience_s
    while float(load_average()) >= limit and time.monotonic() < deadline:
        print(f"load average {load_average()} >= {limit}: waiting", flush=True)
        time.sleep(30)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=bench.peers.__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--systems", nargs="+", default=["rag-grpc", "chroma", "milvus"])
    parser.add_argument("--seconds", type=float, default=10.0)
    # ef={EF} for every server; more values are measured on the same servers.
    parser.add_argument("--ef", type=int, nargs="+", default=[EF])
    parser.add_argument("--no-record", action="store_true")
    # Wait up to --patience s for the load to drop before the first server,
    # up to --between s before each next one (for the last one's load to fade).
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--patience", type=float, default=900)
    parser.add_argument("--between", type=float, default=120)
    # How long a (re)started server may take to answer before its run fails.
    parser.add_argument("--server-wait", type=float, default=600)
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver_main(args.driver, args.workdir, args.seconds, args.ef)
        return
    from bench.common import embedding_like, record, table

    first = True
    for n in args.sizes:
        workdir = Path(tempfile.mkdtemp(prefix="rag-bench-peers-", dir=CACHE))
        try:
            vectors = embedding_like(n, seed=1)
            queries = embedding_like(1000, seed=2)
            np.save(workdir / "vectors.npy", vectors)
            np.save(workdir / "queries.npy", queries)
            positions = np.arange(n)
            truth = {"": exact(vectors, queries[:RECALL_QUERIES], positions)}
            for label, key in SELECTIVITY_KEYS.items():
                truth[label] = exact(
                    vectors, queries[:RECALL_QUERIES], positions[positions % int(key[1:]) == 0]
                )
            del vectors
            results = {}
            failed = []
            os.environ["RAG_BENCH_SERVER_WAIT"] = str(args.server_wait)
            for system in args.systems:
                wait_for_quiet(args.quiet_load, args.patience if first else args.between)
                first = False
                print(f"--- {n:,}: {system}", flush=True)
                try:
                    results[system] = run_system(system, workdir, args.seconds, args.ef)
                except subprocess.CalledProcessError as exc:
                    # The others' figures are kept: a 1M run lost rag-grpc's
                    # 40 minutes when Milvus did not come back after a restart.
                    print(f"{system} failed: {exc}", flush=True)
                    failed.append(system)
            if not results:
                continue
            body, data = size_table(n, args, results, truth, table)
            if failed:
                body += (
                    f"\n\nNot measured (their driver failed; see its output): {', '.join(failed)}."
                )
            versions = "; ".join(r["version"] for r in results.values())
            record(
                f"Peers at server level, {n:,} vectors",
                " ".join(["python -m bench.peers", *sys.argv[1:]]),
                versions,
                body,
                data,
                save=not args.no_record,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def size_table(
    n: int,
    args: argparse.Namespace,
    results: dict[str, Any],
    truth: dict[str, np.ndarray],
    table: Callable[..., str],
) -> tuple[str, dict[str, Any]]:
    """The Markdown table of one size and the JSON beside it."""
    runs = {"rag-grpc": "rag-grpc", "chroma": "Chroma", "milvus": "Milvus Bounded"}
    base = results.get("milvus", {}).get("c8", {}).get("qps")
    rows, data = [], {}
    for system, r in results.items():
        data[system] = {key: value for key, value in r.items() if not key.startswith("found")}
        modes = [(runs[system], r)]
        modes += [(f"{runs[system]} ef={ef}", m) for ef, m in r.get("ef", {}).items()]
        if "strong" in r:  # the same Milvus server, searched with Strong consistency
            modes.append(("Milvus Strong (same server)", r["strong"]))
        for name, m in modes:
            filtered = [
                f"{m[f'filtered {s}']['p50']:.2f} / {recall(m[f'found {s}'], truth[s]):.3f}"
                for s in SELECTIVITY_KEYS
            ]
            noop = r["noop"]["qps"]
            rows.append(
                [
                    name,
                    f"{r['ingest_s']:.1f}",
                    f"{r['startup_s']:.1f}",
                    f"{r['rss'] / 2**20:,.0f}",
                    f"{recall(m['found'], truth['']):.3f}",
                    f"{m['seq']['p50']:.2f} / {m['seq']['p99']:.2f}",
                    f"{m['seq']['qps']:,.0f}",
                    f"{m['c8']['p50']:.2f} / {m['c8']['p99']:.2f}",
                    f"{m['c8']['qps']:,.0f}",
                    f"{m['c8']['qps'] / base:.2f}" if base else "-",
                    *filtered,
                    f"{noop:,.0f}",
                    f"{m['c8']['qps'] / noop:.2f}",
                    r["load"],
                ]
            )
    headers = [
        "server",
        "ingest s",
        "start-up s",
        "RSS MiB",
        "recall@10",
        "seq p50/p99 ms",
        "seq QPS",
        f"{CLIENTS} clients p50/p99 ms",
        f"{CLIENTS} clients QPS",
        "QPS / Milvus Bounded",
        *(f"filtered {s} p50 ms / recall" for s in SELECTIVITY_KEYS),
        "no-op/s (8 clients)",
        "Search / no-op",
        "load avg start → end",
    ]
    body = (
        f"{n:,} embedding-like unit vectors (d=384, `bench/common.py` embedding_like), one "
        "document each with int fields s100 = i % 100 and s10 = i % 10, loaded through each "
        "server's public API (rag-grpc: Upsert of 1,000 documents with their own vectors; "
        "Chroma: add of 5,000; Milvus: insert of 10,000, flush, HNSW index, load). HNSW "
        f"M={M}, efConstruction={EF_CONSTRUCTION}, ef={EF} (rag-grpc per request, Chroma "
        f"hnsw:search_ef, Milvus search params), k={K}, inner product; rag-grpc with its "
        "result cache off. Ingest: first write until the data answers a search. Start-up: a "
        "restarted server on its saved data, from process start until the first search "
        "answers (Milvus: load_collection included). RSS: summed over the server's process "
        "tree after the runs. Harness (the issue's): sequential = one sync client, 500 "
        f"queries (Milvus Strong {STRONG_QUERIES}); {CLIENTS} clients = {CLIENTS} threads in "
        "one process, each with its own sync client (rag-grpc: RagClient; Chroma: "
        f"HttpClient; Milvus: MilvusClient), {args.seconds:.0f} s; filtered = sequential, "
        f"{RECALL_QUERIES} queries (Strong {STRONG_QUERIES}), equality on s100 (1 %) or s10 "
        f"(10 %); recall@10 over the first {RECALL_QUERIES} queries (Strong "
        f"{STRONG_QUERIES}) against exact search (among the allowed documents when "
        "filtered). No-op: rag-grpc grpc.health.v1.Health/Check, Chroma heartbeat, Milvus "
        "has_collection, the same threads for half the time. Rows `ef=N`: the same server "
        "searched wider (ingest, start-up, RSS and no-op are that server's). Servers one "
        "after another, client and server sharing this machine's cores; 1-minute load "
        "average read at the start and end of each server's run.\n\n" + table(headers, rows)
    )
    return body, data


if __name__ == "__main__":
    main()
