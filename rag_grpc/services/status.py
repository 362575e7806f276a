"""The one table between core errors and gRPC status codes, both ways.

The interceptor answers a core error with `status_of`; the remote backends
and anything else that reads a status turn it back into a core error with
`ERROR_OF`, derived from the same table so the two cannot drift apart.
"""

from __future__ import annotations

import grpc

from rag_grpc import errors

STATUS_OF: dict[type[errors.RagError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# The core error for each status the table names (one class per code).
ERROR_OF: dict[grpc.StatusCode, type[errors.RagError]] = {
    code: cls for cls, code in STATUS_OF.items()
}


def status_of(exc: errors.RagError) -> grpc.StatusCode:
    """The gRPC status for a core error (most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN
