"""One rag-grpc process, in four modules: `access` (who may call),
`assembly` (the components built from the settings), `probes` (health of
dependencies, sweepers and savers), `gauges` (metrics read at collection),
and `rag_server` (the grpc.aio server: registration, start, stop, `serve`)."""

from rag_grpc.server.rag_server import RagServer, serve

__all__ = ["RagServer", "serve"]
