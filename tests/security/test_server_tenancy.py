"""Tenancy through the real server: namespaces per tenant, quotas that write
nothing when they refuse, usage that survives a restart, and the audit log
the server itself writes."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from rag_grpc.client import RpcError
from rag_grpc.documents import Document
from rag_grpc.generate.base import GenerationParams
from rag_grpc.index.search import SearchQuery
from rag_grpc.pb import (
    admin_pb2,
    admin_service_pb2_grpc,
    common_pb2,
    retrieval_pb2,
    retrieval_service_pb2_grpc,
)
from rag_grpc.security.audit import AuditLog
from tests.conftest import CORPUS, ServerThread, ask_citations, ask_summary
from tests.security.tenants import client, member, write_policy


def quota_details(error: grpc.RpcError) -> tuple[list[str], float | None]:
    """The QuotaFailure subjects and descriptions and the RetryInfo delay of a refusal."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None, "RESOURCE_EXHAUSTED without details"
    violations: list[str] = []
    retry = None
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            violations += [f"{v.subject} {v.description}" for v in failure.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToNanoseconds() / 1e9
    return violations, retry


def tokens(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens)


ACME_ADMIN = member("acme", "admin", "acme-admin")
GLOBEX_ADMIN = member("globex", "admin", "globex-admin")
OPS = member(None, None, "ops")

GLOBEX_DOCS = [
    Document("ledger", "The quarterly ledger of Globex lists every invoice and payment.", {}),
    Document("volcano", "Globex sells volcano insurance to towns near Mount Etna.", {}),
]


def test_two_tenants_using_default_see_only_their_own_documents(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.toml", [ACME_ADMIN, GLOBEX_ADMIN], operators=[OPS])
    server = start_server(auth={"policy_file": policy})
    with client(server, ACME_ADMIN) as acme, client(server, GLOBEX_ADMIN) as globex:
        acme.upsert(CORPUS)
        globex.upsert(GLOBEX_DOCS)
        # The same id in the same namespace name: two documents.
        assert acme.get(["volcano"])[0][0].text == CORPUS[0].text
        assert globex.get(["volcano"])[0][0].text == GLOBEX_DOCS[1].text
        assert acme.get(["ledger"]) == ([], ["ledger"])
        assert {h.document_id for h in globex.search("coffee espresso", k=10)} <= {
            "ledger",
            "volcano",
        }
        assert globex.search("invoice", k=1)[0].document_id == "ledger"
        assert acme.search("invoice payment ledger", k=5)[0].document_id != "ledger"
        cited = ask_citations(list(acme.ask("What is a ledger?", k=3)))
        assert cited and all(h.document_id != "ledger" for h in cited)
        # Stats: each sees "default" with its own count, unprefixed.
        assert [(n.name, n.documents) for n in acme.stats().namespaces] == [("default", 5)]
        assert [(n.name, n.documents) for n in globex.stats().namespaces] == [("default", 2)]
        # A tenant cannot spell the other's stored name.
        with pytest.raises(RpcError) as info:
            acme.search("ledger", namespace="globex~default")
        assert info.value.code == "INVALID_ARGUMENT" and "globex" in info.value.message
        # Deleting in "default" deletes only the caller's own.
        assert acme.delete(["volcano"]).documents == 1
        assert globex.get(["volcano"])[0]
        # NOT_FOUND names the namespace as the caller does, with no tenant prefix.
        with pytest.raises(RpcError) as info:
            globex.search("lava", namespace="archive")
        assert info.value.code == "NOT_FOUND"
        assert "'archive'" in info.value.message and "~" not in info.value.message
    with client(server, OPS) as ops:
        # Operators see every tenant's namespaces, each with its tenant.
        # (RagClient.stats leaves the tenant field out.)
        admin = admin_service_pb2_grpc.AdminServiceStub(ops.channel)
        response = admin.Stats(admin_pb2.StatsRequest(), metadata=ops.metadata, timeout=10)
        assert sorted((n.tenant, n.name, n.documents) for n in response.namespaces) == [
            ("", "default", 0),
            ("acme", "default", 4),
            ("globex", "default", 2),
        ]
    # The stored names carry the tenant; the files in the data dir too.
    names = {n.name for n in server.server.retriever.stats()}  # type: ignore[union-attr]
    assert {"acme~default", "globex~default"} <= names


def test_quota_exhaustion_mid_ingest_leaves_exactly_the_allowed_documents(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "policy.toml",
        [ACME_ADMIN, GLOBEX_ADMIN],
        quotas={"acme": {"documents": 3, "namespaces": 1}},
    )
    server = start_server(auth={"policy_file": policy})
    with client(server, ACME_ADMIN) as acme:
        job = acme.submit(CORPUS)
        deadline = time.monotonic() + 60
        while not (status := acme.get_job(job)).done:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The first three fit; the other two failed, each saying why.
        assert (status.processed, status.failed) == (5, 2)
        assert [doc_id for doc_id, _ in status.errors] == [d.id for d in CORPUS[3:]]
        assert all("may store 3 documents" in message for _, message in status.errors)
        found, missing = acme.get([d.id for d in CORPUS])
        assert [d.id for d in found] == [d.id for d in CORPUS[:3]]
        # An Upsert over the quota is refused whole, with the quota named.
        stub = retrieval_service_pb2_grpc.RetrievalServiceStub(acme.channel)
        request = retrieval_pb2.UpsertRequest(
            documents=[common_pb2.Document(id="extra", text="one too many")]
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.Upsert(request, metadata=acme.metadata, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        violations, retry = quota_details(error.value)
        assert violations == ["tenant:acme documents: limit 3, used 3"]
        assert retry is None  # waiting does not help; deleting does
        # A replacement adds no document: still allowed at the limit.
        acme.upsert([Document(CORPUS[0].id, "A volcano erupts lava.", {})])
        assert acme.get([d.id for d in CORPUS])[1] == missing
        # After a delete there is room again, but not in a second namespace.
        acme.delete([CORPUS[1].id])
        with pytest.raises(RpcError) as info:
            acme.upsert([Document("n", "elsewhere", {})], namespace="other")
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "may have 1 namespaces" in info.value.message
        acme.upsert([CORPUS[3]])
        assert len(acme.get([d.id for d in CORPUS])[0]) == 3
    with client(server, GLOBEX_ADMIN) as globex:  # another tenant's quota is its own
        assert globex.upsert(CORPUS).documents == 5


def test_request_rate_and_daily_tokens_are_refused_with_retry_info(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "policy.toml",
        [ACME_ADMIN, GLOBEX_ADMIN],
        quotas={
            "acme": {"requests_per_s": 1},
            "globex": {"generated_tokens_per_day": 60},
        },
    )
    server = start_server(auth={"policy_file": policy})
    with client(server, ACME_ADMIN) as acme:
        stub = admin_service_pb2_grpc.AdminServiceStub(acme.channel)
        request = admin_pb2.StatsRequest()
        stub.Stats(request, metadata=acme.metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            stub.Stats(request, metadata=acme.metadata, timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        violations, retry = quota_details(error.value)
        assert violations == ["tenant:acme requests_per_s: limit 1, used 1"]
        assert retry is not None and 0 < retry <= 1.0
        time.sleep(retry + 0.05)
        stub.Stats(request, metadata=acme.metadata, timeout=10)
    with client(server, GLOBEX_ADMIN) as globex:
        globex.upsert(CORPUS)
        # Asking for more tokens than the day allows is refused before any work.
        with pytest.raises(RpcError) as info:
            list(globex.ask("What is lava?", params=tokens(100)))
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "generate 60 tokens per UTC day" in info.value.message
        used = ask_summary(globex.ask("What is lava?", params=tokens(60))).usage.completion_tokens
        assert 0 < used <= 60
        # What is left of the day is less than this asks for.
        with pytest.raises(RpcError) as info:
            list(globex.ask("What is espresso?", params=tokens(60)))
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert f"ask for at most {60 - used} tokens" in info.value.message


def test_usage_survives_a_restart_and_matches_the_calls_made(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    prices = {"searches": 0.01, "asks": 0.5, "embedding_tokens": 0.0}
    policy = write_policy(
        tmp_path / "policy.toml", [ACME_ADMIN, GLOBEX_ADMIN], operators=[OPS], prices=prices
    )
    data = tmp_path / "data"
    server = start_server(data, auth={"policy_file": policy})
    with client(server, ACME_ADMIN) as acme:
        acme.upsert(CORPUS)
        for _ in range(3):
            acme.search("lava", k=2)
        acme.search_batch([SearchQuery(text=q, k=1) for q in ("chess", "coffee")])
        summary = ask_summary(acme.ask("What is photosynthesis?", params=tokens(20)))
        before = acme.usage()
        # An admin of acme sees acme only, and may not name another tenant.
        with pytest.raises(RpcError) as info:
            acme.usage("globex")
        assert info.value.code == "PERMISSION_DENIED"
    (usage,) = before
    assert (usage.tenant, usage.searches, usage.asks) == ("acme", 5, 1)
    assert usage.completion_tokens == summary.usage.completion_tokens
    assert usage.prompt_tokens == summary.usage.prompt_tokens
    assert usage.embedding_tokens > 0  # the documents' chunks were embedded
    assert usage.documents == 5 and usage.vectors >= 5 and usage.stored_bytes > 500
    assert usage.estimated_cost == pytest.approx(5 * 0.01 + 0.5)
    server.stop()
    again = start_server(data, auth={"policy_file": policy})
    with client(again, OPS) as ops:
        after = {u.tenant: u for u in ops.usage()}
    assert after["acme"] == before[0]
    assert after["globex"].searches == 0 and after["globex"].documents == 0
    # The operator's look at every tenant's usage is on record.
    assert again.server.audit is not None
    actions = [(r["principal"], r["action"]) for r in again.server.audit.export()]
    assert ("apikey:ops", "Usage") in actions


def test_an_edited_row_of_the_servers_audit_log_fails_verification(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.toml", [ACME_ADMIN], operators=[OPS])
    data = tmp_path / "data"
    server = start_server(data, auth={"policy_file": policy})
    with client(server, ACME_ADMIN) as acme:
        acme.upsert(CORPUS)
        acme.delete(["chess", "gil"])
        acme.delete(["espresso"], forget=True)
        with pytest.raises(RpcError):
            acme.snapshot(unencrypted=True).__next__()
    with client(server, OPS) as ops:
        exported = list(ops.audit_export())
    server.stop()
    # Who did what to which ids is on record, never the content.
    actions = [(r["principal"], r["action"], r["outcome"], r["ids"]) for r in exported]
    assert ("apikey:acme-admin", "Delete", "ok", ["chess", "gil"]) in actions
    assert ("apikey:acme-admin", "Delete:forget", "ok", ["espresso"]) in actions
    assert ("apikey:acme-admin", "Snapshot", "denied", []) in actions
    assert all(r["namespace"] in (None, "default") for r in exported)
    assert "crema" not in str(exported)
    path = data / "audit.sqlite3"
    assert AuditLog(path).verify().ok
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_events_no_update")
    conn.execute("UPDATE audit_events SET row = replace(row, 'chess', 'chase') WHERE seq = 1")
    conn.commit()
    conn.close()
    result = AuditLog(path).verify()
    assert not result.ok and result.first_bad == 1 and "modified" in (result.reason or "")


def test_an_ask_searches_remote_retrieval_as_the_same_caller(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    reader = member("acme", "reader", "acme-reader")
    policy = write_policy(tmp_path / "policy.toml", [ACME_ADMIN, GLOBEX_ADMIN, reader])
    auth = {"auth": {"policy_file": policy}}
    retrieval = start_server(tmp_path / "retrieval", services="retrieval", **auth)
    with client(retrieval, ACME_ADMIN) as acme, client(retrieval, GLOBEX_ADMIN) as globex:
        acme.upsert(CORPUS)
        globex.upsert(GLOBEX_DOCS)
    rag = start_server(
        tmp_path / "rag",
        services="rag,generation",
        remote={"retrieval_target": retrieval.target},
        **auth,
    )
    with client(rag, reader) as acme_reader, client(rag, GLOBEX_ADMIN) as globex:
        acme_hits = ask_citations(list(acme_reader.ask("What erupts from a volcano?", k=2)))
        globex_hits = ask_citations(list(globex.ask("What erupts from a volcano?", k=2)))
    assert acme_hits[0].text == CORPUS[0].text
    assert {h.document_id for h in globex_hits} <= {"volcano", "ledger"}
    assert all(h.text != CORPUS[0].text for h in globex_hits)
    # The retrieval service counted each tenant's search as its own.
    assert retrieval.server.access is not None
    reports = {r.tenant: r.searches for r in retrieval.server.access.usage_report(None)}
    assert reports == {"acme": 1, "globex": 1}


def test_a_budget_crossed_shows_in_metrics_and_refuses_generation(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    import urllib.request

    policy = write_policy(
        tmp_path / "policy.toml",
        [ACME_ADMIN, GLOBEX_ADMIN],
        budgets={
            "acme": {"usd_per_day": 1.5, "refuse_generation": True},
            "globex": {"usd_per_day": 0.5},
        },
        prices={"asks": 1.0},
    )
    server = start_server(auth={"policy_file": policy}, telemetry={"prometheus_port": 0})
    port = server.server.telemetry.prometheus_port  # type: ignore[union-attr]

    def budget_metric() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith("rag_tenant_budget_reached{"):
                tenant = line.split('tenant="', 1)[1].split('"', 1)[0]
                found[tenant] = float(line.rsplit(" ", 1)[1])
        return found

    assert budget_metric() == {"acme": 0.0, "globex": 0.0}
    with client(server, ACME_ADMIN) as acme, client(server, GLOBEX_ADMIN) as globex:
        acme.upsert(CORPUS)
        globex.upsert(CORPUS)
        list(acme.ask("What is lava?"))  # $1.00 of $1.50
        list(acme.ask("What is chess?"))  # $2.00: the budget is reached
        with pytest.raises(RpcError) as info:
            list(acme.ask("What is espresso?"))
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "budget of $1.50 per day" in info.value.message
        assert acme.search("espresso", k=1)  # searching is not generation
        # Globex's budget only reports: generation goes on past it.
        for _ in range(2):
            list(globex.ask("What is lava?"))
    assert budget_metric() == {"acme": 1.0, "globex": 1.0}


def test_a_text_search_bills_the_tokens_its_query_read(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.toml", [ACME_ADMIN])
    server = start_server(tmp_path / "data", auth={"policy_file": policy})
    with client(server, ACME_ADMIN) as acme:
        acme.upsert(CORPUS)
        (before,) = acme.usage()
        acme.search("what erupts from a volcano", k=1)
        (after_text,) = acme.usage()
        # [CLS] what erupts from a volcano [SEP]: at least 7 tokens.
        assert after_text.embedding_tokens - before.embedding_tokens >= 7
        # The same query again is answered by the result cache: no model ran.
        acme.search("what erupts from a volcano", k=1)
        (after_cached,) = acme.usage()
        assert after_cached.embedding_tokens == after_text.embedding_tokens
        # A query that brings its own vector reads no text.
        acme.search(np.ones(384, dtype=np.float32), k=1)
        (after_vector,) = acme.usage()
        assert after_vector.embedding_tokens == after_text.embedding_tokens
        assert after_vector.searches == before.searches + 3
