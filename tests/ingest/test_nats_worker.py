"""The NATS ingestion worker (rag_grpc/ingest/nats_worker.py) against real
NATS JetStream servers: what a killed worker held goes to another worker once,
a job survives its consumer's leader dying, a document that fails every try
fails alone after max_deliver, and a document counted before its worker died
is acknowledged, not worked again, when it comes back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import ServerThread, wait_for
from tests.ingest.nats_setup import (
    Nats,
    counts,
    documents,
    holds,
    nats_cluster,
    on_nats,
    run_on,
    worker_config,
)

# Starts NATS servers (and clusters of them).
pytestmark = pytest.mark.slow


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
