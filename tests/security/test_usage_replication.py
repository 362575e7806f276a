"""Usage replicated through the NATS write log: each replica publishes its
counters in batches, every replica adds every batch once, so all report the
same totals; a restart neither loses nor doubles them; a forged usage entry
is refused and the log goes on."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument
from rag_grpc.ingest.log_entries import decode_entry, encode_usage
from rag_grpc.ingest.nats_log import NatsIngestion
from rag_grpc.security.model import TenantUsage
from rag_grpc.security.usage import MAX_BATCH_COUNT, UsageBatch, UsageLedger
from tests.conftest import ServerThread, wait_for
from tests.ingest.nats_setup import Nats, nats_server, on_nats
from tests.security.tenants import member, write_policy

__all__ = ["nats_server"]  # the fixture, used by name

ACME = member("acme", "admin", "acme-admin")
GLOBEX = member("globex", "admin", "globex-admin")
LOG = "nats:RAG_WRITES"
COUNTED = ("embedding_tokens", "prompt_tokens", "completion_tokens", "searches", "asks")


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def counters(client: RagClient) -> dict[str, int]:
    """The caller's tenant's counters and stored sizes, as AdminService.Usage reports them
    (the estimated cost of today moves with the clock, so it is left out)."""
    (report,) = client.usage()
    fields = (*COUNTED, "documents", "vectors", "stored_bytes")
    return {name: getattr(report, name) for name in fields}


def same_usage(*clients: RagClient, **expected: int) -> Callable[[], bool]:
    """A wait_for condition: every client's server reports the same usage, with these values."""

    def check() -> bool:
        seen = [counters(c) for c in clients]
        return all(s == seen[0] for s in seen) and all(seen[0][k] == v for k, v in expected.items())

    return check


def publish(url: str, entries: list[object]) -> None:
    """Publish raw entries straight to the write log, as anyone holding NATS credentials could."""

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for entry in entries:
            data = entry if isinstance(entry, bytes) else json.dumps(entry).encode()
            await js.publish("rag.writes", data)
        await nc.close()

    asyncio.run(run())


# -- the ledger and the entry format, without a server -----------------------


