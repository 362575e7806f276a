"""A replica following the NATS write log (rag_grpc/ingest/log_follower.py),
against a real NATS JetStream server: it catches up from the position it
committed, starts from the position a backup holds, stops (and says how to
recover) when the log's retention dropped entries it had not applied, and
skips entries that cannot be applied without stalling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import nats
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from rag_grpc.client import RagClient, RpcError
from tests.conftest import CORPUS, ServerThread, health_status, wait_for
from tests.ingest.nats_setup import (
    Nats,
    answers,
    counts,
    documents,
    holds,
    on_nats,
    stream_state,
)

# Starts NATS servers (and clusters of them).
pytestmark = pytest.mark.slow


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


def test_a_replica_behind_the_logs_retention_stops_and_a_peers_backup_brings_it_back(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    from tests.cli.command import cli

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


def publish_raw(url: str, subject: str, payloads: list[bytes]) -> None:
    """Publish straight onto the write log, as a buggy or hostile writer could."""

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for payload in payloads:
            await js.publish(subject, payload)
        await nc.close()

    asyncio.run(run())


def vector_b64(values: np.ndarray) -> str:
    import base64

    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode()


def test_log_entries_that_cannot_apply_are_skipped_and_later_ones_applied(
    start_server: Callable[..., ServerThread], nats_node: Nats, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(data, **on_nats(nats_node.url))
    ingestion = server.server.nats
    assert ingestion is not None
    wait_for(ingestion.connected.is_set)
    unit = np.zeros(384, np.float32)
    unit[0] = 1.0
    good_doc = {"id": "d", "text": "text", "metadata": {}, "type": ""}
    forged = [
        b"not json at all",
        json.dumps({"op": "delete", "namespace": "default", "ids": [""]}).encode(),
        json.dumps({"op": "delete", "namespace": "default", "ids": ["x"] * 100_000}).encode(),
        # A namespace that would name a file outside the index directory.
        json.dumps(
            {
                "op": "upsert",
                "namespace": "../escape",
                "documents": [good_doc],
                "chunks": [["d", 0, "text", vector_b64(unit)]],
            }
        ).encode(),
        json.dumps(
            {
                "op": "upsert",
                "namespace": "default",
                "documents": [good_doc],
                "chunks": [["d", 0, "text", vector_b64(unit[:100])]],
            }
        ).encode(),
        json.dumps(
            {
                "op": "upsert",
                "namespace": "default",
                "documents": [good_doc],
                "chunks": [["d", 0, "text", vector_b64(np.full(384, np.nan, np.float32))]],
            }
        ).encode(),
        json.dumps({"op": "drop-everything", "namespace": "default"}).encode(),
    ]
    publish_raw(nats_node.url, ingestion.writes_subject, forged)
    with RagClient(server.target) as client:
        # A write published after them is applied: the replica did not stall.
        client.upsert(CORPUS[:2])
        assert {h.document_id for h in client.search("lava", k=5)} == {
            CORPUS[0].id,
            CORPUS[1].id,
        }
        assert ingestion.apply_errors == len(forged)
        assert "../escape" not in server.server.store.namespaces()  # type: ignore[union-attr]
        assert not list(tmp_path.glob("escape*")) and not list(data.glob("escape*"))
        assert client.get(["d"])[1] == ["d"]
    server.stop()
    # Skipped for good: a restarted replica does not meet them again.
    again = start_server(data, **on_nats(nats_node.url))
    assert again.server.nats is not None
    wait_for(again.server.nats.connected.is_set)
    with RagClient(again.target) as client:
        client.upsert(CORPUS[2:3])
        assert client.get([CORPUS[2].id])[0]
    assert again.server.nats.apply_errors == 0
