"""The authorization matrix through the real server: every rag.v1 RPC x
{reader, writer, admin, operator, unknown identity, no identity} x {own
tenant, other tenant}, with the exact status code, and where a call is
refused, nothing stored changed and (for a known caller) the refusal is in
the audit log.

Callers are API keys of a policy. "Other tenant" is the nearest a caller
can get to another tenant's data: that tenant's stored namespace name
("globex~docs"), one of its job ids, or its name in a Usage request.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from rag_grpc.pb import (
    admin_pb2,
    admin_service_pb2_grpc,
    common_pb2,
    embedding_pb2,
    embedding_service_pb2_grpc,
    generation_pb2,
    generation_service_pb2_grpc,
    ingestion_pb2,
    ingestion_service_pb2_grpc,
    rag_pb2,
    rag_service_pb2_grpc,
    retrieval_pb2,
    retrieval_service_pb2_grpc,
)
from tests.conftest import CORPUS, ServerThread, make_settings
from tests.security.tenants import Member, member, write_policy

READER = member("acme", "reader", "acme-reader")
WRITER = member("acme", "writer", "acme-writer")
ADMIN = member("acme", "admin", "acme-admin")
OPERATOR = member(None, None, "ops")
UNKNOWN = member(None, None, "stranger")  # a valid key, member of no tenant
GLOBEX = member("globex", "writer", "globex-writer")

CALLERS: dict[str, Member | None] = {
    "reader": READER,
    "writer": WRITER,
    "admin": ADMIN,
    "operator": OPERATOR,
    "unknown": UNKNOWN,
    "none": None,
}

OK, PD, UA = "OK", "PERMISSION_DENIED", "UNAUTHENTICATED"
INVALID, NOT_FOUND = "INVALID_ARGUMENT", "NOT_FOUND"

# Own-tenant outcome per caller, in CALLERS' order.
READ = (OK, OK, OK, PD, PD, UA)
WRITE = (PD, OK, OK, PD, PD, UA)
ADMIN_ONLY = (PD, PD, OK, PD, PD, UA)
ADMIN_OR_OPERATOR = (PD, PD, OK, OK, PD, UA)
OPERATOR_ONLY = (PD, PD, PD, OK, PD, UA)


@dataclass
class World:
    """The server and what the matrix calls refer to."""

    server: ServerThread
    channel: grpc.Channel
    acme_job: str
    globex_job: str

    def stub(self, kind: Any) -> Any:
        return kind(self.channel)


@dataclass(frozen=True)
class Rpc:
    """One RPC variant: its outcomes for the own tenant, what an allowed
    caller gets on the other tenant's target, and the call itself
    (world, metadata, target "own"/"other", a name unique to the case)."""

    name: str
    own: tuple[str, ...]
    other: str | None  # None: the RPC has no tenant target (same as own)
    call: Callable[[World, tuple[tuple[str, str], ...], str, str], None]


def namespace(target: str) -> str:
    return "docs" if target == "own" else "globex~docs"


def drain(stream: Iterator[Any]) -> None:
    for _ in stream:
        pass


def _search(w: World, md: Any, target: str, case: str) -> None:
    request = retrieval_pb2.SearchRequest(namespace=namespace(target), text="lava", k=1)
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).Search(request, metadata=md)


def _search_batch(w: World, md: Any, target: str, case: str) -> None:
    # The other tenant's name is the second item: every item is scoped.
    queries = [
        retrieval_pb2.SearchRequest(namespace="docs", text="lava", k=1),
        retrieval_pb2.SearchRequest(namespace=namespace(target), text="chess", k=1),
    ]
    request = retrieval_pb2.SearchBatchRequest(queries=queries)
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).SearchBatch(request, metadata=md)


def _get(w: World, md: Any, target: str, case: str) -> None:
    request = retrieval_pb2.GetRequest(namespace=namespace(target), ids=["volcano"])
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).Get(request, metadata=md)


def _ask(w: World, md: Any, target: str, case: str) -> None:
    request = rag_pb2.AskRequest(question="What is lava?", namespace=namespace(target), k=2)
    drain(w.stub(rag_service_pb2_grpc.RagServiceStub).Ask(request, metadata=md))


def _embed(w: World, md: Any, target: str, case: str) -> None:
    request = embedding_pb2.EmbedRequest(texts=["lava"])
    w.stub(embedding_service_pb2_grpc.EmbeddingServiceStub).Embed(request, metadata=md)


def _generate(w: World, md: Any, target: str, case: str) -> None:
    passage = common_pb2.ContextPassage(document_id="d", chunk_id="d#0", text="Lava is hot.")
    request = generation_pb2.GenerateRequest(prompt="What is lava?", context=[passage])
    drain(w.stub(generation_service_pb2_grpc.GenerationServiceStub).Generate(request, metadata=md))


def _job(w: World, target: str) -> str:
    return w.acme_job if target == "own" else w.globex_job


def _get_job(w: World, md: Any, target: str, case: str) -> None:
    request = ingestion_pb2.GetJobRequest(job_id=_job(w, target))
    w.stub(ingestion_service_pb2_grpc.IngestionServiceStub).GetJob(request, metadata=md)


def _watch_job(w: World, md: Any, target: str, case: str) -> None:
    request = ingestion_pb2.WatchJobRequest(job_id=_job(w, target))
    drain(w.stub(ingestion_service_pb2_grpc.IngestionServiceStub).WatchJob(request, metadata=md))


def _document(case: str) -> common_pb2.Document:
    return common_pb2.Document(id=f"new-{case}", text=f"A note written by case {case}.")


def _upsert(w: World, md: Any, target: str, case: str) -> None:
    request = retrieval_pb2.UpsertRequest(namespace=namespace(target), documents=[_document(case)])
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).Upsert(request, metadata=md)


def _submit(w: World, md: Any, target: str, case: str) -> None:
    request = ingestion_pb2.SubmitRequest(namespace=namespace(target), documents=[_document(case)])
    stub = w.stub(ingestion_service_pb2_grpc.IngestionServiceStub)
    job_id = stub.Submit(request, metadata=md).job_id
    # Done before the next case looks at what is stored.
    with RagClient(w.server.target, token=ADMIN.key) as admin:
        wait(admin, job_id)


def _victim(w: World, case: str) -> str:
    """A document of acme's "docs" for this case to delete (written by the admin)."""
    doc_id = f"victim-{case}"
    with RagClient(w.server.target, token=ADMIN.key) as admin:
        admin.upsert([Document(doc_id, f"Delete me, case {case}.", {"tag": doc_id})], "docs")
    return doc_id


