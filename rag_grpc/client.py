"""A small typed Python client over the generated stubs.

    with RagClient("localhost:50051") as client:
        client.upsert([Document("a", "text", {"lang": "en"})])
        for hit in client.search("question", k=5, filter=Equals("lang", "en")):
            print(hit.score, hit.text)

Over TLS: ``RagClient(target, ca=CA, cert=CERT, key=KEY, token=TOKEN)``
(``cert``/``key`` for mutual TLS; ``token`` a JWT or an API key). Errors
arrive as ``RpcError`` with the gRPC status code name and message.

Results are the core library's own types (Hit, SearchResult, WriteResult,
the Ask events Citations/Delta/AskFinished, JobStatus, ServerStats with its
NamespaceStats, UsageReport),
converted by ``services/convert.py``; importing the client loads neither
ONNX Runtime nor the native index.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
import numpy as np

from rag_grpc.documents import Document, Hit, SearchResult, WriteResult
from rag_grpc.errors import RagError
from rag_grpc.filters import Filter
from rag_grpc.generate.base import AskEvent, GenerationParams
from rag_grpc.index.query import SearchQuery
from rag_grpc.ingest.job_status import JobStatus
from rag_grpc.pb import (
    admin_pb2,
    admin_service_pb2_grpc,
    embedding_pb2,
    embedding_service_pb2_grpc,
    ingestion_pb2,
    ingestion_service_pb2_grpc,
    rag_pb2,
    rag_service_pb2_grpc,
    retrieval_pb2,
    retrieval_service_pb2_grpc,
)
from rag_grpc.security.model import UsageReport
from rag_grpc.services import convert
from rag_grpc.services.status import ERROR_OF
from rag_grpc.stats import ServerStats

# What a bearer token may hold (RFC 6750's b64token, wider): printable ASCII
# without spaces, as JWTs and our API keys are.
_TOKEN = re.compile(r"[\x21-\x7e]+")


class RpcError(Exception):
    """A failed call: ``code`` is the gRPC status name, e.g. "NOT_FOUND"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def error(self) -> type[RagError] | None:
        """The core error the status stands for (e.g. NotFound), by the one
        status table; None for a status without one (UNKNOWN, INTERNAL...)."""
        status = grpc.StatusCode.__members__.get(self.code)
        return ERROR_OF.get(status) if status is not None else None


