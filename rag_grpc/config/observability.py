"""Sections of what a running process tells its operators: traces and
metrics ([telemetry]) and logs ([logging])."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rag_grpc.config.base import Section


class TelemetryConfig(Section):
    """OpenTelemetry traces and metrics."""

    # OTLP/gRPC collector for traces and metrics, e.g. "127.0.0.1:4317".
    otlp_endpoint: str | None = None
    otlp_insecure: bool = True
    # Prometheus scrape endpoint (/metrics); None: off, 0: any free port.
    prometheus_port: int | None = Field(None, ge=0, le=65535)
    prometheus_host: str = "127.0.0.1"
    trace_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    export_interval_s: float = Field(5.0, gt=0)
    # A search "succeeds" when its best hit scores at least this (cosine).
    relevance_threshold: float = Field(0.3, ge=-1.0, le=1.0)


class LoggingConfig(Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    # The one-line log of each call: failed calls and traced calls (a sampled
    # span) are always logged at INFO; this share of the other successful
    # calls too, the rest at DEBUG. A line per call cost 14 % of Search
    # throughput (measured); set 1.0 for a full access log.
    call_log_sample_ratio: float = Field(0.01, ge=0.0, le=1.0)
