"""Cross-cutting concerns of every RPC, in one server interceptor: who the
caller is and what it may do (security/access.py: authentication,
authorization, the tenant's request rate), requests that do not decode,
deadlines already expired, core errors mapped to gRPC status codes (quota
refusals with google.rpc.QuotaFailure and RetryInfo details), the server
span (continuing the caller's W3C trace), RPC metrics, and one structured
log line per call with method, status, latency, trace id and caller."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import trace

from rag_grpc import errors, telemetry
from rag_grpc.deadlines import enter_call
from rag_grpc.security import tenancy
from rag_grpc.security.access import SINGLE_TENANT, AccessControl, Caller
from rag_grpc.security.authn import Authenticator
from rag_grpc.security.authz import Scope, is_open
from rag_grpc.security.quotas import QuotaExceeded
from rag_grpc.services.status import status_of
from rag_grpc.store.database import storage_error as store_storage_error

# The admitted caller of the call being served (identity and scope), for
# the servicers. Outside a call: no identity, single-tenant scope.
CALL: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("rag_call", default=None)
_OUTSIDE_CALLS = Caller(None, SINGLE_TENANT)
# Metadata that carries a caller's own credential, which a remote call made
# on its behalf passes on (a certificate cannot be passed on).
FORWARDED_CREDENTIALS = ("authorization", "x-api-key")


def current_caller() -> Caller:
    """The caller of the call being served."""
    return CALL.get() or _OUTSIDE_CALLS


log = logging.getLogger("rag_grpc.rpc")


def storage_error(exc: Exception) -> errors.RagError | None:
    """A busy or full database as the error callers see (logged here)."""
    known = store_storage_error(exc)
    if known is not None:
        log.warning("database: %s", exc)
    return known


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


async def _abort_for(
    exc: Exception, context: grpc.aio.ServicerContext, method: str, tenant: str | None = None
) -> None:
    if isinstance(exc, errors.RagError):
        # A tenant's namespaces appear in messages as the tenant names them.
        message = tenancy.scrub(tenant, str(exc))
        if isinstance(exc, QuotaExceeded):
            await context.abort_with_status(quota_status(exc, message))  # type: ignore[attr-defined]
        await context.abort(status_of(exc), message)
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def quota_status(exc: QuotaExceeded, message: str) -> grpc.Status:
    """RESOURCE_EXHAUSTED with google.rpc.QuotaFailure (which quota, of whom)
    and, when waiting helps, google.rpc.RetryInfo (how long)."""
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=exc.subject,
        description=f"{exc.quota}: limit {exc.limit:g}, used {exc.used:g}",
    )
    details = [_packed(error_details_pb2.QuotaFailure(violations=[violation]))]
    if exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, int(exc.retry_after_s * 1e9)))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=details)
    return rpc_status.to_status(status)


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary and server-streaming handler: the caller is
    admitted by `access` (open health and reflection aside) before the
    handler runs."""

    def __init__(
        self,
        access: AccessControl | None = None,
        call_log_sample_ratio: float = 1.0,
        tls: bool = False,
    ) -> None:
        self.access = access or AccessControl(Authenticator())
        self._log_ratio = call_log_sample_ratio
        # Without TLS there is no auth context worth reading (saves a copy per call).
        self._tls = tls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if handler.request_streaming:
            # Only reflection streams requests; anything else would skip the
            # checks below, so it is refused until it gets them.
            return handler if is_open(method) else _refused(handler, method)
        metadata: dict[str, str] = {}
        for key, value in handler_call_details.invocation_metadata or ():
            metadata[key] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        decode = _safe(handler.request_deserializer, method)
        observe = _Observer(method, metadata, self.access, self._tls, self._log_ratio)
        if handler.unary_unary is not None:
            return handler._replace(  # type: ignore[attr-defined]
                request_deserializer=decode,
                unary_unary=_wrap_unary(handler.unary_unary, method, observe),
            )
        return handler._replace(  # type: ignore[attr-defined]
            request_deserializer=decode,
            unary_stream=_wrap_stream(handler.unary_stream, method, observe),  # type: ignore[arg-type]
        )


def _refused(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} streams requests, which this server refuses"
        )

    return handler._replace(stream_unary=refuse, stream_stream=refuse)  # type: ignore[attr-defined]


class _Observer:
    """One call's admission, span, metrics and log line."""

    def __init__(
        self,
        method: str,
        metadata: dict[str, str],
        access: AccessControl,
        tls: bool,
        log_ratio: float = 1.0,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.access = access
        self.tls = tls
        # Share of successful, untraced calls logged at INFO (the rest at DEBUG).
        self.log_ratio = log_ratio
        self.caller: Caller | None = None

    @property
    def client(self) -> str:
        """The authenticated caller's principal, for logs and spans ("" if none)."""
        caller = self.caller
        return caller.identity.principal if caller is not None and caller.identity else ""

    @property
    def tenant(self) -> str | None:
        return self.caller.tenant if self.caller is not None else None

    async def admit(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Authenticate, check the request decoded and the deadline, then
        authorize (the rule may depend on the request); the caller goes into
        CALL for the handler. Refusals of a known caller are audited."""
        access = self.access
        open_method = is_open(self.method)
        identity = None
        if not open_method:
            auth_context = context.auth_context() if self.tls else {}
            identity = access.authenticate(self.metadata, context.peer() or "", auth_context)
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        remaining = context.time_remaining()
        enter_call(remaining)
        if remaining is not None and remaining <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline expired before the call started"
            )
        try:
            self.caller = access.authorize(identity, self.method, request)
        except (errors.PermissionDenied, errors.Unauthenticated) as exc:
            self.caller = Caller(identity, _NO_SCOPE)
            if identity is not None and access.audit is not None:
                event = access.denial(identity, self.method, request, str(exc))
                await asyncio.get_running_loop().run_in_executor(None, access.record, event)
            raise
        if self.caller.tenant is not None:
            credentials = tuple(
                (name, self.metadata[name])
                for name in FORWARDED_CREDENTIALS
                if name in self.metadata
            )
            self.caller = dataclasses.replace(self.caller, credentials=credentials)
        CALL.set(self.caller)

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

    def finish(self, span: Any, started: float, code: str) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        client = self.client
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


@asynccontextmanager
async def _observed(
    request: Any, context: grpc.aio.ServicerContext, method: str, observe: _Observer
) -> AsyncIterator[None]:
    """Around one call's handler, unary or streaming: its span and admission,
    then the status it ends with (a core error aborts with its own code,
    anything else with INTERNAL, logged), counted and logged by `observe`."""
    started = time.perf_counter()
    code = "OK"
    span = observe.start()
    try:
        await observe.admit(request, context)
        yield
    except errors.RagError as exc:
        code = status_of(exc).name
        await _abort_for(exc, context, method, observe.tenant)
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
        await _abort_for(known or exc, context, method, observe.tenant)
    finally:
        observe.finish(span, started, code)


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, observe: _Observer
) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _observed(request, context, method, observe):
            return await behavior(request, context)

    return unary


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str, observe: _Observer
) -> Callable[..., Any]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _observed(request, context, method, observe):
            produced: Any = behavior(request, context)
            if hasattr(produced, "__aiter__"):
                async for item in produced:
                    yield item
            else:
                # A handler that writes with context.write and returns nothing
                # (grpc_health's Watch) is a coroutine, not a generator.
                await produced

    return stream


# Stands for a known caller that was refused: no tenant, no role.
_NO_SCOPE = Scope(tenant=None, role=None, operator=False)


def _cancelled_code(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "ABORTED_BY_HANDLER"
