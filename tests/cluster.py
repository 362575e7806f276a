"""The deployment as processes on loopback, for chaos tests and the soak
benchmark: a 3-node NATS JetStream cluster, retrieval replicas (`rag-grpc
serve` with retrieval and admin, each its own data dir, following the write
log), ingestion workers (`rag-grpc serve` with ingestion, pulling the job
queue, keeping no store) and Envoy (envoy/render.py's configuration) in front
of the replicas.

One file: it is the one deployment (`Cluster`, its members and gateway) and
what the tests that start it do to it (load, waits, counts on each replica);
tests/test_chaos.py and bench/chaos.py (the soak benchmark) use them together.

Built from the helpers the other tests use: `Nats` and `worker_config`
(tests/ingest/nats_setup.py), `ServerProcess` (tests/conftest.py), `Envoy`
(tests/envoy_server.py).

`ReplicaGateway` changes envoy/render.py's output in three ways, each until
render.py does it itself (then the change finds it done and adds nothing):
- render.py takes one `--upstream`: the other replicas join the `stable`
  cluster's endpoints;
- retries go to another replica (`previous_hosts`): without it a retry may
  land on the dead replica again, and a Search failed with UNAVAILABLE
  ("retried and the latest reset reason: remote connection failure") in about
  one run of ten of tests/test_chaos.py, each time when outlier detection let
  the dead replica back after its ejection time;
- active health checks every 2 s from the start (`no_traffic_interval`):
  Envoy's default of 60 s applies until the cluster has had traffic, so a
  replica killed in Envoy's first minute was found only by outlier detection,
  which readmits it every ejection period.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import ROOT, ServerProcess
from tests.envoy_server import NO_LIMITS, Envoy
from tests.ingest.nats_setup import Nats, counts, worker_config

JOBS_STREAM = "RAG_JOBS"  # ingestion.nats_prefix "RAG"
JOBS_CONSUMER = "rag-ingest"  # the workers' shared durable consumer
WRITES_STREAM = "RAG_WRITES"


PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}


def write_json(path: Path, content: Any) -> None:
    """Write then rename: Envoy watches the CDS file's directory."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