def _delete_ids(w: World, md: Any, target: str, case: str) -> None:
    request = retrieval_pb2.DeleteRequest(namespace=namespace(target), ids=[_victim(w, case)])
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).Delete(request, metadata=md)


def _delete_filter(w: World, md: Any, target: str, case: str) -> None:
    tag = common_pb2.MetadataValue(string_value=_victim(w, case))
    flt = common_pb2.Filter(field=common_pb2.FieldCondition(key="tag", equals=tag))
    request = retrieval_pb2.DeleteRequest(namespace=namespace(target), filter=flt)
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).Delete(request, metadata=md)


def _forget(w: World, md: Any, target: str, case: str) -> None:
    ids = [_victim(w, case)]
    request = retrieval_pb2.DeleteRequest(namespace=namespace(target), ids=ids, forget=True)
    w.stub(retrieval_service_pb2_grpc.RetrievalServiceStub).Delete(request, metadata=md)


def _stats(w: World, md: Any, target: str, case: str) -> None:
    w.stub(admin_service_pb2_grpc.AdminServiceStub).Stats(admin_pb2.StatsRequest(), metadata=md)


def _usage(w: World, md: Any, target: str, case: str) -> None:
    request = admin_pb2.UsageRequest(tenant="" if target == "own" else "globex")
    w.stub(admin_service_pb2_grpc.AdminServiceStub).Usage(request, metadata=md)


def _snapshot(w: World, md: Any, target: str, case: str) -> None:
    request = admin_pb2.SnapshotRequest(unencrypted=True)
    drain(w.stub(admin_service_pb2_grpc.AdminServiceStub).Snapshot(request, metadata=md))


def _audit_export(w: World, md: Any, target: str, case: str) -> None:
    request = admin_pb2.AuditExportRequest()
    drain(w.stub(admin_service_pb2_grpc.AdminServiceStub).AuditExport(request, metadata=md))


RPCS = [
    Rpc("Search", READ, INVALID, _search),
    Rpc("SearchBatch", READ, INVALID, _search_batch),
    Rpc("Get", READ, INVALID, _get),
    Rpc("Ask", READ, INVALID, _ask),
    Rpc("Embed", READ, None, _embed),
    Rpc("Generate", READ, None, _generate),
    Rpc("GetJob", READ, NOT_FOUND, _get_job),
    Rpc("WatchJob", READ, NOT_FOUND, _watch_job),
    Rpc("Upsert", WRITE, INVALID, _upsert),
    Rpc("Submit", WRITE, INVALID, _submit),
    Rpc("Delete by ids", WRITE, INVALID, _delete_ids),
    Rpc("Delete by filter", ADMIN_ONLY, INVALID, _delete_filter),
    Rpc("Delete forget", ADMIN_ONLY, INVALID, _forget),
    Rpc("Stats", ADMIN_OR_OPERATOR, None, _stats),
    Rpc("Usage", ADMIN_OR_OPERATOR, PD, _usage),
    Rpc("Snapshot", OPERATOR_ONLY, None, _snapshot),
    Rpc("AuditExport", OPERATOR_ONLY, None, _audit_export),
]


