"""Ingestion and writes that are safe to repeat: idempotent by document id
and content."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rag_grpc.client import RagClient
from tests.conftest import CORPUS, ServerThread, ask_answer


def test_resubmitting_unchanged_documents_does_no_work(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    with RagClient(server.target) as client:
        first = client.upsert(CORPUS)
        assert (first.documents, first.unchanged) == (len(CORPUS), 0)
        embedded = embedded_texts(client)
        again = client.upsert(CORPUS)
        assert (again.documents, again.chunks, again.unchanged) == (0, 0, len(CORPUS))
        assert again.index_generation == first.index_generation  # nothing was written
        assert embedded_texts(client) == embedded  # and nothing was embedded
        # One document's metadata changes: only it is written.
        changed = [replace(CORPUS[0], metadata={**CORPUS[0].metadata, "year": 2030}), *CORPUS[1:]]
        third = client.upsert(changed)
        assert (third.documents, third.unchanged) == (1, len(CORPUS) - 1)
        assert third.index_generation == first.index_generation + 1
        hits = client.search("volcanic ash and lava", k=1)
        assert hits[0].document_id == "volcano" and hits[0].metadata["year"] == 2030


def embedded_texts(client: RagClient) -> int:
    from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc

    stub = admin_service_pb2_grpc.AdminServiceStub(client.channel)
    return int(stub.Stats(admin_pb2.StatsRequest(), timeout=10).models[0].batched_texts)


def test_cached_results_never_hide_a_write_from_any_client(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    from rag_grpc.documents import Document

    server = start_server()
    cache = server.server.retriever.results  # type: ignore[union-attr]
    assert cache is not None
    with RagClient(server.target) as writer, RagClient(server.target) as reader:
        writer.upsert(CORPUS)
        query = "a rare orchid that blooms at night"
        before = reader.search(query, k=1)
        hits_before = cache.hits
        assert reader.search(query, k=1) == before and cache.hits == hits_before + 1  # cached
        assert before[0].document_id != "orchid"
        writer.upsert([Document("orchid", "The night-blooming orchid opens only after dark.", {})])
        after = reader.search(query, k=1)  # the other client sees the write at once
        assert after[0].document_id == "orchid"
        writer.delete(["orchid"])
        assert reader.search(query, k=1)[0].document_id != "orchid"
    # With the cache off, the same answers.
    plain = start_server(tmp_path / "plain", index={"result_cache_entries": 0})
    assert plain.server.retriever.results is None  # type: ignore[union-attr]


def test_answer_cache_replays_an_answer_until_a_write_retires_it(
    start_server: Callable[..., ServerThread],
) -> None:
    from rag_grpc.documents import Document
    from rag_grpc.generate.base import GenerationParams

    def ask(client: RagClient, question: str, **params: Any) -> tuple[str, Any]:
        events = list(client.ask(question, k=3, params=GenerationParams(**params)))
        return ask_answer(events), events[-1]

    server = start_server()
    with RagClient(server.target) as writer, RagClient(server.target) as reader:
        writer.upsert(CORPUS)
        question = "What flows out of a volcano?"
        first, summary = ask(reader, question)
        assert not summary.cached and first
        again, summary = ask(writer, question)  # another client, same question
        assert summary.cached and again == first
        assert summary.cited and summary.usage.completion_tokens > 0
        # Different parameters are a different answer.
        assert not ask(reader, question, max_tokens=8)[1].cached
        # A write to the namespace retires every cached answer at once.
        writer.upsert([Document("lava", "Lava flows out of a volcano as molten rock.", {})])
        fresh, summary = ask(reader, question)
        assert not summary.cached and "molten rock" in fresh  # the new passage is used
        assert ask(reader, question)[1].cached
        writer.delete(["lava"])
        assert not ask(reader, question)[1].cached
        # Sampled answers are never replayed.
        assert not ask(reader, question, temperature=0.7)[1].cached
        assert not ask(reader, question, temperature=0.7)[1].cached


def test_delete_by_filter_and_forget_leave_nothing_behind(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    from rag_grpc.backup import unseal, verified_members
    from rag_grpc.documents import Document
    from rag_grpc.filters import Equals
    from rag_grpc.native import VectorIndex

    data = tmp_path / "data"
    server = start_server(data)
    # Debian's SQLite is built with SECURE_DELETE on, which would zero freed
    # content whatever our code does; upstream's default is off. Start the
    # writer from upstream's default so this test proves our erase path.
    store = server.server.store
    assert store is not None
    with store._write_lock:
        store._writer.execute("PRAGMA secure_delete=OFF")
    secret = "zebra sapphire 7731 is the vault phrase"
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        # Delete by filter: every "games" document goes, the rest stay.
        gone = client.delete(filter=Equals("topic", "games"))
        assert gone.documents == 1
        assert all(h.document_id != "chess" for h in client.search("chess board game", k=5))
        assert client.get(["chess"])[1] == ["chess"]
        client.upsert([Document("secret", secret, {"owner": "mallory"})])
        assert client.search("vault phrase", k=1)[0].document_id == "secret"  # now cached
        label = store.labels("default").max()
        forgotten = client.delete(["secret"], forget=True)
        assert forgotten.documents == 1
        assert all(h.document_id != "secret" for h in client.search("vault phrase", k=5))
        snapshot = b"".join(c.data for c in client.snapshot(unencrypted=True))
    # Not in the database file, its WAL, the saved index or a later snapshot.
    for path in data.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    _, members = verified_members(unseal(snapshot, None))
    assert all(secret.encode() not in blob for blob in members.values())
    index = VectorIndex.load(data / "index" / "default.hnsw")
    assert label not in set(index.labels().tolist()) and len(index) == len(CORPUS) - 1
    # Who, what and when are on record; the content is not.
    (entry,) = store.audit_log()
    assert entry["action"] == "forget" and entry["doc_ids"] == ["secret"]
    assert "127.0.0.1" in str(entry["actor"]) and entry["at"]
    assert secret not in str(entry)


def test_forget_through_the_gateway_is_audited_under_the_client_identity(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    from rag_grpc.pb import retrieval_pb2, retrieval_service_pb2_grpc
    from tests.security.certs import issue, make_ca

    # The gateway's hop is mutual TLS with its own certificate: only then is
    # the identity it forwards in x-forwarded-client-cert believed.
    ca = make_ca()
    ca_pem, _ = ca.write(tmp_path, "ca")
    server_pem, server_key = issue(
        ca, "localhost", dns=["localhost"], ips=["127.0.0.1"], usage="server"
    ).write(tmp_path, "server")
    gateway = "spiffe://rag-grpc.test/gateway"
    issue(ca, "gateway", uris=[gateway], usage="client").write(tmp_path, "gateway")
    issue(ca, "bob", uris=["spiffe://rag-grpc.test/client/bob"], usage="client").write(
        tmp_path, "bob"
    )
    server = start_server(
        server={"tls_cert": server_pem, "tls_key": server_key, "tls_client_ca": ca_pem},
        auth={"trusted_proxies": ["127.0.0.1"], "proxy_identity": gateway},
    )
    identity = "spiffe://rag-grpc.test/client/alice"
    xfcc = (("x-forwarded-client-cert", f"By={gateway};Hash=abc;URI={identity}"),)

    def client(who: str) -> RagClient:
        pem, key = tmp_path / f"{who}.pem", tmp_path / f"{who}.key"
        return RagClient(f"localhost:{server.port}", ca=ca_pem, cert=pem, key=key)

    with client("gateway") as through_gateway:
        stub = retrieval_service_pb2_grpc.RetrievalServiceStub(through_gateway.channel)
        with client("bob") as bob:
            bob.upsert(CORPUS)
            request = retrieval_pb2.DeleteRequest(ids=["chess"], forget=True)
            assert stub.Delete(request, metadata=xfcc, timeout=10).deleted == 1
            bob.delete(["gil"], forget=True)  # straight, not through the gateway
    actors = [str(e["actor"]) for e in server.server.store.audit_log()]  # type: ignore[union-attr]
    assert actors == [identity, "spiffe://rag-grpc.test/client/bob"]
    # The hash-chained audit log names them too, and checks out.
    audit = server.server.audit
    assert audit is not None and audit.verify().ok
    principals = [row["principal"] for row in audit.export() if row["action"] == "Delete:forget"]
    assert principals == [identity, "spiffe://rag-grpc.test/client/bob"]


def test_retention_sweeper_deletes_expired_documents_per_namespace(
    start_server: Callable[..., ServerThread],
) -> None:
    import time

    from rag_grpc.documents import Document

    server = start_server(retention={"ttl_s": {"ephemeral": 1.0}, "sweep_interval_s": 0.2})
    with RagClient(server.target) as client:
        client.upsert([Document("note", "a short-lived note about tides", {})], "ephemeral")
        client.upsert(CORPUS[:1])
        assert client.get(["note"], namespace="ephemeral")[0]
        deadline = time.monotonic() + 15
        while client.get(["note"], namespace="ephemeral")[0]:
            assert time.monotonic() < deadline, "the sweeper never removed the expired note"
            time.sleep(0.2)
        assert not client.search("tides", namespace="ephemeral", k=1)
        assert client.get([CORPUS[0].id])[0]  # namespaces without a TTL keep everything


def test_a_non_positive_ttl_is_refused_at_start() -> None:
    import pytest

    from rag_grpc.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"retention\.ttl_s\['logs'\] must be positive"):
        load_settings(None, retention={"ttl_s": {"logs": 0}})


@pytest.mark.slow
def test_acknowledged_writes_survive_kill_9_at_random_moments(
    server_process: Callable[..., Any], tmp_path: Path
) -> None:
    """20 times: write from two clients, kill -9 the server at a random moment,
    restart it on the same data dir, and check that every acknowledged
    document is there and searchable and nothing is half written."""
    import random
    import threading
    import time

    from rag_grpc.client import RpcError
    from rag_grpc.documents import Document

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    data = tmp_path / "data"
    acknowledged: set[str] = set()
    lock = threading.Lock()
    for round_ in range(20):
        proc = server_process(data)
        stop = threading.Event()

        def write(
            worker: int,
            target: str = proc.target,
            round_: int = round_,
            stop: threading.Event = stop,
        ) -> None:
            with RagClient(target, timeout=10) as client:
                i = 0
                while not stop.is_set():
                    doc_id = f"r{round_}-w{worker}-{i}"
                    text = f"record {doc_id}: the {rng.choice(['red', 'blue', 'green'])} lighthouse"
                    try:
                        client.upsert([Document(doc_id, text, {"round": round_, "id": doc_id})])
                    except RpcError:
                        return  # the server died under us: this write was not acknowledged
                    with lock:
                        acknowledged.add(doc_id)
                    i += 1

        writers = [threading.Thread(target=write, args=(w,)) for w in range(2)]
        for thread in writers:
            thread.start()
        time.sleep(rng.uniform(0.05, 0.6))
        proc.stop(sig=9)
        stop.set()
        for thread in writers:
            thread.join(15)
    final = server_process(data)
    with RagClient(final.target, timeout=30) as client:
        ids = sorted(acknowledged)
        found, missing = [], []
        for start in range(0, len(ids), 500):
            docs, gone = client.get(ids[start : start + 500])
            found += docs
            missing += gone
        assert not missing, f"acknowledged but lost: {missing[:5]}"
        (stats,) = client.stats().namespaces
        # Nothing half written: every stored document has its chunk and vector.
        assert stats.documents == stats.chunks == stats.vectors >= len(ids)
        # Each one is in the index: a search restricted to it finds its vector.
        from rag_grpc.filters import Equals

        for probe in rng.sample(ids, 5):
            hits = client.search("a lighthouse", k=1, filter=Equals("id", probe))
            assert [h.document_id for h in hits] == [probe]
    assert len(ids) > 40, "too few writes to mean anything"
