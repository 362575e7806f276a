"""Cross-cutting concerns of every RPC, in one server interceptor: requests
that do not decode, deadlines already expired, core errors mapped to gRPC
status codes, the server span (continuing the caller's W3C trace), RPC
metrics, and one structured log line per call with method, status, latency,
trace id and client identity (from x-forwarded-client-cert, trusted only
from the configured gateway addresses)."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace

from rag_grpc import errors, telemetry
from rag_grpc.deadlines import enter_call
from rag_grpc.store.sqlite import storage_error as store_storage_error

# The calling client's identity (from a trusted gateway's
# x-forwarded-client-cert), for the handlers: "" when unknown.
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("rag_client", default="")

log = logging.getLogger("rag_grpc.rpc")

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


def storage_error(exc: Exception) -> errors.RagError | None:
    """A busy or full database as the error callers see (logged here)."""
    known = store_storage_error(exc)
    if known is not None:
        log.warning("database: %s", exc)
    return known


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

    def __init__(
        self,
        auth_token: str | None = None,
        trusted_proxies: tuple[str, ...] = (),
        call_log_sample_ratio: float = 1.0,
    ) -> None:
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self._trusted = frozenset(trusted_proxies)
        self._log_ratio = call_log_sample_ratio

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming:
            return handler
        metadata: dict[str, str] = {}
        for key, value in handler_call_details.invocation_metadata or ():
            metadata[key] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if self._expected is not None and method.startswith("/rag.v1."):
            given = metadata.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self._expected):
                return _unauthenticated(handler, method)
        decode = _safe(handler.request_deserializer, method)
        observe = _Observer(method, metadata, self._trusted, self._log_ratio)
        if handler.unary_unary is not None:
            return handler._replace(  # type: ignore[attr-defined]
                request_deserializer=decode,
                unary_unary=_wrap_unary(handler.unary_unary, method, observe),
            )
        return handler._replace(  # type: ignore[attr-defined]
            request_deserializer=decode,
            unary_stream=_wrap_stream(handler.unary_stream, method, observe),  # type: ignore[arg-type]
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


class _Observer:
    """One call's span, metrics and log line."""

    def __init__(
        self,
        method: str,
        metadata: dict[str, str],
        trusted: frozenset[str],
        log_ratio: float = 1.0,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.trusted = trusted
        # Share of successful, untraced calls logged at INFO (the rest at DEBUG).
        self.log_ratio = log_ratio

    def client_identity(self, context: grpc.aio.ServicerContext) -> str:
        """The gateway's x-forwarded-client-cert identity, if the peer is a trusted gateway."""
        header = self.metadata.get("x-forwarded-client-cert")
        if not header or not self.trusted:
            return ""
        peer = context.peer() or ""
        # "ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000"
        host = peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]")
        if host not in self.trusted:
            return ""
        return xfcc_identity(header)

    def start(self) -> Any:
        parent = telemetry.extract(self.metadata)
        span = telemetry.tracer().start_span(
            self.method.lstrip("/"),
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": self.method},
        )
        # Each call runs in its own task and context, so the span stays
        # current for the rest of the call without a reset.
        otel_context.attach(trace.set_span_in_context(span, parent))
        telemetry.record("rpc_in_flight", 1, method=self.method)
        return span

    def finish(
        self, span: Any, started: float, code: str, context: grpc.aio.ServicerContext
    ) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        client = self.client_identity(context)
        attributes = {"method": self.method, "code": code}
        telemetry.record("rpc_in_flight", -1, method=self.method)
        telemetry.record("rpc_calls", 1, **attributes)
        telemetry.record("rpc_duration", elapsed_ms, **attributes)
        span.set_attribute("rpc.grpc.status_code", code)
        if client:
            span.set_attribute("client.identity", client)
        if code != "OK":
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        traced = span.is_recording()
        span.end()
        if code == "OK" and not traced and random.random() >= self.log_ratio:
            if not log.isEnabledFor(logging.DEBUG):
                return
            level = logging.DEBUG
        else:
            level = logging.INFO
        trace_id = telemetry.trace_id()
        log.log(
            level,
            "rpc %s %s %.2fms",
            self.method,
            code,
            elapsed_ms,
            extra={
                "method": self.method,
                "code": code,
                "latency_ms": round(elapsed_ms, 3),
                "trace_id": trace_id,
                "client": client,
            },
        )


def xfcc_identity(header: str) -> str:
    """The client identity in an x-forwarded-client-cert value: URI SAN, else
    DNS SAN, else the subject (of the last element: the nearest hop)."""
    element = _split_quoted(header, ",")[-1]
    fields: dict[str, str] = {}
    for part in _split_quoted(element, ";"):
        key, _, value = part.partition("=")
        fields.setdefault(key.strip(), value.strip().strip('"'))
    return fields.get("URI") or fields.get("DNS") or fields.get("Subject", "")


def _split_quoted(text: str, separator: str) -> list[str]:
    """Split on separator outside double quotes."""
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, observe: _Observer
) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        span = observe.start()
        CLIENT.set(observe.client_identity(context))
        try:
            await _precheck(request, context)
            return await behavior(request, context)
        except errors.RagError as exc:
            code = status_of(exc).name
            await _abort_for(exc, context, method)
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller's deadline passes or
            # the caller goes away: logged and counted as what it was.
            code = _cancelled_code(context)
            raise
        except Exception as exc:
            known = storage_error(exc)
            code = status_of(known).name if known else "INTERNAL"
            await _abort_for(known or exc, context, method)
        finally:
            observe.finish(span, started, code, context)

    return unary


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str, observe: _Observer
) -> Callable[..., Any]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = "OK"
        span = observe.start()
        CLIENT.set(observe.client_identity(context))
        try:
            await _precheck(request, context)
            produced: Any = behavior(request, context)
            if hasattr(produced, "__aiter__"):
                async for item in produced:
                    yield item
            else:
                # A handler that writes with context.write and returns nothing
                # (grpc_health's Watch) is a coroutine, not a generator.
                await produced
        except errors.RagError as exc:
            code = status_of(exc).name
            await _abort_for(exc, context, method)
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller's deadline passes or
            # the caller goes away: logged and counted as what it was.
            code = _cancelled_code(context)
            raise
        except Exception as exc:
            known = storage_error(exc)
            code = status_of(known).name if known else "INTERNAL"
            await _abort_for(known or exc, context, method)
        finally:
            observe.finish(span, started, code, context)

    return stream


def _cancelled_code(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "ABORTED_BY_HANDLER"
