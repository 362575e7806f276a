"""Container health check: grpc.health.v1 Check against this container's own
server (127.0.0.1:$RAG_GRPC_PORT, plaintext); exit 0 when SERVING, else 1.

    python /opt/rag-grpc/healthcheck.py [SERVICE]    # "" (default): the whole server
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    """Ask the local server's health service; print the status seen."""
    target = f"127.0.0.1:{os.environ.get('RAG_GRPC_PORT', '50051')}"
    service = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
