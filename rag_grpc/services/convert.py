"""Conversions between protobuf messages and the core's dataclasses, both
directions, for every message that carries a core value.

Used by the servicers, the remote backends and the Python client, so each
message has one mapping. Imports no more than the value types, so the client
stays light (no ONNX Runtime, no native extension).

Why one file of ~650 lines: it is one idea, the contract's edge, as
qdrant-client's conversions/conversion.py is. Each function is a few lines
that mirror one message; the sections (metadata, filters, search,
generation, ask, jobs, admin) call each other (a Hit is metadata, a query
is a filter, an Ask summary is a generation's usage), and a reader looking
for a message's mapping, or checking both directions agree, finds them
side by side in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from rag_grpc.documents import (
    Document,
    GivenChunk,
    Hit,
    MetadataScalar,
    SearchResult,
    SearchTimings,
    WriteResult,
    printable,
)
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import And, AnyOf, Equals, Filter, Or, Range
from rag_grpc.generate.base import (
    AskEvent,
    AskFinished,
    AskTimings,
    Citations,
    Delta,
    Finished,
    GenerationEvent,
    GenerationParams,
    Passage,
    Usage,
)
from rag_grpc.index.query import NamespaceStats, SearchQuery
from rag_grpc.ingest.job_status import JobState, JobStatus
from rag_grpc.pb import admin_pb2, common_pb2, generation_pb2, ingestion_pb2, rag_pb2, retrieval_pb2
from rag_grpc.security.model import UsageReport
from rag_grpc.stats import ServerStats

# -- metadata ----------------------------------------------------------------


def value_from_pb(value: common_pb2.MetadataValue, key: str) -> MetadataScalar:
    """A typed scalar; InvalidArgument if no kind is set."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"metadata value for {key!r} has no kind set")
    scalar: MetadataScalar = getattr(value, kind)
    return scalar


def value_to_pb(value: MetadataScalar) -> common_pb2.MetadataValue:
    """bool before int: bool is an int in Python."""
    if isinstance(value, bool):
        return common_pb2.MetadataValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.MetadataValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.MetadataValue(double_value=value)
    return common_pb2.MetadataValue(string_value=value)


def metadata_from_pb(
    metadata: Mapping[str, common_pb2.MetadataValue],
) -> dict[str, MetadataScalar]:
    """A proto metadata map as a plain dict."""
    return {key: value_from_pb(value, key) for key, value in metadata.items()}


def fill_metadata(
    target: Mapping[str, common_pb2.MetadataValue], metadata: Mapping[str, MetadataScalar]
) -> None:
    """Copy plain metadata into a proto map field."""
    # Fields set in place: a message per value and a CopyFrom took a third
    # of a Search hit's conversion (bool before int: bool is an int).
    for key, value in metadata.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, int):
            slot.int_value = value
        elif isinstance(value, float):
            slot.double_value = value
        else:
            slot.string_value = value


def document_from_pb(doc: common_pb2.Document) -> Document:
    """A core Document from its message; InvalidArgument for both vector forms at once."""
    if doc.vector and doc.chunks:
        raise InvalidArgument(
            f"document {printable(doc.id[:80])} sets both vector and chunks; set one"
        )
    chunks: tuple[GivenChunk, ...] = ()
    if doc.vector:
        chunks = (GivenChunk(doc.text, np.asarray(doc.vector, dtype=np.float32)),)
    elif doc.chunks:
        chunks = tuple(
            GivenChunk(c.text, np.asarray(c.vector, dtype=np.float32)) for c in doc.chunks
        )
    return Document(
        doc.id,
        doc.text,
        metadata_from_pb(doc.metadata),
        doc.content_type,
        chunks,
        doc.vector_model_id,
    )


def document_to_pb(doc: Document) -> common_pb2.Document:
    """A Document message (with the caller's own vectors, when it has them)."""
    message = common_pb2.Document(
        id=doc.id,
        text=doc.text,
        content_type=doc.content_type,
        vector_model_id=doc.vector_model_id,
    )
    fill_metadata(message.metadata, doc.metadata)
    for chunk in doc.chunks:
        message.chunks.add(text=chunk.text, vector=np.asarray(chunk.vector).tolist())
    return message


# -- filters -----------------------------------------------------------------


