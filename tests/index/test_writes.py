"""The one write path under attack and under failure, through a running
server: deletes refused before they reach the log, erasure on any SQLite
build, retention racing a refresh and deleting through the log, a write's time
carried through the log, limits, a busy or full database, a memory limit,
deadlines on filter queries, caches bounded in bytes, writes kept off the
search threads, what a crash leaves, periodic saves.

About 450 lines in one file: each test is one way a write is refused or
survives a failure, seen from a client of the server the write path runs in
(`expect` checks the status each refusal gives). Parts with a module of their
own are tested beside it: compaction in test_compaction.py, the log follower
skipping entries it cannot apply in tests/ingest/test_log_follower.py."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import rag_grpc.store.database as database
import rag_grpc.store.sqlite as sqlite_store
from rag_grpc import deadlines
from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.errors import DeadlineExceeded
from rag_grpc.filters import Equals
from rag_grpc.index.writes import PreparedDelete
from tests.conftest import CORPUS, ServerThread, ask_answer, wait_for
from tests.ingest.nats_setup import Nats, nats_node, on_nats

__all__ = ["nats_node"]  # a fixture, used by name


def expect(code: str, call: Callable[[], object], *words: str) -> str:
    with pytest.raises(RpcError) as info:
        call()
    assert info.value.code == code, info.value
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value.message


@pytest.mark.slow  # starts a NATS server
def test_bad_deletes_are_refused_before_they_reach_the_log(
    start_server: Callable[..., ServerThread], nats_node: Nats
) -> None:
    server = start_server(**on_nats(nats_node.url), limits={"max_delete_matches": 2})
    assert server.server.nats is not None
    wait_for(server.server.nats.connected.is_set)
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        written = server.server.nats.applied
        expect("INVALID_ARGUMENT", lambda: client.delete([""]), "empty")
        # Every document of the corpus is "reviewed" true or false: three match.
        expect(
            "INVALID_ARGUMENT",
            lambda: client.delete(filter=Equals("reviewed", True)),
            "more than 2",
        )
        assert server.server.nats.applied == written  # nothing was published
        assert client.get([d.id for d in CORPUS])[1] == []
        assert client.delete(filter=Equals("topic", "games")).documents == 1


def test_forget_erases_every_copy_on_an_sqlite_without_secure_delete(
    start_server: Callable[..., ServerThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upstream SQLite leaves freed pages as they were (secure_delete off);
    # Debian's build zeroes them. Every connection rag-grpc opens is turned
    # back to upstream's default here, so only the erase path can pass.
    opened = sqlite_store.connect

    def upstream(path: Path) -> sqlite3.Connection:
        conn = opened(path)
        conn.execute("PRAGMA secure_delete=OFF")
        return conn

    monkeypatch.setattr(sqlite_store, "connect", upstream)
    monkeypatch.setattr("rag_grpc.ingest.jobs.connect", upstream)
    data = tmp_path / "data"
    server = start_server(data)
    secrets = ["zebra sapphire 7731", "okapi garnet 4410", "quokka topaz 9902"]
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        client.upsert([Document("s1", f"The vault phrase is {secrets[0]}.", {"k": 1})])
        # An edit leaves the old text in freed pages.
        client.upsert([Document("s1", f"The vault phrase is now {secrets[1]}.", {"k": 2})])
        job = client.submit([Document("s2", f"The cellar phrase is {secrets[2]}.")])
        assert list(client.watch_job(job, timeout=60))[-1].state == "SUCCEEDED"
        client.search("vault phrase", k=3)  # cached with its text
        answer = ask_answer(client.ask("What is the vault phrase?"))
        assert secrets[1].split()[0] in answer  # and now in the answer cache
        assert client.delete(["s1", "s2"], forget=True).documents == 2
        assert all(h.document_id not in ("s1", "s2") for h in client.search("vault phrase"))
    retriever = server.server.retriever
    assert retriever is not None and retriever.results is not None
    # No cache still holds a forgotten text (results cached after the forget are fine).
    cached = repr(list(retriever.results._items.values()))
    answers = server.server.answer_cache
    assert answers is not None
    cached += repr(list(answers._items.values()))
    assert all(secret.split()[0] not in cached for secret in secrets)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    retriever.snapshot(snapshot)
    files = [p for p in [*data.rglob("*"), *snapshot.rglob("*")] if p.is_file()]
    assert any(p.name == "rag.sqlite3" for p in files)
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, (path, secret)


def test_retention_spares_a_document_refreshed_after_the_sweep_chose_it(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    retriever = server.server.retriever
    assert retriever is not None
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:3])
        time.sleep(0.05)
        expired = retriever.expired("default", ttl_s=0.01)
        assert expired is not None and set(expired.ids) == {d.id for d in CORPUS[:3]}
        # Refreshed between the sweep's read and its delete.
        client.upsert([Document(CORPUS[0].id, CORPUS[0].text + " Updated.")])
        result = retriever.writes.apply_delete(expired)
        assert result.documents == 2 and result.not_found_ids == (CORPUS[0].id,)
        assert [d.id for d in client.get([d.id for d in CORPUS[:3]])[0]] == [CORPUS[0].id]


@pytest.mark.slow  # starts a NATS server
def test_upsert_carries_its_write_time_through_the_log(
    start_server: Callable[..., ServerThread], nats_node: Nats, tmp_path: Path
) -> None:
    first = start_server(tmp_path / "a", **on_nats(nats_node.url))
    second = start_server(tmp_path / "b", **on_nats(nats_node.url, worker=False))
    for node in (first, second):
        assert node.server.nats is not None
        wait_for(node.server.nats.connected.is_set)
    with RagClient(first.target) as client:
        client.upsert(CORPUS[:2])
    assert second.server.nats is not None
    wait_for(lambda: second.server.nats.applied >= first.server.nats.applied)  # type: ignore[union-attr]

    def written(path: Path) -> list[tuple[str, float]]:
        with sqlite3.connect(path / "rag.sqlite3") as conn:
            return conn.execute(
                "SELECT doc_id, updated_at FROM documents ORDER BY doc_id"
            ).fetchall()

    assert written(tmp_path / "a") == written(tmp_path / "b")


def test_limits_refuse_with_a_clear_status_and_change_nothing(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(
        limits={
            "max_namespaces": 2,
            "max_metadata_keys": 3,
            "max_metadata_value_bytes": 16,
            "max_filter_values": 5,
        }
    )
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        expect("INVALID_ARGUMENT", lambda: client.search("lava", ef=4294967295), "ef must be")
        client.upsert([Document("x", "other tenant")], namespace="second")
        expect(
            "RESOURCE_EXHAUSTED",
            lambda: client.upsert([Document("x", "third")], namespace="third"),
            "max_namespaces",
        )
        expect(
            "INVALID_ARGUMENT",
            lambda: client.upsert([Document("m", "t", {"a": 1, "b": 2, "c": 3, "d": 4})]),
            "metadata keys",
        )
        expect(
            "INVALID_ARGUMENT",
            lambda: client.upsert([Document("m", "t", {"a": "x" * 17})]),
            "per value",
        )
        from rag_grpc.filters import AnyOf, Or

        expect(
            "INVALID_ARGUMENT",
            lambda: client.search(
                "lava", filter=Or((AnyOf("year", (1, 2, 3)), AnyOf("year", (4, 5, 6))))
            ),
            "max_filter_values",
        )
        for bad in ("a\u202eb", "x\x85y", "\x7f"):
            with pytest.raises(RpcError) as info:
                client.upsert([Document(bad, "t")])
            assert info.value.code == "INVALID_ARGUMENT" and bad not in info.value.message
        expect("INVALID_ARGUMENT", lambda: client.upsert([Document("d", "t")], namespace=".."))
        counts = {n.name: n.documents for n in client.stats().namespaces}
        assert counts == {"default": len(CORPUS), "second": 1}
        assert client.search("lava", k=1)[0].document_id == "volcano"


def test_an_upsert_larger_than_the_embedding_queue_is_refused_a_job_is_split(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(embedding={"max_queue_texts": 4})
    documents = [Document(f"d{i}", f"Short note number {i} about tides.") for i in range(10)]
    with RagClient(server.target) as client:
        expect("INVALID_ARGUMENT", lambda: client.upsert(documents), "max_queue_texts")
        assert client.get(["d0"])[1] == ["d0"]
        job = client.submit(documents)
        final = list(client.watch_job(job, timeout=60))[-1]
        assert (final.state, final.processed, final.failed) == ("SUCCEEDED", 10, 0)


def test_a_busy_database_is_unavailable_and_the_job_worker_retries(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    ingestion = server.server.ingestion
    assert ingestion is not None
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:1])
        blocker = sqlite3.connect(
            data / "rag.sqlite3", isolation_level=None, check_same_thread=False
        )
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            # The writer waits out its busy timeout, then says to retry.
            expect("UNAVAILABLE", lambda: client.upsert(CORPUS[1:2]), "busy")
        finally:
            blocker.execute("ROLLBACK")
        # The job worker meets the same lock mid-job and retries the batch.
        job_id = client.submit(CORPUS[2:5])
        blocker.execute("BEGIN EXCLUSIVE")
        threading.Timer(6.5, lambda: blocker.execute("ROLLBACK")).start()
        final = list(client.watch_job(job_id, timeout=120))[-1]
        assert (final.state, final.processed, final.failed) == ("SUCCEEDED", 3, 0)
        assert getattr(ingestion, "retries", 0) >= 1
        assert client.get([d.id for d in CORPUS[2:5]])[1] == []
        assert client.get([CORPUS[1].id])[1] == [CORPUS[1].id]
    blocker.close()


def test_filter_queries_stop_at_the_deadline(
    start_server: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked every step here, so even this small query gets interrupted.
    monkeypatch.setattr(database, "PROGRESS_STEPS", 1)
    server = start_server()
    store = server.server.store
    assert store is not None
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
    deadlines.enter_call(0.0)
    try:
        with pytest.raises(DeadlineExceeded):
            store.labels_matching("default", Equals("topic", "games"))
    finally:
        deadlines.enter_call(None)
    assert len(store.labels_matching("default", Equals("topic", "games"))) == 1


def test_prepared_deletes_from_any_source_are_checked(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    retriever = server.server.retriever
    assert retriever is not None
    from rag_grpc.errors import InvalidArgument

    bad: list[Any] = [
        PreparedDelete("../x", ("a",)),
        PreparedDelete("default", ("",)),
        PreparedDelete("default", ("a\x00b",)),
        PreparedDelete("default", ("a",), older_than=float("nan")),
    ]
    for prepared in bad:
        with pytest.raises(InvalidArgument):
            retriever.writes.apply_delete(prepared)


def test_a_full_disk_is_resource_exhausted_and_changes_nothing(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    store = server.server.store
    assert store is not None
    # Embedding the three long documents takes seconds on two busy cores: the
    # deadline must not be what fails the write.
    with RagClient(server.target, timeout=120) as client:
        client.upsert(CORPUS)
        # SQLite's own cap on the file's size fails a write exactly as a full
        # disk does (SQLITE_FULL), without filling this machine's disk.
        with store._write_lock:
            pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
            store._writer.execute(f"PRAGMA max_page_count = {pages}")
        big = [Document(f"big{i}", "A long note about glaciers. " * 2000) for i in range(3)]
        message = expect("RESOURCE_EXHAUSTED", lambda: client.upsert(big), "disk is full")
        assert "retry" in message
        assert client.get(["big0"])[1] == ["big0"]
        with store._write_lock:
            store._writer.execute("PRAGMA max_page_count = 1073741823")
        assert client.upsert(big).documents == 3
        assert client.search("glaciers", k=1)[0].document_id.startswith("big")


def test_result_and_answer_caches_are_bounded_in_bytes() -> None:
    from rag_grpc.documents import Hit, SearchResult
    from rag_grpc.generate.base import Finished, GenerationParams, Usage
    from rag_grpc.generate.pipeline import AnswerCache, CachedAnswer
    from rag_grpc.index.result_cache import ResultCache, result_bytes

    def result(i: int) -> SearchResult:
        return SearchResult([Hit(f"d{i}", f"d{i}#0", 0.5, "x" * 10_000, {})], i)

    one = result_bytes(result(0))
    results = ResultCache(entries=1000, max_bytes=3 * one)
    for i in range(10):
        results.put(("ns", i), result(i))
    assert results.bytes <= 3 * one and len(results._items) == 3
    assert results.get(("ns", 9)) is not None and results.get(("ns", 0)) is None

    answers = AnswerCache(entries=1000, max_bytes=50_000)
    finished = Finished(Usage(1, 1), "extractive", "stop", ())
    for i in range(10):
        key = AnswerCache.key(f"question {i}", "ns", GenerationParams(), SearchResult([], i))
        answers.put(key, CachedAnswer("y" * 10_000, finished, ()))
    assert answers.bytes <= 50_000 and 1 <= len(answers._items) < 10


def test_writes_and_admin_work_never_take_the_search_threads(
    start_server: Callable[..., ServerThread],
) -> None:
    # One search thread: if the write path ran on it, searches would queue
    # behind the upserts below.
    server = start_server(server={"worker_threads": 1})
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        query = client.embed(["lava"])[0]
        words = " ".join(f"w{i}" for i in range(180))
        slow = [Document(f"slow-{i}", f"{i} {words}") for i in range(60)]
        done: list[str] = []

        def upsert(name: str, docs: list[Document]) -> None:
            with RagClient(server.target, timeout=600) as writer:
                writer.upsert(docs)
            done.append(name)

        writers = [threading.Thread(target=upsert, args=(f"w{n}", slow[n::2])) for n in range(2)]
        for thread in writers:
            thread.start()
        time.sleep(0.3)  # both upserts are embedding or writing now
        for _ in range(20):
            assert client.search(query, k=1)[0].document_id == "volcano"
        searched_while_writing = not done
        for thread in writers:
            thread.join()
        assert searched_while_writing, "the searches waited for the writes"
        assert client.get(["slow-0", "slow-59"])[1] == []


@pytest.mark.slow  # starts a NATS server
def test_retention_under_nats_deletes_through_the_log_on_every_replica(
    start_server: Callable[..., ServerThread], nats_node: Nats, tmp_path: Path
) -> None:
    retention = {"ttl_s": {"aging": 1.0}, "sweep_interval_s": 0.3}
    sweeper = start_server(tmp_path / "a", retention=retention, **on_nats(nats_node.url))
    # A replica without a sweeper of its own: it can only learn of the
    # deletion from the log.
    follower = start_server(tmp_path / "b", **on_nats(nats_node.url, worker=False))
    for node in (sweeper, follower):
        assert node.server.nats is not None
        wait_for(node.server.nats.connected.is_set)
    with RagClient(sweeper.target) as a, RagClient(follower.target) as b:
        a.upsert(CORPUS[:3], namespace="aging")
        a.upsert(CORPUS[:1], namespace="kept")
        wait_for(lambda: b.get([CORPUS[0].id], namespace="aging")[1] == [])

        def aged_out(client: RagClient) -> bool:
            return client.get([d.id for d in CORPUS[:3]], namespace="aging")[0] == []

        wait_for(lambda: aged_out(a) and aged_out(b), timeout=60)
        assert b.get([CORPUS[0].id], namespace="kept")[1] == []


def test_a_write_past_the_memory_limit_is_refused_and_changes_nothing(
    start_server: Callable[..., ServerThread],
) -> None:
    probe = start_server()
    assert probe.server.retriever is not None
    with RagClient(probe.target) as client:
        client.upsert(CORPUS)
        used = probe.server.retriever.indexes.memory_bytes()
    probe.stop()
    # Room for what CORPUS needs and a little more, not for 200 documents.
    server = start_server(limits={"max_index_bytes": used + 40_000})
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        model = client.stats().models[0]
        from rag_grpc.documents import GivenChunk

        rng = np.random.default_rng(3)
        many = [
            Document(
                f"m{i}",
                f"note {i}",
                chunks=(GivenChunk(f"note {i}", rng.standard_normal(384).astype(np.float32)),),
                vector_model_id=model,
            )
            for i in range(200)
        ]
        message = expect("RESOURCE_EXHAUSTED", lambda: client.upsert(many), "max_index_bytes")
        assert "delete documents" in message
        assert client.get(["m0", "m199"])[1] == ["m0", "m199"]
        assert [n.documents for n in client.stats().namespaces] == [len(CORPUS)]
        assert client.search("lava", k=1)[0].document_id == "volcano"
        assert client.upsert(many[:5]).documents == 5  # small writes still fit


def test_a_snapshot_copy_left_by_a_crash_is_removed_at_start(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    leftover = data / ".snapshot-k2j4"
    (leftover / "index").mkdir(parents=True)
    (leftover / "rag.sqlite3").write_bytes(b"a copy of every document, taking disk space")
    server = start_server(data)
    assert not leftover.exists()
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:1])


def test_written_indexes_are_saved_periodically(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    from rag_grpc.native import VectorIndex

    data = tmp_path / "data"
    server = start_server(data, index={"save_interval_s": 0.3})
    retriever = server.server.retriever
    assert retriever is not None
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        # Saved while serving (no shutdown): a kill -9 now would restart from
        # this file instead of rebuilding, and the new vectors left RAM.
        path = data / "index" / "default.hnsw"
        wait_for(lambda: path.exists() and len(VectorIndex.load(path)) == len(CORPUS))
        saved = path.stat().st_mtime_ns
        time.sleep(1.0)
        assert path.stat().st_mtime_ns == saved  # unchanged indexes are not saved again
        assert client.search("lava", k=1)[0].document_id == "volcano"
