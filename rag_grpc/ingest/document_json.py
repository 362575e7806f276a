"""Documents as JSON, the form both job queues keep them in (SQLite's
job_documents rows, NATS's <P>_JOBS messages) until a worker takes them.

Decoding trusts nothing: a malformed entry raises ValueError, and what
decodes is validated again by the write path."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from rag_grpc.documents import Document, GivenChunk


def document_to_json(doc: Document) -> dict[str, Any]:
    """A document as JSON-ready data (its own vectors as base64 float32)."""
    data: dict[str, Any] = {
        "id": doc.id,
        "text": doc.text,
        "metadata": doc.metadata,
        "type": doc.content_type,
    }
    if doc.chunks:
        data["chunks"] = [[c.text, _b64(c.vector)] for c in doc.chunks]
        data["model"] = doc.vector_model_id
    return data


def document_from_json(raw: Any) -> Document:
    """The document back; ValueError when raw is not one."""
    try:
        if not isinstance(raw, dict) or not isinstance(raw["metadata"], dict):
            raise TypeError("not a document object")
        chunks = tuple(
            GivenChunk(str(text), np.frombuffer(base64.b64decode(vector, validate=True), "<f4"))
            for text, vector in raw.get("chunks", ())
        )
        return Document(
            raw["id"],
            raw["text"],
            raw["metadata"],
            str(raw.get("type", "")),
            chunks,
            str(raw.get("model", "")),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ValueError(f"malformed document: {exc}") from None


def _b64(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