class RagClient:
    """Connects to a rag-grpc server (or an Envoy in front of it)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        token: str | None = None,
    ) -> None:
        """TLS when ``ca`` (the CA that signed the server's certificate; None
        with a client certificate: the system's roots) or ``cert`` and ``key``
        (this client's certificate, for mutual TLS) are given, else plaintext.
        ``token`` (a JWT or an API key) goes with every call as
        ``authorization: Bearer <token>``. Raises TlsConfigError naming a file
        that cannot be used."""
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        tls = ca is not None or cert is not None or key is not None
        if token is not None and not _TOKEN.fullmatch(token):
            # grpc would fail every call with an error that names no cause.
            raise ValueError(
                "the token must be one line of printable ASCII without spaces "
                "(a JWT or an API key as issued)"
            )
        if token and not tls and not is_local_target(target):
            # Anyone on the path could read it and call as us.
            raise ValueError(
                f"a token goes to {target} only over TLS: give the CA that signed its "
                "certificate (ca=, --ca), or call this machine (a loopback address or "
                "unix socket)"
            )
        if tls:
            from rag_grpc.security.tls import channel_credentials

            credentials = channel_credentials(ca, cert, key)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._retrieval = retrieval_service_pb2_grpc.RetrievalServiceStub(self.channel)
        self._embedding = embedding_service_pb2_grpc.EmbeddingServiceStub(self.channel)
        self._rag = rag_service_pb2_grpc.RagServiceStub(self.channel)
        self._ingestion = ingestion_service_pb2_grpc.IngestionServiceStub(self.channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> RagClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: object) -> object:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None

    def _stream(
        self, method: grpc.UnaryStreamMultiCallable, request: object, timeout: float | None
    ) -> Iterator[Any]:
        """The responses of a server-streaming call; its failure as RpcError."""
        try:
            yield from method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None

    # -- retrieval ---------------------------------------------------------

    def upsert(self, documents: Sequence[Document], namespace: str = "") -> WriteResult:
        """Store documents synchronously (replacing same ids)."""
        request = retrieval_pb2.UpsertRequest(
            namespace=namespace, documents=[convert.document_to_pb(d) for d in documents]
        )
        response = self._call(self._retrieval.Upsert, request)
        assert isinstance(response, retrieval_pb2.UpsertResponse)
        return convert.upsert_result_from_pb(response)

    def delete(
        self,
        ids: Sequence[str] = (),
        namespace: str = "",
        *,
        filter: Filter | None = None,
        forget: bool = False,
    ) -> WriteResult:
        """Delete documents by id and/or filter; forget erases them for good."""
        request = retrieval_pb2.DeleteRequest(namespace=namespace, ids=list(ids), forget=forget)
        if filter is not None:
            request.filter.CopyFrom(convert.filter_to_pb(filter))
        response = self._call(self._retrieval.Delete, request)
        assert isinstance(response, retrieval_pb2.DeleteResponse)
        return convert.delete_result_from_pb(response)

    def get(self, ids: Sequence[str], namespace: str = "") -> tuple[list[Document], list[str]]:
        """Stored documents (in request order) and the ids not found."""
        request = retrieval_pb2.GetRequest(namespace=namespace, ids=list(ids))
        response = self._call(self._retrieval.Get, request)
        assert isinstance(response, retrieval_pb2.GetResponse)
        return [convert.document_from_pb(d) for d in response.documents], list(response.missing_ids)

    def search(
        self, query: str | Sequence[float] | np.ndarray, **args: Unpack[SearchArgs]
    ) -> list[Hit]:
        """The k best hits for a text or vector query; with by_document, the best
        chunks_per_document (0: 1) hits of each of k distinct documents; mode,
        fusion and re-ranking as in `SearchOptions` (unset: the server's
        defaults)."""
        return self.search_result(query, **args).hits

    def search_result(
        self, query: str | Sequence[float] | np.ndarray, **args: Unpack[SearchArgs]
    ) -> SearchResult:
        """Like search, with the index generation and timings."""
        request = convert.query_to_pb(_query(query, args))
        response = self._call(self._retrieval.Search, request)
        assert isinstance(response, retrieval_pb2.SearchResponse)
        return convert.result_from_pb(response)

    def search_batch(self, queries: Sequence[SearchQuery]) -> list[SearchResult]:
        """Many searches in one call, answered in order."""
        request = retrieval_pb2.SearchBatchRequest(
            queries=[convert.query_to_pb(q) for q in queries]
        )
        response = self._call(self._retrieval.SearchBatch, request)
        assert isinstance(response, retrieval_pb2.SearchBatchResponse)
        return [convert.result_from_pb(r) for r in response.results]

    # -- embedding, ask ----------------------------------------------------

    def embed(self, texts: Sequence[str], model_id: str = "") -> np.ndarray:
        """Unit vectors float32 [len(texts), dimension]."""
        request = embedding_pb2.EmbedRequest(texts=list(texts), model_id=model_id)
        response = self._call(self._embedding.Embed, request)
        assert isinstance(response, embedding_pb2.EmbedResponse)
        return np.frombuffer(response.vectors, dtype="<f4").reshape(
            response.count, response.dimension
        )

    def ask(
        self,
        question: str,
        *,
        namespace: str = "",
        k: int = 0,
        filter: Filter | None = None,
        params: GenerationParams | None = None,
    ) -> Iterator[AskEvent]:
        """Yields the Citations, then the answer's text in Delta pieces, then AskFinished."""
        request = rag_pb2.AskRequest(
            question=question,
            namespace=namespace,
            k=k,
            parameters=convert.params_to_pb(params or GenerationParams()),
        )
        if filter is not None:
            request.filter.CopyFrom(convert.filter_to_pb(filter))
        yield from map(
            convert.ask_event_from_pb, self._stream(self._rag.Ask, request, self.timeout)
        )

    # -- ingestion, admin --------------------------------------------------

    def submit(self, documents: Sequence[Document], namespace: str = "") -> str:
        """Queue documents for ingestion; return the job id."""
        request = ingestion_pb2.SubmitRequest(
            namespace=namespace, documents=[convert.document_to_pb(d) for d in documents]
        )
        response = self._call(self._ingestion.Submit, request)
        assert isinstance(response, ingestion_pb2.SubmitResponse)
        return response.job_id

    def get_job(self, job_id: str) -> JobStatus:
        """A job's progress."""
        response = self._call(self._ingestion.GetJob, ingestion_pb2.GetJobRequest(job_id=job_id))
        assert isinstance(response, ingestion_pb2.Job)
        return convert.job_from_pb(response)

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[JobStatus]:
        """The job's progress on every change until it ends."""
        request = ingestion_pb2.WatchJobRequest(job_id=job_id)
        yield from map(
            convert.job_from_pb, self._stream(self._ingestion.WatchJob, request, timeout)
        )

    def snapshot(self, *, unencrypted: bool = False) -> Iterator[admin_pb2.SnapshotChunk]:
        """The server's backup archive, in chunks (the last carries size and sha256)."""
        request = admin_pb2.SnapshotRequest(unencrypted=unencrypted)
        yield from self._stream(self._admin.Snapshot, request, self.timeout)

    def usage(self, tenant: str = "") -> list[UsageReport]:
        """Usage per tenant: the caller's own tenant, or (for an operator)
        every tenant, or the one named."""
        response = self._call(self._admin.Usage, admin_pb2.UsageRequest(tenant=tenant))
        assert isinstance(response, admin_pb2.UsageResponse)
        return [convert.usage_report_from_pb(t) for t in response.tenants]

    def audit_export(self, since: datetime | None = None) -> Iterator[dict[str, object]]:
        """The audit log's records at or after since (operators only), in
        order, as the dicts `AuditLog.export` gives for the file itself."""
        stamp = "" if since is None else since.astimezone(UTC).isoformat().replace("+00:00", "Z")
        request = admin_pb2.AuditExportRequest(since=stamp)
        records = self._stream(self._admin.AuditExport, request, self.timeout)
        yield from map(convert.audit_record_from_pb, records)

    def stats(self) -> ServerStats:
        """Sizes, models and version of the server."""
        response = self._call(self._admin.Stats, admin_pb2.StatsRequest())
        assert isinstance(response, admin_pb2.StatsResponse)
        return convert.server_stats_from_pb(response)


def is_local_target(target: str) -> bool:
    """Whether a gRPC target is this machine: a unix socket, localhost or a
    loopback address ("127.0.0.1:50051", "[::1]:50051", "dns:///localhost:1")."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host = target[1:].partition("]")[0]
    else:
        host = target.rpartition(":")[0] if target.count(":") == 1 else target
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SearchOptions(TypedDict, total=False):
    """Optional SearchQuery fields a search call may set (see SearchRequest)."""

    by_document: bool
    chunks_per_document: int
    mode: str  # "dense", "lexical" or "hybrid"
    fusion: str  # "rrf" or "relative_score"
    rrf_k: int
    dense_weight: float
    lexical_weight: float
    candidates: int
    rerank: bool
    rerank_top_n: int


class SearchArgs(SearchOptions, total=False):
    """A search call's keyword arguments: the SearchOptions, and k (0: the
    server's default), namespace, filter and ef (0: the server's default)."""

    k: int
    namespace: str
    filter: Filter | None
    ef: int


def _query(query: str | Sequence[float] | np.ndarray, args: SearchArgs) -> SearchQuery:
    if isinstance(query, str):
        return SearchQuery(text=query, **args)
    return SearchQuery(vector=[float(v) for v in query], **args)


def _rpc_error(exc: grpc.RpcError) -> RpcError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return RpcError(code.name if code else "UNKNOWN", details or "")