def filter_from_pb(flt: common_pb2.Filter) -> Filter:
    """The core filter; InvalidArgument for a filter with an unset clause."""
    clause = flt.WhichOneof("clause")
    if clause == "all":
        return And(tuple(filter_from_pb(f) for f in flt.all.filters))
    if clause == "any":
        return Or(tuple(filter_from_pb(f) for f in flt.any.filters))
    if clause != "field":
        raise InvalidArgument("filter has no clause: set one of field, all, any")
    cond = flt.field
    match = cond.WhichOneof("match")
    if match == "equals":
        return Equals(cond.key, value_from_pb(cond.equals, cond.key))
    if match == "any_of":
        return AnyOf(cond.key, tuple(value_from_pb(v, cond.key) for v in cond.any_of.values))
    if match == "range":
        r = cond.range
        return Range(
            cond.key,
            gte=r.gte if r.HasField("gte") else None,
            gt=r.gt if r.HasField("gt") else None,
            lte=r.lte if r.HasField("lte") else None,
            lt=r.lt if r.HasField("lt") else None,
        )
    raise InvalidArgument(
        f"filter condition on {cond.key!r} has no match: set one of equals, any_of, range"
    )


def filter_to_pb(flt: Filter) -> common_pb2.Filter:
    """The Filter message of a core filter."""
    if isinstance(flt, And):
        return common_pb2.Filter(
            all=common_pb2.FilterList(filters=[filter_to_pb(f) for f in flt.filters])
        )
    if isinstance(flt, Or):
        return common_pb2.Filter(
            any=common_pb2.FilterList(filters=[filter_to_pb(f) for f in flt.filters])
        )
    if isinstance(flt, Equals):
        cond = common_pb2.FieldCondition(key=flt.key, equals=value_to_pb(flt.value))
    elif isinstance(flt, AnyOf):
        values = common_pb2.MetadataValueList(values=[value_to_pb(v) for v in flt.values])
        cond = common_pb2.FieldCondition(key=flt.key, any_of=values)
    else:
        bounds = {
            name: getattr(flt, name)
            for name in ("gte", "gt", "lte", "lt")
            if getattr(flt, name) is not None
        }
        cond = common_pb2.FieldCondition(key=flt.key, range=common_pb2.NumericRange(**bounds))
    return common_pb2.Filter(field=cond)


# -- search ------------------------------------------------------------------


def query_from_pb(request: retrieval_pb2.SearchRequest) -> SearchQuery:
    """A core SearchQuery from a SearchRequest."""
    which = request.WhichOneof("query")
    return SearchQuery(
        namespace=request.namespace,
        text=request.text if which == "text" else None,
        vector=np.asarray(request.vector.values, dtype=np.float32) if which == "vector" else None,
        k=request.k,
        filter=filter_from_pb(request.filter) if request.HasField("filter") else None,
        ef=request.ef,
        by_document=request.by_document,
        chunks_per_document=request.chunks_per_document,
        mode=_MODES.get(request.mode, f"unknown ({request.mode})"),
        fusion=_FUSIONS.get(request.fusion.method, f"unknown ({request.fusion.method})"),
        rrf_k=request.fusion.rrf_k,
        dense_weight=(
            request.fusion.dense_weight if request.fusion.HasField("dense_weight") else None
        ),
        lexical_weight=(
            request.fusion.lexical_weight if request.fusion.HasField("lexical_weight") else None
        ),
        candidates=request.fusion.candidates,
        rerank=request.rerank if request.HasField("rerank") else None,
        rerank_top_n=request.rerank_top_n,
    )


# Wire enum values <-> the core's names ("" is the server's default).
_MODES = {
    retrieval_pb2.RETRIEVAL_MODE_UNSPECIFIED: "",
    retrieval_pb2.RETRIEVAL_MODE_DENSE: "dense",
    retrieval_pb2.RETRIEVAL_MODE_LEXICAL: "lexical",
    retrieval_pb2.RETRIEVAL_MODE_HYBRID: "hybrid",
}
_FUSIONS = {
    retrieval_pb2.Fusion.METHOD_UNSPECIFIED: "",
    retrieval_pb2.Fusion.METHOD_RRF: "rrf",
    retrieval_pb2.Fusion.METHOD_RELATIVE_SCORE: "relative_score",
}


