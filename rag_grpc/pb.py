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
