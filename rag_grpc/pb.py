"""The generated protobuf and gRPC modules, imported from one place.

They are built from proto/ by setup.py (rag_grpc/_gen, never committed).
"""

from rag_grpc._gen.rag.v1 import (
    admin_pb2,
    admin_service_pb2,
    admin_service_pb2_grpc,
    common_pb2,
    embedding_pb2,
    embedding_service_pb2,
    embedding_service_pb2_grpc,
    generation_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    ingestion_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    rag_pb2,
    rag_service_pb2,
    rag_service_pb2_grpc,
    retrieval_pb2,
    retrieval_service_pb2,
    retrieval_service_pb2_grpc,
)

SERVICE_FILES = (
    retrieval_service_pb2,
    embedding_service_pb2,
    generation_service_pb2,
    rag_service_pb2,
    ingestion_service_pb2,
    admin_service_pb2,
)

__all__ = [
    "SERVICE_FILES",
    "admin_pb2",
    "admin_service_pb2_grpc",
    "common_pb2",
    "embedding_pb2",
    "embedding_service_pb2_grpc",
    "generation_pb2",
    "generation_service_pb2_grpc",
    "ingestion_pb2",
    "ingestion_service_pb2_grpc",
    "rag_pb2",
    "rag_service_pb2_grpc",
    "retrieval_pb2",
    "retrieval_service_pb2_grpc",
]


def descriptor_set() -> bytes:
    """A serialized FileDescriptorSet of every rag.v1 file and its imports
    (for Envoy's gRPC-JSON transcoder and other tools)."""
    from google.protobuf import descriptor_pb2

    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(descriptor: object) -> None:
        name = descriptor.name  # type: ignore[attr-defined]
        if name in files:
            return
        for dependency in descriptor.dependencies:  # type: ignore[attr-defined]
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)  # type: ignore[attr-defined]
        files[name] = proto

    for module in SERVICE_FILES:
        add(module.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString()