def query_to_pb(query: SearchQuery) -> retrieval_pb2.SearchRequest:
    """A SearchRequest for a core SearchQuery (used by remote backends and the client)."""
    request = retrieval_pb2.SearchRequest(
        namespace=query.namespace,
        k=query.k,
        ef=query.ef,
        by_document=query.by_document,
        chunks_per_document=query.chunks_per_document,
        rerank_top_n=query.rerank_top_n,
    )
    request.mode = _wire(_MODES, query.mode, "mode")
    request.fusion.method = _wire(_FUSIONS, query.fusion, "fusion")
    request.fusion.rrf_k = query.rrf_k
    request.fusion.candidates = query.candidates
    if query.dense_weight is not None:
        request.fusion.dense_weight = query.dense_weight
    if query.lexical_weight is not None:
        request.fusion.lexical_weight = query.lexical_weight
    if query.rerank is not None:
        request.rerank = query.rerank
    if query.vector is not None:
        request.vector.values.extend(query.vector)
    elif query.text is not None:
        request.text = query.text
    if query.filter is not None:
        request.filter.CopyFrom(filter_to_pb(query.filter))
    return request


def _wire(names: Mapping[Any, str], name: str, what: str) -> Any:
    for value, known in names.items():
        if known == name:
            return value
    raise InvalidArgument(
        f"unknown {what} {name!r}; choose from {', '.join(filter(None, names.values()))}"
    )


def hit_to_pb(hit: Hit) -> retrieval_pb2.Hit:
    """A Hit message."""
    message = retrieval_pb2.Hit(
        document_id=hit.document_id, chunk_id=hit.chunk_id, score=hit.score, text=hit.text
    )
    fill_metadata(message.metadata, hit.metadata)
    return message


def hit_from_pb(hit: retrieval_pb2.Hit) -> Hit:
    """A core Hit."""
    return Hit(hit.document_id, hit.chunk_id, hit.score, hit.text, metadata_from_pb(hit.metadata))


def result_to_pb(result: SearchResult) -> retrieval_pb2.SearchResponse:
    """A SearchResponse."""
    t = result.timings
    return retrieval_pb2.SearchResponse(
        hits=[hit_to_pb(h) for h in result.hits],
        index_generation=result.index_generation,
        timings=retrieval_pb2.SearchTimings(
            embed_ms=t.embed_ms, search_ms=t.search_ms, total_ms=t.total_ms
        ),
    )


def result_from_pb(response: retrieval_pb2.SearchResponse) -> SearchResult:
    """A core SearchResult."""
    t = response.timings
    return SearchResult(
        [hit_from_pb(h) for h in response.hits],
        response.index_generation,
        SearchTimings(t.embed_ms, t.search_ms, t.total_ms),
    )


def upsert_result_to_pb(result: WriteResult) -> retrieval_pb2.UpsertResponse:
    """An UpsertResponse."""
    return retrieval_pb2.UpsertResponse(
        upserted=result.documents,
        chunks=result.chunks,
        index_generation=result.index_generation,
        unchanged=result.unchanged,
    )


def upsert_result_from_pb(response: retrieval_pb2.UpsertResponse) -> WriteResult:
    """The WriteResult of an Upsert."""
    return WriteResult(
        response.upserted,
        response.chunks,
        response.index_generation,
        unchanged=response.unchanged,
    )


def delete_result_to_pb(result: WriteResult) -> retrieval_pb2.DeleteResponse:
    """A DeleteResponse."""
    return retrieval_pb2.DeleteResponse(
        deleted=result.documents,
        index_generation=result.index_generation,
        not_found_ids=list(result.not_found_ids),
    )


def delete_result_from_pb(response: retrieval_pb2.DeleteResponse) -> WriteResult:
    """The WriteResult of a Delete."""
    return WriteResult(
        response.deleted, 0, response.index_generation, tuple(response.not_found_ids)
    )


# -- generation --------------------------------------------------------------


def params_from_pb(params: common_pb2.GenerationParameters) -> GenerationParams:
    """Core generation parameters."""
    return GenerationParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=tuple(params.stop),
    )


def params_to_pb(params: GenerationParams) -> common_pb2.GenerationParameters:
    """A GenerationParameters message."""
    return common_pb2.GenerationParameters(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=list(params.stop),
    )


def passage_from_pb(p: common_pb2.ContextPassage) -> Passage:
    """A core Passage."""
    return Passage(p.document_id, p.chunk_id, p.text, p.score)


def passage_to_pb(p: Passage) -> common_pb2.ContextPassage:
    """A ContextPassage message."""
    return common_pb2.ContextPassage(
        document_id=p.document_id, chunk_id=p.chunk_id, text=p.text, score=p.score
    )


def usage_to_pb(usage: Usage) -> common_pb2.Usage:
    """A Usage message."""
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def usage_from_pb(usage: common_pb2.Usage) -> Usage:
    """Core token counts (the total is derived, not read)."""
    return Usage(usage.prompt_tokens, usage.completion_tokens)


