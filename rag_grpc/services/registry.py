"""The one list of rag.v1 services: the name the settings and the CLI use,
the proto service's full name (also its health-check and reflection name)
and how the server builds and registers its servicer.

Read by the server (which services to build, what health reports), the
config validation (`services`), the CLI's help and `envoy/render.py` (the
transcoder's service list). Only the standard library is imported at the
top, so the config stays light and `envoy/render.py` can load this file
before anything is installed; each servicer is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from rag_grpc.server.assembly import Components

PACKAGE = "rag.v1"


@dataclass(frozen=True)
class ServiceEntry:
    """One rag.v1 service and the factory of its servicer."""

    # As in `services = [...]` and `--services`; also the stem of its proto
    # files (`<name>_service.proto`).
    name: str
    # The service's name in its proto file, e.g. "RetrievalService".
    proto_name: str
    # Builds the servicer over the process's components (only called for a
    # service the settings ask for).
    servicer: Callable[[Components], Any]

    @property
    def full_name(self) -> str:
        """The fully qualified proto name, e.g. "rag.v1.RetrievalService"."""
        return f"{PACKAGE}.{self.proto_name}"

    @property
    def health_name(self) -> str:
        """The name health checking reports this service under."""
        return self.full_name

    def add_to_server(self, servicer: Any, server: grpc.aio.Server) -> None:
        """Register servicer with the generated `add_<Service>Servicer_to_server`."""
        from rag_grpc import pb

        module = getattr(pb, f"{self.name}_service_pb2_grpc")
        getattr(module, f"add_{self.proto_name}Servicer_to_server")(servicer, server)


def _retrieval(c: Components) -> Any:
    from rag_grpc.services.retrieval import RetrievalServicer

    assert c.retriever is not None
    return RetrievalServicer(c.retriever, c.executor, c.local_writes(), c.access)


def _embedding(c: Components) -> Any:
    from rag_grpc.services.embedding import EmbeddingServicer

    assert c.embedder is not None
    return EmbeddingServicer(c.embedder, c.settings.limits, c.access)


def _generation(c: Components) -> Any:
    from rag_grpc.services.generation import GenerationServicer

    assert c.generator is not None
    return GenerationServicer(
        c.generator, c.settings.limits, c.access, c.settings.generation.default_max_tokens
    )


def _rag(c: Components) -> Any:
    from rag_grpc.services.rag import RagServicer

    assert c.pipeline is not None
    return RagServicer(c.pipeline, c.access, c.settings.generation.default_max_tokens)


def _ingestion(c: Components) -> Any:
    from rag_grpc.services.ingestion import IngestionServicer

    assert c.ingestion is not None
    return IngestionServicer(c.ingestion)


def _admin(c: Components) -> Any:
    from rag_grpc.backup import default_key_provider
    from rag_grpc.services.admin import AdminServicer

    s = c.settings
    return AdminServicer(
        services=[SERVICES[name].full_name for name in s.services],
        retriever=c.retriever,
        embedder=c.embedder,
        generator_name=c.generator.name if c.generator else "",
        generator_stats=c.triton.stats if c.triton is not None else None,
        index_config=s.index,
        executor=c.write_executor,
        backup_key=default_key_provider(s.backup_key_file),
        access=c.access,
        flags=c.flags,
    )


# In the order the default `services` lists them and the server builds them.
SERVICES: dict[str, ServiceEntry] = {
    entry.name: entry
    for entry in (
        ServiceEntry("retrieval", "RetrievalService", _retrieval),
        ServiceEntry("embedding", "EmbeddingService", _embedding),
        ServiceEntry("generation", "GenerationService", _generation),
        ServiceEntry("rag", "RagService", _rag),
        ServiceEntry("ingestion", "IngestionService", _ingestion),
        ServiceEntry("admin", "AdminService", _admin),
    )
}

SERVICE_NAMES: tuple[str, ...] = tuple(SERVICES)
