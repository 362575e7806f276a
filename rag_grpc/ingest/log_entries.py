"""Prepared writes and usage batches as entries of the NATS write log, and back.

Decoding trusts nothing: any entry that is not a well-formed prepared write
or usage batch raises InvalidArgument, and what decodes as a write is
checked again when applied (`WriteChecks.check_upsert` / `check_delete`)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection
from datetime import date

import numpy as np

from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument
from rag_grpc.index.writes import PreparedDelete, PreparedUpsert
from rag_grpc.security.usage import (
    COUNTERS,
    MAX_BATCH_COUNT,
    MAX_BATCH_ROWS,
    UsageBatch,
    validate_tenant,
)
from rag_grpc.store.sqlite import NewChunk

BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def encode_prepared_upsert(prepared: PreparedUpsert) -> dict[str, object]:
    """A prepared upsert as JSON-ready data (the NATS write log's entry)."""
    return {
        "op": "upsert",
        "namespace": prepared.namespace,
        "written_at": prepared.written_at,
        "documents": [
            {"id": d.id, "text": d.text, "metadata": d.metadata, "type": d.content_type}
            for d in prepared.documents
        ],
        "chunks": [
            [
                c.doc_id,
                c.seq,
                c.text,
                base64.b64encode(np.ascontiguousarray(c.vector, dtype="<f4").tobytes()).decode(),
            ]
            for c in prepared.chunks
        ],
    }


def decode_prepared(record: object) -> PreparedUpsert | PreparedDelete:
    """A log entry back to a prepared write; InvalidArgument when it is not one.
    The result still goes through check_upsert / check_delete when applied."""
    try:
        if not isinstance(record, dict):
            raise TypeError("not an object")
        op = record["op"]
        namespace = record["namespace"]
        if not isinstance(namespace, str):
            raise TypeError("namespace is not text")
        if op == "upsert":
            documents = tuple(
                Document(d["id"], d["text"], dict(d["metadata"]), str(d.get("type", "")))
                for d in record["documents"]
            )
            chunks = tuple(
                NewChunk(
                    c[0],
                    c[1],
                    c[2],
                    np.frombuffer(base64.b64decode(c[3], validate=True), dtype="<f4"),
                )
                for c in record["chunks"]
            )
            return PreparedUpsert(
                namespace, documents, chunks, written_at=float(record.get("written_at", 0.0))
            )
        if op == "delete":
            ids = record["ids"]
            if not isinstance(ids, list):
                raise TypeError("ids is not a list")
            older = record.get("older_than")
            return PreparedDelete(
                namespace,
                tuple(ids),
                bool(record.get("forget", False)),
                str(record.get("actor", ""))[:512],
                None if older is None else float(older),
            )
        raise ValueError(f"unknown kind {str(op)[:40]!r}")
    except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as exc:
        raise InvalidArgument(f"malformed write: {exc}") from None


def encode_prepared_delete(prepared: PreparedDelete) -> dict[str, object]:
    """A prepared deletion as JSON-ready data (the NATS write log's entry)."""
    return {
        "op": "delete",
        "namespace": prepared.namespace,
        "ids": list(prepared.ids),
        "forget": prepared.forget,
        "actor": prepared.actor,
        "older_than": prepared.older_than,
    }


def encode_usage(batch: UsageBatch) -> dict[str, object]:
    """A usage batch as JSON-ready data (the NATS write log's entry): one
    row per tenant and UTC day with its counters (those above zero)."""
    return {
        "op": "usage",
        "batch": batch.batch_id,
        "rows": [
            {"tenant": tenant, "day": day, **{c: n for c, n in counts.items() if n}}
            for (tenant, day), counts in batch.counts.items()
        ],
    }


def decode_entry(record: object) -> PreparedUpsert | PreparedDelete | UsageBatch:
    """Any log entry back to what it carries; InvalidArgument when it is
    not a well-formed one."""
    if isinstance(record, dict) and record.get("op") == "usage":
        return decode_usage(record)
    return decode_prepared(record)


def decode_usage(record: dict[str, object]) -> UsageBatch:
    """A usage entry back to its batch, every field checked (it may come
    from anyone who can publish to the log): the batch id, at most
    MAX_BATCH_ROWS rows, each a tenant name a policy may hold, a real
    YYYY-MM-DD day, and known counters of whole numbers 0..MAX_BATCH_COUNT,
    no (tenant, day) twice; InvalidArgument otherwise."""
    batch_id, rows = record.get("batch"), record.get("rows")
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise InvalidArgument(f"malformed usage entry: batch id {str(batch_id)[:80]!r}")
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_BATCH_ROWS:
        raise InvalidArgument(
            f"malformed usage entry: rows must be a list of 1 to {MAX_BATCH_ROWS} objects"
        )
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise InvalidArgument("malformed usage entry: a row is not an object")
        tenant, day = validate_tenant(row.get("tenant")), row.get("day")
        if not isinstance(day, str) or not DAY.fullmatch(day) or not _is_date(day):
            raise InvalidArgument(f"malformed usage entry: day {str(day)[:40]!r} is not YYYY-MM-DD")
        if (tenant, day) in counts:
            raise InvalidArgument(f"malformed usage entry: {tenant} on {day} appears twice")
        values: dict[str, int] = {}
        for name, value in row.items():
            if name in ("tenant", "day"):
                continue
            if name not in COUNTERS:
                raise InvalidArgument(
                    f"malformed usage entry: unknown counter {str(name)[:40]!r}; "
                    f"known: {', '.join(COUNTERS)}"
                )
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"malformed usage entry: {name} is not a whole number")
            if not 0 <= value <= MAX_BATCH_COUNT:
                raise InvalidArgument(
                    f"malformed usage entry: {name} must be between 0 and {MAX_BATCH_COUNT}, "
                    f"got {str(value)[:40]}"
                )
            values[name] = value
        counts[(tenant, day)] = values
    return UsageBatch(batch_id, counts)


def _is_date(day: str) -> bool:
    try:
        date.fromisoformat(day)
    except ValueError:
        return False
    return True


def only_documents(prepared: PreparedUpsert, doc_ids: Collection[str]) -> PreparedUpsert:
    """The part of a prepared upsert that writes these documents (and their
    chunks), with the original write time."""
    return PreparedUpsert(
        prepared.namespace,
        tuple(d for d in prepared.documents if d.id in doc_ids),
        tuple(c for c in prepared.chunks if c.doc_id in doc_ids),
        written_at=prepared.written_at,
    )


def entry_bytes(entry: dict[str, object]) -> bytes:
    """The wire form of a log entry."""
    return json.dumps(entry).encode()
