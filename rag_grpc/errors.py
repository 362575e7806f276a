"""Core exceptions. The service layer maps each one to a gRPC status in one
place (``services/status.py``); the core library never imports grpc."""

from __future__ import annotations


class RagError(Exception):
    """Base of the errors a caller can act on; the message says what to change."""


class InvalidArgument(RagError):
    """The request is malformed or outside the documented limits."""


class NotFound(RagError):
    """A named namespace, document, job or model does not exist."""


class FailedPrecondition(RagError):
    """The system is not in a state that allows the request."""


class ResourceExhausted(RagError):
    """A queue or quota is full; retry later."""


class Unavailable(RagError):
    """A dependency (a remote service, the model) cannot be reached now."""


class DeadlineExceeded(RagError):
    """The caller's deadline passed before the work finished."""


class Cancelled(RagError):
    """The caller cancelled the call; the work stopped."""


class Unauthenticated(RagError):
    """The caller's identity is missing or its credential is not valid."""


class PermissionDenied(RagError):
    """The caller is known but its role does not allow this request."""
