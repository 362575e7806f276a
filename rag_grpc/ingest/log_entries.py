"""Prepared writes as entries of the NATS write log, and back.

Decoding trusts nothing: any entry that is not a well-formed prepared write
raises InvalidArgument, and what decodes is checked again when applied
(`WritePath.check_upsert` / `check_delete`)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection

import numpy as np

from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument
from rag_grpc.index.writes import PreparedDelete, PreparedUpsert
from rag_grpc.store.sqlite import NewChunk


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
