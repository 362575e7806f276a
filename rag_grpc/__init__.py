"""rag-grpc: a retrieval-augmented generation service with a gRPC contract."""

__version__ = "0.1.0"
