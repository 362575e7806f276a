"""The demo corpus: CPython's own documentation topics (pydoc_data), which
ship with every Python, so `make serve` has real text to search offline."""

from __future__ import annotations

from rag_grpc.documents import Document


def pydoc_topics() -> list[Document]:
    """One document per pydoc topic, id ``pydoc:<topic>``."""
    from pydoc_data.topics import topics

    return [
        Document(f"pydoc:{name}", text, {"source": "pydoc", "topic": name})
        for name, text in sorted(topics.items())
        if text.strip()
    ]
