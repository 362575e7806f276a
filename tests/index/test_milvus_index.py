"""index.backend = "milvus" against a real Milvus standalone server (PyPI
`milvus` 2.3.5, installed into build/milvus-venv on first use): the same
Search, filter, delete, forget, TTL, restart and read-your-writes contract
as the native index, through a real rag-grpc server.

One Milvus serves the whole module (it binds etcd's fixed ports 2379/2380:
run these tests serially); each test writes its own collection prefix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymilvus  # type: ignore[import-untyped]
import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from rag_grpc.errors import FailedPrecondition, Unavailable
from rag_grpc.filters import And, AnyOf, Equals, Or, Range
from rag_grpc.index.milvus_filter import filter_expression
from tests.conftest import CORPUS, ROOT, ServerThread, free_port, make_settings

MILVUS_VENV = ROOT / "build" / "milvus-venv"
MILVUS_PIN = "milvus==2.3.5"

# Starts a milvus-server.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def milvus_server_binary() -> Path:
    """build/milvus-venv/bin/milvus-server, installed with pip on first use."""
    binary = MILVUS_VENV / "bin" / "milvus-server"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MILVUS_VENV)], check=True)
        subprocess.run(
            [str(MILVUS_VENV / "bin" / "pip"), "install", "-q", MILVUS_PIN],
            check=True,
            timeout=900,
        )
    return binary


def descendants(pid: int) -> list[int]:
    """Every process below pid (milvus-server's wrapper starts the real one)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class MilvusServer:
    """`milvus-server --data DIR --proxy-port P`, stopped by PID, child included."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / "milvus.log"

    def start(self) -> MilvusServer:
        self.proc = subprocess.Popen(
            [
                str(milvus_server_binary()),
                "--data",
                str(self.data_dir),
                "--proxy-port",
                str(self.port),
            ],
            stdout=open(self.log, "wb"),  # noqa: SIM115 - the server outlives this call
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited: {self.log.read_text()[-3000:]}")
            try:
                client = pymilvus.MilvusClient(uri=self.uri, timeout=3)
                client.list_collections()
                client.close()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.5)

    def client(self) -> Any:
        return pymilvus.MilvusClient(uri=self.uri, timeout=30)

    def stop(self) -> None:
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in pids[1:]):
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    root = tmp_path_factory.mktemp("milvus")
    server = MilvusServer(root / "data").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def milvus_server(
    milvus: MilvusServer, start_server: Callable[..., ServerThread], request: pytest.FixtureRequest
) -> Callable[..., ServerThread]:
    """Start rag-grpc servers on index.backend = "milvus", with this test's collection."""
    prefix = "t_" + request.node.name.replace("[", "_").replace("]", "")[:60]

    def start(data_dir: Path | None = None, **overrides: Any) -> ServerThread:
        milvus_cfg = {"uri": milvus.uri, "collection_prefix": prefix, **overrides.pop("milvus", {})}
        index = {**overrides.pop("index", {}), "backend": "milvus", "milvus": milvus_cfg}
        return start_server(data_dir, index=index, **overrides)

    return start


def collection_labels(milvus: MilvusServer, prefix: str, namespace: str) -> list[int]:
    client = milvus.client()
    rows = client.query(
        f"{prefix}_d384",
        filter=f'namespace == "{namespace}"',
        output_fields=["label"],
        consistency_level="Strong",
    )
    client.close()
    return sorted(int(r["label"]) for r in rows)


def ids(hits: Any) -> list[str]:
    return [h.document_id for h in hits]


def test_search_filters_delete_forget_restart(
    milvus: MilvusServer,
    milvus_server: Callable[..., ServerThread],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    server = milvus_server()
    prefix = server.settings.index.milvus.collection_prefix
    with RagClient(server.target, timeout=60) as client:
        written = client.upsert(CORPUS)
        assert written.documents == 5
        # Read-your-writes: the search right after the upsert sees it (Strong).
        hits = client.search("Which mountain in Sicily erupts?", k=3, mode="dense")
        assert hits[0].document_id == "volcano"
        # A dense score is the cosine similarity, as with the native index.
        assert 0.3 < hits[0].score <= 1.0
        vector = client.embed(["brewing coffee under pressure"])[0]
        assert client.search(vector, k=1)[0].document_id == "espresso"
        assert len(collection_labels(milvus, prefix, "default")) == written.chunks

        # Filters run inside Milvus, with the payload index's semantics.
        assert ids(client.search("anything", k=5, filter=Equals("topic", "food"))) == ["espresso"]
        reviewed = set(ids(client.search("science", k=5, filter=Equals("reviewed", True))))
        assert reviewed == {"volcano", "photosynthesis", "gil"}
        recent = set(ids(client.search("science", k=5, filter=Range("year", gte=2021))))
        assert recent == {"photosynthesis", "espresso", "gil"}
        either = client.search(
            "science",
            k=5,
            filter=Or((AnyOf("topic", ("games", "food")), And((Equals("year", 2019),)))),
        )
        assert set(ids(either)) == {"chess", "espresso", "volcano"}
        assert client.search("science", k=5, filter=Equals("year", "2019")) == []
        by_doc = client.search("lava and coffee", k=2, by_document=True, chunks_per_document=2)
        assert len(set(ids(by_doc))) == 2
        hybrid = client.search("chess pieces king queen", k=3, mode="hybrid")
        assert hybrid[0].document_id == "chess"
        lexical = client.search("chess", k=3, mode="lexical", filter=Equals("topic", "games"))
        assert ids(lexical) == ["chess"]

        # Delete: gone from searches and from Milvus at once.
        before = collection_labels(milvus, prefix, "default")
        client.delete(["chess"])
        assert "chess" not in ids(client.search("board game with a king and pawns", k=5))
        after = collection_labels(milvus, prefix, "default")
        assert len(after) < len(before)
        # Forget: deleted, flushed and compacted in Milvus.
        client.delete(["espresso"], forget=True)
        assert "espresso" not in ids(client.search("coffee", k=5))
        remaining = collection_labels(milvus, prefix, "default")
        assert len(remaining) < len(after)
        expected = client.search("volcanic ash", k=3)
    data_dir = server.settings.data_dir
    server.stop()

    # Restart: the collection is kept; a chunk Milvus lost (a crash between
    # the SQLite commit and Milvus) is put back from the store at start.
    lost = remaining[0]
    direct = milvus.client()
    direct.delete(f"{prefix}_d384", ids=[lost])
    direct.close()
    again = milvus_server(data_dir)
    with RagClient(again.target, timeout=60) as client:
        assert client.search("volcanic ash", k=3) == expected
        assert collection_labels(milvus, prefix, "default") == remaining
        # An upsert that replaces a document replaces its vectors.
        client.upsert([Document("gil", "Espresso crema and coffee beans.", {"topic": "food"})])
        assert client.search("coffee crema", k=1)[0].document_id == "gil"
        assert ids(client.search("x", k=5, filter=Equals("topic", "computing"))) == []


def test_session_consistency_reads_this_process_writes(
    milvus_server: Callable[..., ServerThread],
) -> None:
    # The writer is the only searcher: Session gives it read-your-writes
    # without Strong's wait for a time tick (docs/milvus.md).
    server = milvus_server(
        index={"result_cache_entries": 0}, milvus={"consistency_level": "Session"}
    )
    with RagClient(server.target, timeout=60) as client:
        for doc in CORPUS:
            client.upsert([doc])
            assert client.search(doc.text[:60], k=1, mode="dense")[0].document_id == doc.id
            client.delete([doc.id])
            assert doc.id not in ids(client.search(doc.text[:60], k=5, mode="dense"))


def test_filters_keep_kinds_apart(milvus_server: Callable[..., ServerThread]) -> None:
    server = milvus_server()
    docs = [
        Document("int", "the number three as an integer", {"n": 3, "tag": 'a"b\\c é😀'}),
        Document("float", "the number three as a float", {"n": 3.0}),
        Document("text", "the number three as text", {"n": "3"}),
        Document("bool", "the number one as a boolean", {"n": True}),
        Document("none", "no metadata at all"),
    ]
    with RagClient(server.target, timeout=60) as client:
        client.upsert(docs, namespace="kinds")

        def found(flt: Any) -> set[str]:
            # Dense: the filter runs in Milvus alone (lexical: the payload index).
            # The text names the filter: Equals("n", True) == Equals("n", 1) as
            # Python dataclasses, so the result cache would answer one for the other.
            text = f"number {flt!r}"
            hits = client.search(text, k=10, namespace="kinds", filter=flt, mode="dense")
            return set(ids(hits))

        assert found(Equals("n", 3)) == {"int", "float"}
        assert found(Equals("n", "3")) == {"text"}
        assert found(Equals("n", True)) == {"bool"}
        assert found(Equals("n", 1)) == set()
        assert found(AnyOf("n", ("3", True))) == {"text", "bool"}
        assert found(Range("n", gt=2.5, lte=3)) == {"int", "float"}
        assert found(Range("n", gte=float("-inf"))) == {"int", "float"}
        assert found(Equals("tag", 'a"b\\c é😀')) == {"int"}
        assert found(Equals("missing", "x")) == set()


def test_retention_deletes_from_milvus(
    milvus: MilvusServer, milvus_server: Callable[..., ServerThread]
) -> None:
    server = milvus_server(retention={"ttl_s": {"ephemeral": 1.0}, "sweep_interval_s": 0.2})
    prefix = server.settings.index.milvus.collection_prefix
    with RagClient(server.target, timeout=60) as client:
        client.upsert(CORPUS[:2], namespace="ephemeral")
        assert collection_labels(milvus, prefix, "ephemeral")
        deadline = time.monotonic() + 30
        while client.search("volcano", k=5, namespace="ephemeral"):
            assert time.monotonic() < deadline, "retention did not delete the documents"
            time.sleep(0.3)
        assert collection_labels(milvus, prefix, "ephemeral") == []


def test_a_reader_replica_searches_what_the_writer_wrote(
    milvus: MilvusServer, milvus_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    writer = milvus_server(tmp_path / "writer")
    with RagClient(writer.target, timeout=60) as client:
        client.upsert(CORPUS)
    # A replica that applied the same writes to its own store (here: the
    # same documents in the same order, so the same labels) reads Milvus
    # and writes nothing to it.
    reader = milvus_server(tmp_path / "reader", milvus={"writer": False})
    prefix = writer.settings.index.milvus.collection_prefix
    held = collection_labels(milvus, prefix, "default")
    with RagClient(reader.target, timeout=60) as client:
        client.upsert(CORPUS)
        assert collection_labels(milvus, prefix, "default") == held
        assert client.search("espresso crema", k=1)[0].document_id == "espresso"
        client.delete(["espresso"])
        assert collection_labels(milvus, prefix, "default") == held


def start_fails(settings: Any) -> None:
    """Start a server that must fail; its loop is stopped either way."""
    server = ServerThread(settings)
    try:
        server.start()
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(timeout=10)


def test_unreachable_milvus_fails_at_start(tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(
        tmp_path / "data",
        index={"backend": "milvus", "milvus": {"uri": f"http://127.0.0.1:{port}", "timeout_s": 2}},
    )
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        start_fails(settings)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "index.milvus.uri" in message
    assert time.monotonic() - started < 60


def test_a_reader_without_the_collection_refuses_to_start(
    milvus: MilvusServer, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path / "data",
        index={
            "backend": "milvus",
            "milvus": {"uri": milvus.uri, "collection_prefix": "nobody", "writer": False},
        },
    )
    with pytest.raises(FailedPrecondition, match="writer"):
        start_fails(settings)


def test_filter_expressions_quote_and_group() -> None:
    assert filter_expression(Equals("k", "v")) == 'meta["s:k"] == "v"'
    assert filter_expression(AnyOf("k", (1, 2.5, "x"))) == (
        '(meta["n:k"] in [1.0, 2.5]) or (meta["s:k"] == "x")'
    )
    assert filter_expression(Range("k", gte=1, lt=2)) == 'meta["n:k"] >= 1.0 and meta["n:k"] < 2.0'
    assert filter_expression(And((Equals("a", True), Equals("b", '"')))) == (
        '(meta["b:a"] == true) and (meta["s:b"] == "\\"")'
    )