def summary_to_pb(
    generator: str, finish_reason: str, usage: Usage, cited: tuple[int, ...]
) -> generation_pb2.GenerationSummary:
    """A GenerationSummary message."""
    return generation_pb2.GenerationSummary(
        usage=usage_to_pb(usage),
        generator=generator,
        finish_reason=finish_reason,
        cited_passages=list(cited),
    )


def finished_from_pb(summary: generation_pb2.GenerationSummary) -> Finished:
    """The Finished event of a generation from its summary message."""
    return Finished(
        usage_from_pb(summary.usage),
        summary.generator,
        summary.finish_reason,
        tuple(summary.cited_passages),
    )


def generation_event_from_pb(response: generation_pb2.GenerateResponse) -> GenerationEvent:
    """One event of a Generate stream: a Delta, or the closing Finished."""
    if response.WhichOneof("event") == "delta":
        return Delta(response.delta)
    return finished_from_pb(response.summary)


# -- ask ---------------------------------------------------------------------


def citations_to_pb(event: Citations) -> rag_pb2.Citations:
    """The Citations message: each hit numbered by its position, from 1."""
    citations = []
    for index, hit in enumerate(event.hits, start=1):
        citation = rag_pb2.Citation(
            index=index,
            document_id=hit.document_id,
            chunk_id=hit.chunk_id,
            score=hit.score,
            text=hit.text,
        )
        fill_metadata(citation.metadata, hit.metadata)
        citations.append(citation)
    return rag_pb2.Citations(citations=citations)


def citations_from_pb(message: rag_pb2.Citations) -> Citations:
    """Core Citations, in the order sent (which numbers them 1, 2, ...)."""
    return Citations(
        [
            Hit(c.document_id, c.chunk_id, c.score, c.text, metadata_from_pb(c.metadata))
            for c in message.citations
        ]
    )


def ask_summary_to_pb(event: AskFinished) -> rag_pb2.AskSummary:
    """The AskSummary message that ends an Ask stream."""
    t = event.timings
    return rag_pb2.AskSummary(
        usage=usage_to_pb(event.finished.usage),
        timings=rag_pb2.AskTimings(
            embed_ms=t.embed_ms,
            retrieve_ms=t.retrieve_ms,
            generate_ms=t.generate_ms,
            first_token_ms=t.first_token_ms,
            total_ms=t.total_ms,
        ),
        generator=event.finished.generator,
        finish_reason=event.finished.finish_reason,
        cited=list(event.cited),
        cached=event.cached,
    )


def ask_summary_from_pb(summary: rag_pb2.AskSummary) -> AskFinished:
    """The core AskFinished of an AskSummary message."""
    t = summary.timings
    cited = tuple(summary.cited)
    return AskFinished(
        Finished(usage_from_pb(summary.usage), summary.generator, summary.finish_reason, cited),
        AskTimings(t.embed_ms, t.retrieve_ms, t.generate_ms, t.first_token_ms, t.total_ms),
        cited,
        summary.cached,
    )


def ask_event_to_pb(event: AskEvent) -> rag_pb2.AskResponse:
    """One AskResponse of the stream."""
    if isinstance(event, Citations):
        return rag_pb2.AskResponse(citations=citations_to_pb(event))
    if isinstance(event, Delta):
        return rag_pb2.AskResponse(delta=event.text)
    return rag_pb2.AskResponse(summary=ask_summary_to_pb(event))


def ask_event_from_pb(response: rag_pb2.AskResponse) -> AskEvent:
    """The core event of one AskResponse."""
    kind = response.WhichOneof("event")
    if kind == "citations":
        return citations_from_pb(response.citations)
    if kind == "delta":
        return Delta(response.delta)
    return ask_summary_from_pb(response.summary)


# -- jobs --------------------------------------------------------------------


_JOB_STATES = {
    JobState.QUEUED: ingestion_pb2.Job.QUEUED,
    JobState.RUNNING: ingestion_pb2.Job.RUNNING,
    JobState.SUCCEEDED: ingestion_pb2.Job.SUCCEEDED,
    JobState.FAILED: ingestion_pb2.Job.FAILED,
}


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_to_pb(job: JobStatus) -> ingestion_pb2.Job:
    """A Job message."""
    return ingestion_pb2.Job(
        job_id=job.job_id,
        namespace=job.namespace,
        state=_JOB_STATES[job.state],
        total_documents=job.total,
        processed_documents=job.processed,
        failed_documents=job.failed,
        chunks=job.chunks,
        errors=[ingestion_pb2.DocumentError(document_id=d, message=m) for d, m in job.errors],
        created_at=_timestamp(job.created_at),
        updated_at=_timestamp(job.updated_at),
    )


