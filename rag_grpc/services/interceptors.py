"""Cross-cutting concerns of every RPC, in one server interceptor: requests
that do not decode, deadlines already expired, core errors mapped to gRPC
status codes, and one log line per call."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from rag_grpc import errors
from rag_grpc.deadlines import enter_call

log = logging.getLogger("rag_grpc.rpc")

STATUS_OF: dict[type[errors.RagError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}


def status_of(exc: errors.RagError) -> grpc.StatusCode:
    """The gRPC status for a core error (most specific class wins)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Undecodable(
                f"the request is not a valid {method} message (string fields must be UTF-8): {exc}"
            )

    return decode


async def _precheck(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
    remaining = context.time_remaining()
    enter_call(remaining)
    if remaining is not None and remaining <= 0:
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline expired before the call started"
        )


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.RagError):
        await context.abort(status_of(exc), str(exc))
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary and server-streaming handler; checks the bearer
    token of rag.v1 calls when one is configured."""

    def __init__(self, auth_token: str | None = None) -> None:
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming:
            return handler
        if self._expected is not None and method.startswith("/rag.v1."):
            metadata = dict(handler_call_details.invocation_metadata or ())
            given = metadata.get("authorization", "")
            given_bytes = given.encode() if isinstance(given, str) else given
            if not hmac.compare_digest(given_bytes, self._expected):
                return _unauthenticated(handler, method)
        decode = _safe(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            return handler._replace(  # type: ignore[attr-defined]
                request_deserializer=decode, unary_unary=_wrap_unary(handler.unary_unary, method)
            )
        return handler._replace(  # type: ignore[attr-defined]
            request_deserializer=decode,
            unary_stream=_wrap_stream(handler.unary_stream, method),  # type: ignore[arg-type]
        )


def _unauthenticated(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    message = "missing or wrong credentials: send metadata `authorization: Bearer <token>`"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        log.info("rpc %s UNAUTHENTICATED", method)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(request, context)
        yield  # pragma: no cover - abort raised above

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=refuse)  # type: ignore[attr-defined]
    return handler._replace(unary_stream=refuse_stream)  # type: ignore[attr-defined]


def _log_call(method: str, started: float, code: str) -> None:
    log.info("rpc %s %s %.2fms", method, code, (time.perf_counter() - started) * 1000)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        try:
            await _precheck(request, context)
            return await behavior(request, context)
        except errors.RagError as exc:
            code = status_of(exc).name
            await _abort_for(exc, context, method)
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except Exception as exc:
            code = "INTERNAL"
            await _abort_for(exc, context, method)
        finally:
            _log_call(method, started, code)

    return unary


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = "OK"
        try:
            await _precheck(request, context)
            async for item in behavior(request, context):
                yield item
        except errors.RagError as exc:
            code = status_of(exc).name
            await _abort_for(exc, context, method)
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except Exception as exc:
            code = "INTERNAL"
            await _abort_for(exc, context, method)
        finally:
            _log_call(method, started, code)

    return stream
