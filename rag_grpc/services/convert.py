"""Conversions between protobuf messages and the core's dataclasses.

Used by the servicers, the remote backends and the Python client, so each
message has one mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    printable,
)
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import And, AnyOf, Equals, Filter, Or, Range
from rag_grpc.generate.base import GenerationParams, Passage, Usage
from rag_grpc.index.retriever import SearchQuery
from rag_grpc.ingest.jobs import JobState, JobStatus
from rag_grpc.pb import common_pb2, generation_pb2, ingestion_pb2, retrieval_pb2

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
