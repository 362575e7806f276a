"""Fixtures: real rag-grpc servers on free ports with temporary data dirs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient
from rag_grpc.config import Settings, load_settings
from rag_grpc.documents import Document, Hit
from rag_grpc.generate.base import AskEvent, AskFinished, Citations, Delta
from rag_grpc.server import RagServer

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "all-MiniLM-L6-v2"
# Model exports shared by every test server (keyed by source hash, so never stale).
EXPORT_DIR = ROOT / "build" / "test-model-exports"
BIN = Path(sys.executable).parent

# Five documents on unrelated subjects, so the right answer to a question is clear.
CORPUS = [
    Document(
        "volcano",
        "A volcano is a rupture in the crust of a planet that lets hot lava, volcanic ash and "
        "gases escape from a magma chamber below the surface. Eruptions can be explosive or "
        "effusive. Mount Etna in Sicily is one of the most active volcanoes in Europe.",
        {"topic": "geology", "year": 2019, "reviewed": True},
    ),
    Document(
        "photosynthesis",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon "
        "dioxide to make glucose and release oxygen. It takes place in the chloroplasts, where "
        "chlorophyll absorbs light energy.",
        {"topic": "biology", "year": 2021, "reviewed": True},
    ),
    Document(
        "chess",
        "Chess is a board game for two players. Each player starts with sixteen pieces: a king, "
        "a queen, two rooks, two bishops, two knights and eight pawns. The goal is to checkmate "
        "the opponent's king.",
        {"topic": "games", "year": 2015, "reviewed": False},
    ),
    Document(
        "espresso",
        "Espresso is coffee brewed by forcing a small amount of nearly boiling water under about "
        "nine bars of pressure through finely ground coffee beans. A good shot has a layer of "
        "crema on top.",
        {"topic": "food", "year": 2022, "reviewed": False},
    ),
    Document(
        "gil",
        "The global interpreter lock in CPython is a mutex that allows only one thread to execute "
        "Python bytecode at a time. Extensions can release the GIL around long computations so "
        "other threads may run.",
        {"topic": "computing", "year": 2023, "reviewed": True},
    ),
]


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, a free port, the prepared model."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "embedding": {"model_dir": MODEL_DIR, "export_dir": EXPORT_DIR},
        "server": {"grace_period_s": 2.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


class ServerThread:
    """A RagServer running on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = RagServer(settings)
        self.port = 0

    def start(self) -> ServerThread:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        self.port = future.result(timeout=120)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop)
        future.result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers (default data dir tmp_path/data); all are stopped at teardown."""
    started: list[ServerThread] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> ServerThread:
        settings = make_settings(data_dir or tmp_path / "data", **overrides)
        server = ServerThread(settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """A server with all services on a fresh data dir."""
    return start_server()


@pytest.fixture
def client(server: ServerThread) -> Iterator[RagClient]:
    """A client of `server`."""
    with RagClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture
def seeded(client: RagClient) -> RagClient:
    """The client, with CORPUS upserted into the default namespace."""
    client.upsert(CORPUS)
    return client


def ask_summary(events: Iterable[AskEvent]) -> AskFinished:
    """The summary an Ask stream ends with; fails if it ended with anything else."""
    *_, last = events
    assert isinstance(last, AskFinished), f"the Ask stream ended with {last!r}, not its summary"
    return last


def ask_citations(events: Sequence[AskEvent]) -> list[Hit]:
    """The passages an Ask stream starts with (cited as [n] by position from 1);
    fails if it started with anything else."""
    first = events[0]
    assert isinstance(first, Citations), f"the Ask stream started with {first!r}, not its citations"
    return first.hits


def ask_answer(events: Iterable[AskEvent]) -> str:
    """The answer's text: the Delta pieces of an Ask stream joined."""
    return "".join(e.text for e in events if isinstance(e, Delta))


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    """A command installed in this environment (the venv's bin first); fails if absent."""
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} is not installed; run `make install-test`"
    return path


def health_status(target: str, service: str = "") -> int:
    """The grpc.health.v1 status a plaintext server at target reports for service
    ("" is the whole server), as probes and gateways see it."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Poll predicate every 0.1 s until it holds; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


class ServerProcess:
    """`rag-grpc serve` as a child process, for signals and restarts."""

    def __init__(self, data_dir: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        env = {
            **os.environ,
            "RAG_GRPC_EMBEDDING__MODEL_DIR": str(MODEL_DIR),
            "RAG_GRPC_EMBEDDING__EXPORT_DIR": str(EXPORT_DIR),
            "RAG_GRPC_SERVER__GRACE_PERIOD_S": "5",
        }
        self.log = data_dir.parent / f"server-{self.port}.log"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                tool("rag-grpc"),
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(data_dir),
                *args,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.wait_ready()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            with grpc.insecure_channel(self.target) as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    pass
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log_file.close()
        return code


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `rag-grpc serve` processes; any left running are killed at teardown."""
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, *args: str, port: int | None = None) -> ServerProcess:
        proc = ServerProcess(data_dir or tmp_path / "data", *args, port=port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop(sig=9)