class ReplicaGateway(Envoy):
    """Envoy rendered by envoy/render.py with every replica in its `stable`
    cluster, retries to another replica, health checks from the start (see
    the module's docstring)."""

    def __init__(self, workdir: Path, certs: Path, upstreams: list[str]) -> None:
        self.upstreams = upstreams
        super().__init__(workdir, certs, upstreams[0], *NO_LIMITS)

    def render(self, *args: str) -> None:
        super().render(*args)
        cds = self.config.with_name(self.config.name.split(".")[0] + ".cds.json")
        resources = json.loads(cds.read_text())
        (stable,) = [c for c in resources["resources"] if c["name"] == "stable"]
        stable["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(p)}}}}
            for host, p in (u.rsplit(":", 1) for u in self.upstreams)
        ]
        for check in stable["health_checks"]:
            check.setdefault("no_traffic_interval", check["interval"])
        write_json(cds, resources)
        bootstrap = json.loads(self.config.read_text())
        for listener in bootstrap["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                for network_filter in chain["filters"]:
                    routes = network_filter["typed_config"]["route_config"]["virtual_hosts"]
                    for route in (r for host in routes for r in host["routes"]):
                        retry = route.get("route", {}).get("retry_policy")
                        if retry is not None and "retry_host_predicate" not in retry:
                            retry["retry_host_predicate"] = [PREVIOUS_HOSTS]
                            retry["host_selection_retry_max_attempts"] = 3
        write_json(self.config, bootstrap)

    def hosts(self) -> dict[str, dict[str, str]]:
        """Per replica (HOST:PORT) of the stable cluster, Envoy's view: health
        flags and request counters, from the admin /clusters page."""
        out: dict[str, dict[str, str]] = {}
        for line in self.admin("/clusters").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "stable":
                out.setdefault(parts[1], {})[parts[2]] = parts[3]
        return out

    def healthy(self, target: str) -> bool:
        """Whether Envoy would route to this replica now."""
        return self.hosts().get(target, {}).get("health_flags") == "healthy"

    def successes(self, target: str) -> int:
        """Calls this replica answered through Envoy."""
        return int(self.hosts().get(target, {}).get("rq_success", "0"))


@dataclass
class Member:
    """A `rag-grpc serve` process of the deployment, restartable on its port and data."""

    name: str
    data_dir: Path
    args: tuple[str, ...]
    process: ServerProcess | None = None
    port: int | None = None

    def start(self) -> Member:
        self.process = ServerProcess(self.data_dir, *self.args, port=self.port)
        self.port = self.process.port
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.proc.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no save."""
        assert self.process is not None
        self.process.stop(sig=signal.SIGKILL, timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.stop(sig=signal.SIGTERM, timeout=30)


class Cluster:
    """The deployment: `nats` (3 JetStream nodes), `replicas`, `workers`, `gateway`."""

    def __init__(
        self,
        work: Path,
        certs: Path,
        *,
        replicas: int = 3,
        workers: int = 2,
        batch_documents: int = 10,
        ack_wait_s: float = 5.0,
    ) -> None:
        self.work = work
        self.certs = certs
        self.nats = [Nats(work / f"nats{i}", f"n{i}") for i in range(1, 4)]
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nats)
        for node in self.nats:
            node.cluster = routes
        urls = ",".join(n.url for n in self.nats)
        work.mkdir(parents=True, exist_ok=True)
        common = {"nats_replicas": 3, "batch_documents": batch_documents, "ack_wait_s": ack_wait_s}
        # Replicas: follow the write log, serve searches; no worker (they do
        # not serve IngestionService).
        replica_config = worker_config(work, urls, **common)
        # Workers: take documents from the queue; no store of their own, so a
        # redelivered document is embedded and written again, never skipped.
        worker_toml = worker_config(work, urls, apply=False, **common)
        self.replicas = [
            Member(f"replica{i}", work / f"replica{i}" / "data",
                   ("--config", str(replica_config), "--services", "retrieval,admin"))
            for i in range(1, replicas + 1)
        ]  # fmt: skip
        self.workers = [
            Member(f"worker{i}", work / f"worker{i}" / "data",
                   ("--config", str(worker_toml), "--services", "ingestion"))
            for i in range(1, workers + 1)
        ]  # fmt: skip
        self.gateway: ReplicaGateway | None = None

    def start(self) -> Cluster:
        for node in self.nats:
            node.work.mkdir(parents=True, exist_ok=True)
            node.start()
        members = [*self.replicas, *self.workers]
        # Started side by side: each loads the embedding model (seconds).
        errors: list[BaseException] = []

        def start(member: Member) -> None:
            try:
                member.start()
            except BaseException as exc:  # raised below, in the caller
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(m,)) for m in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        gateway_dir = self.work / "envoy"
        gateway_dir.mkdir(exist_ok=True)
        self.gateway = ReplicaGateway(gateway_dir, self.certs, [r.target for r in self.replicas])
        wait_until(lambda: all(self.gateway_view().healthy(r.target) for r in self.replicas))
        return self

    def gateway_view(self) -> ReplicaGateway:
        assert self.gateway is not None
        return self.gateway

    def client(self, timeout: float = 10) -> RagClient:
        """A client of the gateway (mutual TLS with the test client certificate)."""
        return self.gateway_view().client(self.certs, timeout=timeout)

    @property
    def nats_urls(self) -> list[str]:
        return [n.url for n in self.nats if n.proc is not None and n.proc.poll() is None]

    def jetstream(self, request: Callable[[Any], Any]) -> Any:
        """Ask JetStream (through the live nodes) and return the answer;
        `request` gets the JetStream context and returns an awaitable."""
        import nats

        async def ask() -> Any:
            nc = await nats.connect(
                servers=self.nats_urls, connect_timeout=2, max_reconnect_attempts=1
            )
            try:
                return await request(nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(ask())

    def consumer(self) -> Any:
        """The job queue's consumer info (leader, ack-pending), retried while electing."""
        return retrying(
            lambda: self.jetstream(lambda js: js.consumer_info(JOBS_STREAM, JOBS_CONSUMER))
        )

    def node(self, name: str) -> Nats:
        (found,) = [n for n in self.nats if n.name == name]
        return found

    def stream_info(self, stream: str) -> Any:
        return self.jetstream(lambda js: js.stream_info(stream))

    def nats_in_step(self) -> bool:
        """Every JetStream stream has all its peers current and online."""
        for stream in (JOBS_STREAM, WRITES_STREAM):
            info = retrying(partial(self.stream_info, stream))
            peers = info.cluster.replicas or []
            if len(peers) != 2 or not all(p.current and not p.offline for p in peers):
                return False
        return True

    def pids(self) -> dict[str, int]:
        """Live processes of the deployment by name."""
        out = {m.name: m.pid for m in [*self.replicas, *self.workers] if m.alive()}
        for node in self.nats:
            if node.proc is not None and node.proc.poll() is None:
                out[f"nats-{node.name}"] = node.proc.pid
        gateway = self.gateway
        if gateway is not None and gateway.proc.poll() is None:
            out["envoy"] = gateway.proc.pid
        return out

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for member in [*self.workers, *self.replicas]:
            if member.alive():
                assert member.process is not None
                member.process.stop(sig=signal.SIGKILL, timeout=10)
        for node in self.nats:
            node.stop()


def retrying(ask: Callable[[], Any], timeout: float = 60) -> Any:
    """ask(), retried while a NATS cluster elects a leader (errors, timeouts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ask()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_until(predicate: Callable[[], bool], timeout: float = 120) -> None:
    """Poll until predicate() holds (a predicate that raises counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, RpcError):
            pass
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def submit(worker: Member, docs: list[Document]) -> str:
    """Submit a job to a worker, retried while NATS answers UNAVAILABLE."""
    with RagClient(worker.target, timeout=60) as client:
        return str(retrying(lambda: client.submit(docs)))


def job(worker: Member, job_id: str) -> Any:
    """The job's status as a worker reports it, retried while NATS elects."""
    with RagClient(worker.target, timeout=10) as client:
        return retrying(lambda: client.get_job(job_id))


def replica_counts(member: Member) -> dict[str, tuple[int, int]]:
    """(documents, vectors) per namespace on one replica, asked directly."""
    with RagClient(member.target, timeout=10) as client:
        return counts(client)


def holding(member: Member, expected: dict[str, tuple[int, int]]) -> Callable[[], bool]:
    """A wait_until condition: the replica holds these (documents, vectors) per namespace."""
    return lambda: replica_counts(member) == expected


def missing_on(member: Member, ids: list[str]) -> list[str]:
    """The ids this replica does not hold (Get, directly, in slices)."""
    missing: list[str] = []
    with RagClient(member.target, timeout=30) as client:
        for start in range(0, len(ids), 500):
            missing += client.get(ids[start : start + 500])[1]
    return missing


@dataclass
class SearchLoad:
    """Steady Search load through the gateway: `threads` clients, each calling
    in a loop with `pause_s` between calls; every call's status and latency kept."""

    cluster: Cluster
    threads: int = 3
    pause_s: float = 0.02
    queries: tuple[str, ...] = ("hot lava", "coffee beans", "chess openings", "sea tides")
    calls: list[tuple[float, float, str]] = field(default_factory=list)  # (start, ms, status)
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (time, code, message)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, index: int) -> None:
        with self.cluster.client(timeout=10) as client:
            i = index
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    client.search(self.queries[i % len(self.queries)], k=5)
                    status = "OK"
                except RpcError as exc:
                    status = exc.code
                    with self._lock:
                        self.failures.append((time.time(), exc.code, exc.message))
                elapsed = (time.monotonic() - started) * 1000
                with self._lock:
                    self.calls.append((started, elapsed, status))
                i += 1
                self._stop.wait(self.pause_s)

    def statuses(self) -> Counter[str]:
        with self._lock:
            return Counter(status for _, _, status in self.calls)

    def ok_calls(self) -> int:
        return self.statuses()["OK"]

    @contextmanager
    def running(self) -> Iterator[SearchLoad]:
        workers = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        for t in workers:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in workers:
                t.join(30)


def make_certs(directory: Path) -> Path:
    """envoy/certs.sh's dev CA and certificates (Envoy's, the test client's)."""
    if not (directory / "ca.pem").exists():
        subprocess.run(
            [str(ROOT / "envoy" / "certs.sh"), str(directory)], check=True, capture_output=True
        )
    return directory


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
