"""OpenTelemetry for rag-grpc: traces (continuing the caller's W3C trace,
exported over OTLP), metrics (OTLP and a Prometheus scrape endpoint) and the
trace context handed on to Triton.

One `Telemetry` object per server, made from the config. A core component
(embedder, retriever, pipeline, ...) records through the `Recorder` it was
given at construction: the server's Telemetry, or `OFF` in tests and tools.
The module functions (`span`, `record`, ...) record into the Telemetry a
server installed; they are for the servicers and interceptors at the edge,
and `INSTALLED` is the transitional default of components whose assembly
does not pass its Telemetry yet.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from rag_grpc import __version__
from rag_grpc.config import TelemetryConfig, split_url_credentials

log = logging.getLogger(__name__)

_NOOP_TRACER = trace.NoOpTracer()


def _otlp_endpoint(url: str) -> tuple[str, dict[str, str] | None]:
    """The collector endpoint without credentials, and the Basic
    authorization header that carries them (None when there are none)."""
    endpoint, credentials = split_url_credentials(url)
    if credentials is None:
        return endpoint, None
    user, _, password = credentials.partition(":")
    basic = f"{unquote(user)}:{unquote(password)}".encode()
    return endpoint, {"authorization": f"Basic {base64.b64encode(basic).decode()}"}


@dataclass
class Instruments:
    """The metric instruments the servicers and the core record into."""

    rpc_duration: Any
    rpc_calls: Any
    rpc_in_flight: Any
    batch_size: Any
    tokens: Any
    searches: Any
    scores: Any
    answers: Any
    write_log_errors: Any
    compactions: Any
    ingestion_retries: Any
    log_messages: Any
    ask_first_token: Any


class Recorder:
    """Where a core component records its metrics and spans. This one
    records nothing (telemetry off); `Telemetry` records for real."""

    def record(self, what: str, value: float, **attributes: Any) -> None:
        """Add to a counter or histogram by its field name in Instruments."""

    def tracing(self) -> trace.Tracer:
        """The tracer spans start from."""
        return _NOOP_TRACER

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[trace.Span]:
        """A child span of the current one (a no-op without telemetry)."""
        with self.tracing().start_as_current_span(name, attributes=attributes) as current_span:
            yield current_span

    def start_current(self, name: str, kind: Any = None, **attributes: Any) -> trace.Span:
        """Start a child span and make it current for the rest of this task (no
        reset: each RPC runs in its own task). End it with span.end()."""
        from opentelemetry import context as otel_context

        started = self.tracing().start_span(
            name, kind=kind or trace.SpanKind.INTERNAL, attributes=attributes
        )
        otel_context.attach(trace.set_span_in_context(started))
        return started

    def usage(self, prompt_tokens: int, completion_tokens: int, generator: str) -> None:
        """Token counts of one generation, into the metrics."""
        self.record("tokens", prompt_tokens, direction="in", generator=generator)
        self.record("tokens", completion_tokens, direction="out", generator=generator)


OFF = Recorder()


class Telemetry(Recorder):
    """Tracer and meter providers, exporters and the instruments."""

    def __init__(self, config: TelemetryConfig, service_name: str = "rag-grpc") -> None:
        self.config = config
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        # With nowhere to export, our own root spans are not recorded (building
        # spans nobody reads cost ~3 % of a Search); a caller's sampled trace
        # context is still honoured, so its trace id reaches the call's log line.
        root = TraceIdRatioBased(config.trace_sample_ratio) if config.otlp_endpoint else ALWAYS_OFF
        sampler = ParentBased(root)
        self.tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        readers: list[MetricReader] = []
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # The exporters name their endpoint in every failure they log, so
            # user:password@ never reaches them: it travels as a Basic
            # authorization header instead (what a collector's basicauth expects).
            endpoint, headers = _otlp_endpoint(config.otlp_endpoint)
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(
                        endpoint=endpoint, insecure=config.otlp_insecure, headers=headers
                    ),
                    schedule_delay_millis=int(config.export_interval_s * 1000),
                )
            )
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(
                        endpoint=endpoint, insecure=config.otlp_insecure, headers=headers
                    ),
                    export_interval_millis=int(config.export_interval_s * 1000),
                )
            )
            log.info("exporting traces and metrics over OTLP to %s", endpoint)
        self.prometheus_port = 0
        if config.prometheus_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import REGISTRY, start_http_server

            readers.append(PrometheusMetricReader())
            server, _ = start_http_server(
                config.prometheus_port, addr=config.prometheus_host, registry=REGISTRY
            )
            self.prometheus_port = int(server.server_port)
            self._prometheus_server = server
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer = self.tracer_provider.get_tracer("rag_grpc", __version__)
        meter = self.meter_provider.get_meter("rag_grpc", __version__)
        self.meter = meter
        self.instruments = Instruments(
            rpc_duration=meter.create_histogram(
                "rag_rpc_duration", unit="ms", description="RPC latency by method and status code"
            ),
            rpc_calls=meter.create_counter(
                "rag_rpc_calls", description="RPCs by method and status code"
            ),
            rpc_in_flight=meter.create_up_down_counter(
                "rag_rpc_in_flight", description="RPCs being served now"
            ),
            batch_size=meter.create_histogram(
                "rag_embed_batch_size",
                description="Texts per embedding model call",
                explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
            ),
            tokens=meter.create_counter(
                "rag_generation_tokens", description="Generation tokens by direction (in, out)"
            ),
            searches=meter.create_counter(
                "rag_searches",
                description="Searches by mode and outcome: success when the best dense hit "
                "scores above the relevance threshold, or a lexical or hybrid search found any",
            ),
            # Cosine similarities and relative-score fusion live in [0, 2],
            # BM25 goes higher; a negative similarity is recorded as 0.
            scores=meter.create_histogram(
                "rag_search_top_score",
                description="Score of the best hit of each search, by mode",
                explicit_bucket_boundaries_advisory=[
                    *(i / 10 for i in range(11)),
                    *(1.5, 2, 5, 10, 20, 50),
                ],
            ),
            answers=meter.create_counter(
                "rag_answer_cache", description="Ask answers by answer cache outcome (hit, miss)"
            ),
            write_log_errors=meter.create_counter(
                "rag_write_log_errors",
                description="Write log entries this replica could not apply (skipped, logged)",
            ),
            compactions=meter.create_counter(
                "rag_index_compactions",
                description="Index rebuilds that reclaimed deleted vectors",
            ),
            ingestion_retries=meter.create_counter(
                "rag_ingestion_retries",
                description="Ingestion batches retried after a transient failure (busy or "
                "full database)",
            ),
            log_messages=meter.create_counter(
                "rag_log_messages",
                description="Log records at WARNING and above by level and logger (the log "
                "anomaly alert compares their rate with its own day)",
            ),
            ask_first_token=meter.create_histogram(
                "rag_ask_first_token",
                unit="ms",
                description="Time from an Ask's start to its first answer text, retrieval included",
            ),
        )
        self._log_counter = LogCounter(self.instruments.log_messages)
        logging.getLogger().addHandler(self._log_counter)

    def record(self, what: str, value: float, **attributes: Any) -> None:
        instrument = getattr(self.instruments, what)
        if hasattr(instrument, "record"):
            instrument.record(value, attributes)
        else:
            instrument.add(value, attributes)

    def tracing(self) -> trace.Tracer:
        return self.tracer

    def observe(
        self, name: str, description: str, read: Callable[[], Sequence[Observation]]
    ) -> None:
        """An observable gauge read at collection time (queue depths, sizes, ratios)."""

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            try:
                yield from read()
            except Exception:  # a gauge must never break collection
                log.debug("gauge %s failed", name, exc_info=True)

        self.meter.create_observable_gauge(name, callbacks=[callback], description=description)

    def shutdown(self) -> None:
        logging.getLogger().removeHandler(self._log_counter)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        server = getattr(self, "_prometheus_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


class LogCounter(logging.Handler):
    """Counts log records at WARNING and above into `rag_log_messages` by
    level and logger: the metric the log anomaly alert watches. Logger names
    are module names, so the label stays bounded."""

    def __init__(self, counter: Any) -> None:
        super().__init__(logging.WARNING)
        self.counter = counter
        self._inside = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        # A warning logged while the SDK records this one must not recurse.
        if getattr(self._inside, "active", False):
            return
        self._inside.active = True
        try:
            self.counter.add(1, {"level": record.levelname, "logger": record.name})
        except Exception:  # counting must never break logging
            pass
        finally:
            self._inside.active = False


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the fields a
    call's log line carries (method, code, latency_ms, trace_id, client) and
    the trace id of the current span. Callers never log document text,
    prompts or secrets at INFO."""

    FIELDS = ("method", "code", "latency_ms", "trace_id", "client")

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = getattr(record, field, None)
            if value not in (None, ""):
                entry[field] = value
        if "trace_id" not in entry and (current_trace := trace_id()):
            entry["trace_id"] = current_trace
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_current: Telemetry | None = None