def test_a_batch_is_added_once_by_its_log_sequence_even_after_a_reopen(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db", replicated=True)
    batch = UsageBatch("b1", {("acme", "2026-12-01"): {"searches": 3, "asks": 1}})
    assert ledger.apply_batch(batch, LOG, 5)
    # The store's position is set after this commit: a crash between the two
    # replays the entry, and the ledger's own position skips it.
    assert not ledger.apply_batch(batch, LOG, 5)
    assert not ledger.apply_batch(UsageBatch("b0", batch.counts), LOG, 4)
    ledger.close()
    reopened = UsageLedger(tmp_path / "usage.db", replicated=True)
    assert not reopened.apply_batch(batch, LOG, 5)
    assert reopened.position(LOG) == 5
    assert reopened.totals("acme")["acme"] == TenantUsage(searches=3, asks=1)
    reopened.close()


def test_replicated_counts_wait_in_the_outbox_until_they_come_back_from_the_log(
    tmp_path: Path,
) -> None:
    ledger = UsageLedger(tmp_path / "usage.db", replicated=True)
    ledger.add("acme", searches=2, embedding_tokens=40)
    ledger.flush()
    (batch,) = ledger.unpublished()
    assert batch.counts == {
        ("acme", today()): {
            "embedding_tokens": 40,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "searches": 2,
            "asks": 0,
        }
    }
    # Counted in reads while it waits, and not twice once applied.
    assert ledger.totals("acme")["acme"].searches == 2
    ledger.published(batch.batch_id, applied_here=True)
    assert ledger.unpublished() == []
    assert ledger.totals("acme")["acme"].searches == 2
    ledger.close()
    # A restart publishes what was never applied (the log applier first
    # catches up, which would have taken it out had it been in the log).
    reopened = UsageLedger(tmp_path / "usage.db", replicated=True)
    assert [b.batch_id for b in reopened.unpublished()] == [batch.batch_id]
    assert reopened.totals("acme")["acme"].searches == 2
    assert reopened.apply_batch(decode_usage_roundtrip(batch), LOG, 1)
    assert reopened.unpublished() == []
    assert reopened.totals("acme")["acme"].searches == 2
    reopened.close()
    # Back on the SQLite queue a batch left in the outbox is counted locally.
    leftover = UsageLedger(tmp_path / "leftover.db", replicated=True)
    leftover.add("acme", asks=1)
    leftover.close()
    local = UsageLedger(tmp_path / "leftover.db")
    local.flush()
    assert local.unpublished() == []
    assert local.totals("acme")["acme"].asks == 1
    local.close()


def decode_usage_roundtrip(batch: UsageBatch) -> UsageBatch:
    decoded = decode_entry(json.loads(json.dumps(encode_usage(batch))))
    assert isinstance(decoded, UsageBatch)
    return decoded


@pytest.mark.parametrize(
    "row",
    [
        {"tenant": "Acme!", "day": "2026-12-01", "searches": 1},
        {"tenant": "acme~x", "day": "2026-12-01", "searches": 1},
        {"tenant": None, "day": "2026-12-01", "searches": 1},
        {"tenant": "acme", "day": "2026-12-01", "searches": -5},
        {"tenant": "acme", "day": "2026-12-01", "searches": MAX_BATCH_COUNT + 1},
        {"tenant": "acme", "day": "2026-12-01", "searches": 10**30},
        {"tenant": "acme", "day": "2026-12-01", "searches": 1.5},
        {"tenant": "acme", "day": "2026-12-01", "searches": True},
        {"tenant": "acme", "day": "2026-12-01", "dollars": 3},
        {"tenant": "acme", "day": "2026-02-30", "searches": 1},
        {"tenant": "acme", "day": "2026-1-01", "searches": 1},
        {"tenant": "acme", "day": 20261201, "searches": 1},
    ],
)
def test_a_forged_usage_row_is_refused(row: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        decode_entry({"op": "usage", "batch": "forged", "rows": [row]})


@pytest.mark.parametrize(
    "entry",
    [
        {"op": "usage", "batch": "x", "rows": []},
        {"op": "usage", "batch": "x", "rows": "searches"},
        {"op": "usage", "batch": "x" * 65, "rows": [{"tenant": "a", "day": "2026-12-01"}]},
        {"op": "usage", "rows": [{"tenant": "a", "day": "2026-12-01"}]},
        {"op": "usage", "batch": "x", "rows": [{"tenant": "a", "day": "2026-12-01"}] * 2},
        {"op": "usage", "batch": "x", "rows": [{"tenant": "a", "day": "2026-12-01"}] * 1001},
    ],
)
def test_a_malformed_usage_entry_is_refused(entry: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        decode_entry(entry)


# -- replicas on a real nats-server --------------------------------------------


def start_replicas(
    start_server: Callable[..., ServerThread], broker: Nats, tmp_path: Path
) -> tuple[ServerThread, ServerThread, dict[str, object]]:
    """Two replicas with tenants on one log: a runs the worker, b only applies."""
    policy = write_policy(tmp_path / "policy.toml", [ACME, GLOBEX])
    settings: dict[str, object] = {"auth": {"policy_file": policy}}
    a = start_server(tmp_path / "a", **on_nats(broker.url), **settings)
    b = start_server(tmp_path / "b", **on_nats(broker.url, worker=False), **settings)
    for replica in (a, b):
        wait_for(following(replica))
    return a, b, settings


def log_of(replica: ServerThread) -> NatsIngestion:
    assert replica.server.nats is not None
    return replica.server.nats


def following(replica: ServerThread) -> Callable[[], bool]:
    return lambda: log_of(replica).connected.is_set()


def holds(client: RagClient, ids: list[str]) -> bool:
    """A wait_for condition: the client's replica has these documents (its
    namespace does not exist until the first write reaches it)."""
    try:
        return len(client.get(ids)[0]) == len(ids)
    except RpcError as error:
        if error.code != "NOT_FOUND":
            raise
        return False


def applied(replica: ServerThread) -> int:
    return log_of(replica).applied


@pytest.mark.slow
def test_replicas_report_the_same_usage_and_a_restart_neither_loses_nor_doubles_it(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    a, b, settings = start_replicas(start_server, nats_server, tmp_path)
    notes = [
        Document("v1", "Volcanoes form where magma reaches the surface.", {}),
        Document("t1", "Tides follow the moon's pull on the oceans.", {}),
    ]
    with (
        RagClient(a.target, token=ACME.key) as acme_a,
        RagClient(b.target, token=ACME.key) as acme_b,
        RagClient(b.target, token=GLOBEX.key) as globex_b,
        RagClient(a.target, token=GLOBEX.key) as globex_a,
    ):
        acme_a.upsert(notes)
        wait_for(lambda: holds(acme_b, ["v1", "t1"]))
        for _ in range(3):
            acme_a.search("volcano", k=2)
        for _ in range(2):
            acme_b.search("tides", k=2)
        acme_b.embed(["the moon and the tides"])
        globex_b.upsert([Document("c1", "Chess openings control the centre.", {})])
        globex_b.search("chess", k=1)

        # Calls spread over both replicas, each replica reporting all of them.
        wait_for(same_usage(acme_a, acme_b, searches=5, asks=0, documents=2))
        wait_for(same_usage(globex_a, globex_b, searches=1))
        before = counters(acme_a)
        assert before["embedding_tokens"] > 0 and before["vectors"] >= 2

        # Counted on b just before it stops: published at shutdown, not lost.
        acme_b.search("tides", k=1)
        acme_b.search("tides", k=1)
    b.stop()
    # As if b had crashed after adding usage entries and before its store
    # recorded their positions: it applies the whole log again.
    with sqlite3.connect(tmp_path / "b" / "rag.sqlite3") as store:
        store.execute("UPDATE log_positions SET seq = 0")
    with RagClient(a.target, token=ACME.key) as acme_a:
        acme_a.search("volcano", k=1)
        wait_for(lambda: counters(acme_a)["searches"] == 8)
        # Everything b counted, its shutdown batch included, plus a's call
        # (whose query's tokens count too: a new k misses the result cache).
        expected = counters(acme_a)
    assert expected["embedding_tokens"] >= before["embedding_tokens"]
    assert {**expected, "embedding_tokens": 0} == {**before, "searches": 8, "embedding_tokens": 0}
    end = applied(a)

    b = start_server(tmp_path / "b", **on_nats(nats_server.url, worker=False), **settings)
    wait_for(lambda: applied(b) >= end)
    with (
        RagClient(a.target, token=ACME.key) as acme_a,
        RagClient(b.target, token=ACME.key) as acme_b,
    ):
        wait_for(lambda: counters(acme_b) == expected)
        assert counters(acme_a) == expected
        # And it goes on counting, once.
        acme_b.search("tides", k=1)
        wait_for(same_usage(acme_a, acme_b, searches=9))
        time.sleep(2.5)  # a few more flush intervals: nothing else arrives
        assert counters(acme_a)["searches"] == counters(acme_b)["searches"] == 9


@pytest.mark.slow
def test_forged_usage_entries_are_refused_and_later_entries_still_apply(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    a, b, _ = start_replicas(start_server, nats_server, tmp_path)
    day = today()
    forged: list[object] = [
        {"op": "usage", "batch": "f1", "rows": [{"tenant": "Acme!", "day": day, "searches": 1}]},
        {"op": "usage", "batch": "f2", "rows": [{"tenant": "acme", "day": day, "searches": -5}]},
        {"op": "usage", "batch": "f3", "rows": [{"tenant": "acme", "day": day, "asks": 10**30}]},
        {"op": "usage", "batch": "f4", "rows": [{"tenant": "acme", "day": day, "dollars": 3}]},
        {"op": "usage", "batch": "f5", "rows": [{"tenant": "acme", "day": "2026-02-30"}]},
        {"op": "usage", "batch": "f6", "rows": "all of them"},
        b"not json",
    ]
    errors_before = [log_of(r).apply_errors for r in (a, b)]
    publish(nats_server.url, forged)
    # A well-formed entry after them is added by every replica.
    publish(
        nats_server.url,
        [{"op": "usage", "batch": "ok1", "rows": [{"tenant": "acme", "day": day, "searches": 7}]}],
    )
    with (
        RagClient(a.target, token=ACME.key) as acme_a,
        RagClient(b.target, token=ACME.key) as acme_b,
    ):
        wait_for(same_usage(acme_a, acme_b, searches=7, asks=0))
        for replica, before in zip((a, b), errors_before, strict=True):
            assert log_of(replica).apply_errors - before == len(forged)
            assert log_of(replica).stalled is None
        # The replicas go on applying writes and usage alike.
        acme_a.upsert([Document("g1", "Glaciers carve valleys over centuries.", {})])
        wait_for(lambda: holds(acme_b, ["g1"]))
        acme_b.search("glacier", k=1)
        wait_for(same_usage(acme_a, acme_b, searches=8, documents=1))
