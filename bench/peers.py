"""Peers at server level: rag-grpc, a Chroma server and a Milvus standalone
server, loaded with the same vectors through their public APIs and measured
with the same client harness, one server after another (never in parallel).

    python -m bench.peers [--sizes 10000 100000] [--systems rag-grpc chroma milvus]
                          [--seconds 10] [--no-record]

Per system and size: ingest time (until searchable), start-up of a restarted
server from its saved data (process start until the first search answers,
Milvus's load_collection included), RSS summed over the server's process
tree, recall@10 against exact search, sequential and 8-client p50/p99/QPS,
filtered p50 and recall at 1 % and 10 % (equality on an int field), and the
same server's no-op rate. HNSW M=16, efConstruction=200, ef=100, k=10, inner
product on unit vectors everywhere.

Each peer runs in its own venv under bench/.cache (created on first use):
the orchestrator (this file, in the project venv) writes the data to a work
directory and runs `python -m bench.peers --driver SYSTEM` with that venv's
interpreter, which starts the server, measures, stops it and writes JSON.
The driver side imports only numpy and the peer's own client library.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.common import BENCH_DIR, exact_top_k, free_port

ROOT = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
K, EF, M, EF_CONSTRUCTION = 10, 100, 16, 200
CLIENTS = 8
RECALL_QUERIES = 200
# Milvus Strong waits ~0.4 s per search for its time tick: fewer queries.
STRONG_QUERIES = 50
# The peers' own venvs: the exact server versions this benchmark is about.
VENVS = {
    "chroma": (CACHE / "chroma-venv", ["chromadb==1.5.9"]),
    "milvus": (CACHE / "milvus-venv", ["milvus==2.3.5", "pymilvus==2.6.*", "numpy"]),
}
SELECTIVITY_KEYS = {"1 %": "s100", "10 %": "s10"}  # key == 0 admits that share


# -- the driver side: one server, its client, the harness -------------------


class SearchClient(Protocol):
    """One connection to a server: a vector search and a no-op call."""

    def search(self, vector: np.ndarray, key: str | None = None) -> list[int]: ...

    def noop(self) -> object: ...


class Peer(Protocol):
    """A server under test: start/stop, load the data, open clients."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def ingest(self, vectors: np.ndarray) -> None: ...

    def ready(self) -> None: ...

    def client(self) -> SearchClient: ...

    def version(self) -> str: ...

    def set_ef(self, ef: int) -> None: ...

    pid: int
    proc: subprocess.Popen[bytes]


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below pid (read before stopping it: orphans get re-parented)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def tree_rss(pid: int) -> int:
    """RSS in bytes summed over a process and all its descendants."""
    total = 0
    for member in (pid, *descendants(pid)):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += sum(
            int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 60) -> None:
    """SIGTERM a server and every process below it (milvus-server's wrapper
    leaves its child running otherwise), SIGKILL what outlives the grace."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline and (fields := _stat(pid)) and fields[0] != "Z":
            if pid == proc.pid and proc.poll() is not None:
                break
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_until(check: Callable[[], object], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll check() until it returns without raising (--server-wait s at most,
    600 by default; Milvus restarted on 1M vectors took longer)."""
    deadline = time.monotonic() + float(os.environ.get("RAG_BENCH_SERVER_WAIT", "600"))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            check()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class RagGrpc:
    """`rag-grpc serve` fed through Upsert with the documents' own vectors."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port, self.ef = workdir, free_port(), EF
        self.target = f"127.0.0.1:{self.port}"

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def start(self) -> None:
        from bench.load import start_server

        env = {
            "RAG_GRPC_INDEX__M": str(M),
            "RAG_GRPC_INDEX__EF_CONSTRUCTION": str(EF_CONSTRUCTION),
            # Queries repeat under load: every call must reach the index.
            "RAG_GRPC_INDEX__RESULT_CACHE_ENTRIES": "0",
        }
        self.proc = start_server(
            self.workdir / "rag",
            self.port,
            self.workdir / "rag.log",
            "retrieval,embedding,admin",
            env,
        )
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_tree(self.proc)

    def ingest(self, vectors: np.ndarray) -> None:
        from rag_grpc.client import RagClient
        from rag_grpc.documents import Document, GivenChunk

        with RagClient(self.target, timeout=600) as client:
            model = client.stats().models[0]
            for start in range(0, len(vectors), 1000):  # limits.max_documents_per_upsert
                client.upsert(
                    [
                        Document(
                            f"v{i}",
                            f"passage {i}",
                            {"s100": i % 100, "s10": i % 10},
                            chunks=(GivenChunk(f"passage {i}", vectors[i]),),
                            vector_model_id=model,
                        )
                        for i in range(start, min(start + 1000, len(vectors)))
                    ]
                )

    def ready(self) -> None:
        pass

    def client(self) -> SearchClient:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from rag_grpc.client import RagClient
        from rag_grpc.filters import Equals

        outer = self

        class Client:
            def __init__(self, target: str) -> None:
                self.rag = RagClient(target)
                self.health = health_pb2_grpc.HealthStub(self.rag.channel)

            def search(self, vector: np.ndarray, key: str | None = None) -> list[int]:
                flt = Equals(key, 0) if key else None
                hits = self.rag.search(vector, k=K, ef=outer.ef, filter=flt)
                return [int(h.document_id[1:]) for h in hits]

            def noop(self) -> object:
                return self.health.Check(health_pb2.HealthCheckRequest(), timeout=30)

        return Client(self.target)

    def version(self) -> str:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        return f"rag-grpc {out.stdout.strip()}"


class Chroma:
    """`chroma run` over HTTP; HNSW parameters from the collection's configuration."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()

    def set_ef(self, ef: int) -> None:
        import chromadb  # type: ignore[import-not-found]  # the peer's venv only

        collection = chromadb.HttpClient(host="127.0.0.1", port=self.port).get_collection("bench")
        collection.modify(configuration={"hnsw": {"ef_search": ef}})

    def start(self) -> None:
        log = self.workdir / "chroma.log"
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "chroma"),
                "run",
                "--path",
                str(self.workdir / "chroma"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=open(log, "w"),  # noqa: SIM115 - the server outlives this function
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        import chromadb

        wait_until(
            lambda: chromadb.HttpClient(host="127.0.0.1", port=self.port).heartbeat(),
            self.proc,
            log,
        )

    def stop(self) -> None:
        stop_tree(self.proc)

    def ingest(self, vectors: np.ndarray) -> None:
        import chromadb

        client = chromadb.HttpClient(host="127.0.0.1", port=self.port)
        collection = client.create_collection(
            "bench",
            metadata={
                "hnsw:space": "ip",
                "hnsw:M": M,
                "hnsw:construction_ef": EF_CONSTRUCTION,
                "hnsw:search_ef": EF,
            },
        )
        batch = min(5000, client.get_max_batch_size())
        for start in range(0, len(vectors), batch):
            ids = range(start, min(start + batch, len(vectors)))
            collection.add(
                ids=[str(i) for i in ids],
                embeddings=np.ascontiguousarray(vectors[start : start + len(ids)]),
                metadatas=[{"s100": i % 100, "s10": i % 10} for i in ids],
            )

    def ready(self) -> None:
        pass

    def client(self) -> SearchClient:
        import chromadb

        class Client:
            def __init__(self, port: int) -> None:
                self.http = chromadb.HttpClient(host="127.0.0.1", port=port)
                self.collection = self.http.get_collection("bench")

            def search(self, vector: np.ndarray, key: str | None = None) -> list[int]:
                reply = self.collection.query(
                    query_embeddings=[vector],
                    n_results=K,
                    where={key: 0} if key else None,
                    include=["distances"],
                )
                return [int(i) for i in reply["ids"][0]]

            def noop(self) -> object:
                return self.http.heartbeat()

        return Client(self.port)

    def version(self) -> str:
        import chromadb

        config = self.client().collection.configuration  # type: ignore[attr-defined]
        return f"chromadb {chromadb.__version__} (hnsw {dict(config.get('hnsw') or {})})"


class Milvus:
    """`milvus-server` (standalone, embedded etcd) through pymilvus's MilvusClient."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port, self.consistency = workdir, free_port(), "Bounded"
        self.ef = EF

    def set_ef(self, ef: int) -> None:
        self.ef = ef

    def start(self) -> None:
        log = self.workdir / "milvus.log"
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "milvus-server"),
                "--data",
                str(self.workdir / "milvus"),
                "--proxy-port",
                str(self.port),
            ],
            stdout=open(log, "w"),  # noqa: SIM115 - the server outlives this function
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        wait_until(lambda: self._client().has_collection("bench"), self.proc, log)

    def _client(self) -> Any:
        from pymilvus import MilvusClient  # type: ignore[import-untyped]

        return MilvusClient(uri=f"http://127.0.0.1:{self.port}", timeout=600)

    def stop(self) -> None:
        stop_tree(self.proc)

    def ingest(self, vectors: np.ndarray) -> None:
        from pymilvus import DataType

        client = self._client()
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        schema.add_field("s100", DataType.INT64)
        schema.add_field("s10", DataType.INT64)
        client.create_collection("bench", schema=schema, consistency_level="Bounded")
        for start in range(0, len(vectors), 10_000):
            ids = range(start, min(start + 10_000, len(vectors)))
            client.insert(
                "bench",
                [
                    {"id": i, "vec": vectors[i].tolist(), "s100": i % 100, "s10": i % 10}
                    for i in ids
                ],
            )
        client.flush("bench")
        index = client.prepare_index_params()
        index.add_index(
            field_name="vec",
            index_type="HNSW",
            metric_type="IP",
            params={"M": M, "efConstruction": EF_CONSTRUCTION},
        )
        client.create_index("bench", index, sync=True)
        self.ready()

    def ready(self) -> None:
        self._client().load_collection("bench")

    def client(self) -> SearchClient:
        outer = self

        class Client:
            def __init__(self) -> None:
                self.milvus = outer._client()

            def search(self, vector: np.ndarray, key: str | None = None) -> list[int]:
                reply = self.milvus.search(
                    "bench",
                    data=[vector.tolist()],
                    limit=K,
                    filter=f"{key} == 0" if key else "",
                    search_params={"metric_type": "IP", "params": {"ef": outer.ef}},
                    consistency_level=outer.consistency,
                )
                return [int(hit["id"]) for hit in reply[0]]

            def noop(self) -> object:
                return self.milvus.has_collection("bench")

        return Client()

    def version(self) -> str:
        import pymilvus

        return f"Milvus {self._client().get_server_version()} (pymilvus {pymilvus.__version__})"


def sequential(
    client: SearchClient, queries: np.ndarray, count: int, key: str | None = None
) -> tuple[dict[str, float], list[list[int]]]:
    """p50/p99/QPS of `count` searches one after another, and the ids found."""
    latencies, found = [], []
    started = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        ids = client.search(queries[i % len(queries)], key)
        latencies.append(time.perf_counter() - t0)
        if i < RECALL_QUERIES:
            found.append(ids)
    elapsed = time.perf_counter() - started
    return summary(latencies, elapsed), found


def concurrent(
    make_client: Callable[[], SearchClient],
    call: Callable[[SearchClient, int], object],
    seconds: float,
) -> dict[str, float]:
    """p50/p99/QPS of CLIENTS threads, each with its own sync client, calling for `seconds`."""
    clients = [make_client() for _ in range(CLIENTS)]
    for c in clients:
        call(c, 0)  # connect before the clock starts
    barrier = threading.Barrier(CLIENTS + 1)
    latencies: list[list[float]] = [[] for _ in clients]

    def worker(n: int) -> None:
        barrier.wait()
        stop_at = time.perf_counter() + seconds
        i = n * 7919
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            call(clients[n], i)
            latencies[n].append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return summary([x for per in latencies for x in per], time.perf_counter() - started)


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "qps": len(ms) / elapsed,
        "calls": len(ms),
    }


def measure(peer: Peer, queries: np.ndarray, seconds: float, seq_count: int) -> dict[str, Any]:
    """Searches of one server: sequential, CLIENTS at once, filtered (recall
    over the first min(seq_count, RECALL_QUERIES) queries)."""
    first = peer.client()
    for q in queries[:20]:  # warm-up
        first.search(q)
    out: dict[str, Any] = {}
    out["seq"], out["found"] = sequential(first, queries, seq_count)
    out["c8"] = concurrent(peer.client, lambda c, i: c.search(queries[i % len(queries)]), seconds)
    for label, key in SELECTIVITY_KEYS.items():
        out[f"filtered {label}"], out[f"found {label}"] = sequential(
            first, queries, min(seq_count, RECALL_QUERIES), key
        )
    return out


def drive(peer: Peer, workdir: Path, seconds: float, efs: list[int]) -> dict[str, Any]:
    """The whole measurement of one server: ingest, restart, searches, RSS."""
    vectors = np.load(workdir / "vectors.npy", mmap_mode="r")
    queries = np.load(workdir / "queries.npy")
    peer.start()
    started = time.perf_counter()
    peer.ingest(vectors)
    peer.client().search(queries[0])
    ingest_s = time.perf_counter() - started
    peer.stop()
    started = time.perf_counter()
    peer.start()
    peer.ready()
    first = peer.client()
    wait_until(lambda: first.search(queries[0]), peer.proc, workdir / "none")
    out: dict[str, Any] = {"ingest_s": ingest_s, "startup_s": time.perf_counter() - started}
    try:
        out["version"] = peer.version()
        out |= measure(peer, queries, seconds, 500)
        out["noop"] = concurrent(peer.client, lambda c, i: c.noop(), seconds / 2)
        out["rss"] = tree_rss(peer.pid)
        if isinstance(peer, Milvus):
            # Read-your-writes costs Milvus a wait for its time tick per search.
            peer.consistency = "Strong"
            out["strong"] = measure(peer, queries, seconds, STRONG_QUERIES)
            peer.consistency = "Bounded"
        # Wider searches on the same server, to compare at equal recall.
        out["ef"] = {}
        for ef in efs:
            if ef != EF:
                peer.set_ef(ef)
                out["ef"][str(ef)] = measure(peer, queries, seconds, 500)
    finally:
        peer.stop()
    return out


def driver_main(system: str, workdir: Path, seconds: float, efs: list[int]) -> None:
    (workdir / system).mkdir(exist_ok=True)
    peers: dict[str, Callable[[Path], Peer]] = {
        "rag-grpc": RagGrpc,
        "chroma": Chroma,
        "milvus": Milvus,
    }
    peer = peers[system](workdir / system)
    result = drive(peer, workdir, seconds, efs)
    (workdir / f"{system}.json").write_text(json.dumps(result))


# -- the orchestrator side: data, venvs, tables ------------------------------


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
    parser = argparse.ArgumentParser(description=__doc__)
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