class _Installed(Recorder):
    """Records into whichever Telemetry is installed at the time of each call."""

    def record(self, what: str, value: float, **attributes: Any) -> None:
        if _current is not None:
            _current.record(what, value, **attributes)

    def tracing(self) -> trace.Tracer:
        return _current.tracer if _current is not None else _NOOP_TRACER


INSTALLED: Recorder = _Installed()


def install(telemetry: Telemetry | None) -> None:
    """Make `telemetry` the one the module functions record into (None: off)."""
    global _current
    _current = telemetry


def current() -> Telemetry | None:
    return _current


def tracer() -> trace.Tracer:
    return INSTALLED.tracing()


def span(name: str, **attributes: Any) -> AbstractContextManager[trace.Span]:
    """A child span of the current one (a no-op without telemetry)."""
    return INSTALLED.span(name, **attributes)


def start_current(name: str, kind: Any = None, **attributes: Any) -> trace.Span:
    """Start a child span and make it current for the rest of this task (no
    reset: each RPC runs in its own task). End it with span.end()."""
    return INSTALLED.start_current(name, kind, **attributes)


def usage(prompt_tokens: int, completion_tokens: int, generator: str) -> None:
    """Token counts of one generation, into the metrics."""
    INSTALLED.usage(prompt_tokens, completion_tokens, generator)


def record(what: str, value: float, **attributes: Any) -> None:
    """Add to a counter or histogram by its field name in Instruments."""
    INSTALLED.record(what, value, **attributes)


def extract(metadata: Mapping[str, str]) -> Any:
    """The caller's trace context from gRPC metadata (W3C traceparent)."""
    return propagate.extract(dict(metadata))


def inject(span: trace.Span | None = None) -> dict[str, str]:
    """Headers carrying the trace context (of `span`, else the current one) downstream."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span else None)
    return carrier


def trace_id() -> str:
    """The current trace id in hex, or '' outside a sampled span."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""