_JOB_STATE_OF = {wire: state for state, wire in _JOB_STATES.items()}


def job_from_pb(job: ingestion_pb2.Job) -> JobStatus:
    """The core JobStatus of a Job message."""
    return JobStatus(
        job_id=job.job_id,
        namespace=job.namespace,
        state=_JOB_STATE_OF[job.state],
        total=job.total_documents,
        processed=job.processed_documents,
        failed=job.failed_documents,
        chunks=job.chunks,
        errors=tuple((e.document_id, e.message) for e in job.errors),
        created_at=job.created_at.ToNanoseconds() / 1e9,
        updated_at=job.updated_at.ToNanoseconds() / 1e9,
    )


# -- admin -------------------------------------------------------------------


def namespace_stats_to_pb(stats: NamespaceStats, tenant: str = "") -> admin_pb2.NamespaceStats:
    """A NamespaceStats message; `stats.name` as the caller names it, `tenant`
    the owner shown to operators ("" otherwise)."""
    return admin_pb2.NamespaceStats(
        name=stats.name,
        tenant=tenant,
        documents=stats.documents,
        chunks=stats.chunks,
        vectors=stats.vectors,
        index_generation=stats.generation,
    )


def namespace_stats_from_pb(message: admin_pb2.NamespaceStats) -> NamespaceStats:
    """The core NamespaceStats of a message (the tenant is not kept)."""
    return NamespaceStats(
        message.name, message.documents, message.chunks, message.vectors, message.index_generation
    )


def server_stats_to_pb(stats: ServerStats, owners: Sequence[str] = ()) -> admin_pb2.StatsResponse:
    """A StatsResponse with what ServerStats holds; `owners` the tenant of each
    namespace, shown to operators ("" each, or none given, otherwise). What only
    the wire carries (uptime, index parameters, the models' counters, flags)
    the servicer adds."""
    owners = owners or [""] * len(stats.namespaces)
    return admin_pb2.StatsResponse(
        version=stats.version,
        services=stats.services,
        namespaces=[
            namespace_stats_to_pb(ns, owner)
            for ns, owner in zip(stats.namespaces, owners, strict=True)
        ],
        models=[admin_pb2.ModelInfo(model_id=model_id) for model_id in stats.models],
        generator=stats.generator,
    )


def server_stats_from_pb(response: admin_pb2.StatsResponse) -> ServerStats:
    """The core ServerStats of a StatsResponse (the models by id)."""
    return ServerStats(
        response.version,
        tuple(response.services),
        tuple(namespace_stats_from_pb(n) for n in response.namespaces),
        response.generator,
        tuple(m.model_id for m in response.models),
    )


# The TenantUsage message names its fields as UsageReport does, one for one.
def usage_report_to_pb(report: UsageReport) -> admin_pb2.TenantUsage:
    """A TenantUsage message: a tenant's counts and estimated costs."""
    return admin_pb2.TenantUsage(**asdict(report))


def usage_report_from_pb(message: admin_pb2.TenantUsage) -> UsageReport:
    """The core UsageReport of a TenantUsage message."""
    return UsageReport(**{f.name: getattr(message, f.name) for f in fields(UsageReport)})


def audit_record_to_pb(row: Mapping[str, Any]) -> admin_pb2.AuditRecord:
    """An AuditRecord message from a record as `AuditLog.export` gives it."""
    return admin_pb2.AuditRecord(
        seq=row["seq"],
        at=row["at"],
        principal=row["principal"],
        tenant=row.get("tenant") or "",
        action=row["action"],
        outcome=row["outcome"],
        namespace=row.get("namespace") or "",
        ids=row.get("ids", []),
        ids_total=row.get("ids_total", 0),
        detail=row.get("detail", ""),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def audit_record_from_pb(r: admin_pb2.AuditRecord) -> dict[str, object]:
    """A record as `AuditLog.export` gives it for the file itself ("" -> None
    for tenant and namespace)."""
    return {
        "seq": r.seq,
        "at": r.at,
        "principal": r.principal,
        "tenant": r.tenant or None,
        "action": r.action,
        "outcome": r.outcome,
        "namespace": r.namespace or None,
        "ids": list(r.ids),
        "ids_total": r.ids_total,
        "detail": r.detail,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    }