def expected(rpc: Rpc, caller: str, target: str) -> str:
    own = rpc.own[list(CALLERS).index(caller)]
    if target == "own" or own != OK or rpc.other is None:
        return own
    if rpc.name == "Usage" and caller == "operator":
        return OK  # operators may name any tenant
    return rpc.other


CASES = [
    pytest.param(rpc, caller, target, id=f"{rpc.name}-{caller}-{target}")
    for rpc in RPCS
    for caller in CALLERS
    for target in ("own", "other")
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("matrix")
    policy = write_policy(
        root / "policy.toml", [READER, WRITER, ADMIN, UNKNOWN, GLOBEX], operators=[OPERATOR]
    )
    server = ServerThread(make_settings(root / "data", auth={"policy_file": policy})).start()
    try:
        with RagClient(server.target, token=ADMIN.key) as acme:
            acme.upsert(CORPUS, "docs")
            acme_job = acme.submit(CORPUS[:2], "jobs")
            wait(acme, acme_job)
        with RagClient(server.target, token=GLOBEX.key) as globex:
            globex.upsert([Document("ledger", "Globex's ledger of invoices.", {})], "docs")
            globex_job = globex.submit(CORPUS[2:4], "jobs")
            wait(globex, globex_job)
        with grpc.insecure_channel(server.target) as channel:
            yield World(server, channel, acme_job, globex_job)
    finally:
        server.stop()


def wait(client: RagClient, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while not client.get_job(job_id).done:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.05)


def stored(world: World) -> tuple[object, ...]:
    """Everything a refused call must leave as it was: each namespace's sizes
    and generation, and the jobs."""
    retriever = world.server.server.retriever
    assert retriever is not None
    namespaces = tuple(
        sorted((n.name, n.documents, n.chunks, n.generation) for n in retriever.stats())
    )
    db = retriever.store.path
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        jobs = tuple(conn.execute("SELECT job_id, namespace, total FROM jobs ORDER BY job_id"))
    return namespaces, jobs


def last_audit(world: World) -> dict[str, Any] | None:
    audit = world.server.server.audit
    assert audit is not None
    head = audit.head()
    if head is None:
        return None
    return next(audit.export(after_seq=head.seq - 1))


@pytest.mark.parametrize(("rpc", "caller", "target"), CASES)
def test_matrix(world: World, rpc: Rpc, caller: str, target: str) -> None:
    who = CALLERS[caller]
    metadata = (("authorization", f"Bearer {who.key}"),) if who is not None else ()
    case = f"{rpc.name.replace(' ', '-')}-{caller}-{target}"
    want = expected(rpc, caller, target)
    before_audit = last_audit(world)
    before = stored(world) if want != OK else None
    message = ""
    try:
        rpc.call(world, metadata, target, case)
        code = OK
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        code = exc.code().name
        message = exc.details() or ""
        assert message  # every refusal says why
        # Nobody learns another tenant's stored names from a message.
        assert "globex~" not in message or target == "other"
        assert who is None or who.key not in message
    assert code == want, f"{case}: {code} {'' if code == OK else message}"
    if want == OK:
        return
    if before is not None:
        # _victim wrote the case's own document as part of the setup.
        after = stored(world)
        if rpc.call in (_delete_ids, _delete_filter, _forget):
            assert _still_there(world, case)
        else:
            assert after == before, f"{case} changed what is stored"
    if want == PD:
        record = last_audit(world)
        assert record is not None and record != before_audit
        assert who is not None
        assert (record["principal"], record["outcome"]) == (f"apikey:{who.name}", "denied")
    if want == UA:
        assert last_audit(world) == before_audit  # anonymous noise stays out of the log


def _still_there(world: World, case: str) -> bool:
    with RagClient(world.server.target, token=ADMIN.key) as admin:
        found, _ = admin.get([f"victim-{case}"], "docs")
    return len(found) == 1


def test_the_matrix_covers_every_rpc() -> None:
    from rag_grpc.pb import SERVICE_FILES

    methods = {
        method.name
        for module in SERVICE_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert {rpc.name.split(" ")[0] for rpc in RPCS} == methods


def test_jobs_hold_the_stored_name_and_nothing_leaks_the_other_tenants(world: World) -> None:
    # The queue carries "<tenant>~<namespace>": whichever worker runs a job
    # writes into its tenant's namespace.
    db: Path = world.server.server.retriever.store.path  # type: ignore[union-attr]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        namespaces = {row[0] for row in conn.execute("SELECT namespace FROM jobs")}
    assert {"acme~jobs", "globex~jobs"} <= namespaces
    with RagClient(world.server.target, token=READER.key) as reader:
        assert reader.get_job(world.acme_job).total == 2
    with RagClient(world.server.target, token=ADMIN.key) as admin:
        assert [n.name for n in admin.stats().namespaces] == ["docs", "jobs"]
