"""What a server reports about itself (AdminService.Stats): its version, the
services it runs, the namespaces the caller may see, its generator and its
embedding models.

One value for both ends: the admin servicer builds it and the Python client
returns it (converted by ``services/convert.py``). Light on purpose, like
the other values the client returns: no gRPC, ONNX Runtime or native index.
"""

from __future__ import annotations

from dataclasses import dataclass

from rag_grpc.index.query import NamespaceStats


@dataclass(frozen=True)
class ServerStats:
    """A server's version, services (e.g. "rag.v1.RetrievalService"),
    namespaces as the caller names them, generator (e.g. "extractive") and
    embedding model ids."""

    version: str
    services: tuple[str, ...]
    namespaces: tuple[NamespaceStats, ...]
    generator: str
    models: tuple[str, ...]
