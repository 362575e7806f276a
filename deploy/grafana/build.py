"""Writes the rag-grpc Grafana dashboard (dashboards/rag-grpc.json) from the panel list below.

Run `python deploy/grafana/build.py` after editing a panel and commit both files;
tests/test_dashboards.py checks that they agree and evaluates every expression
against a real Prometheus scraping a real rag-grpc.

Variables: `datasource` (any Prometheus), `job` and `instance` (which
rag-grpc processes), `tenant` (the tenant panels). Rates use Grafana's
`$__rate_interval`, so they follow the scrape interval of the data source.

One file although past 400 lines: two thirds of it is ROWS, the panel list,
which is the dashboard's content in the order it is shown; the writer after
it is 130 lines. A panel, its query and the helpers that shape the query
(quantiles, SEL, RATE) are read together when one is edited.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "rag-grpc.json"

# Every series the dashboard reads is narrowed to the chosen processes.
SEL = 'job=~"$job",instance=~"$instance"'
RATE = "[$__rate_interval]"
SEARCH = 'method="/rag.v1.RetrievalService/Search"'
ASK = 'method="/rag.v1.RagService/Ask"'


def quantiles(histogram: str, by: str, matchers: str = "") -> list[Target]:
    """p50, p95 and p99 of a histogram's recent observations, split by `by`."""
    labels = f"le, {by}" if by else "le"
    legend = "{{" + by + "}} " if by else ""
    selector = f"{SEL},{matchers}" if matchers else SEL
    return [
        Target(
            f"histogram_quantile({q}, sum by ({labels}) "
            f"(rate({histogram}_bucket{{{selector}}}{RATE})))",
            f"{legend}p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One Grafana panel: a title, what it shows, and its queries."""

    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    options: dict[str, Any] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "RED per RPC",
        [
            Panel(
                "Requests per second",
                "RPCs finished per second, by method.",
                [
                    Target(
                        f"sum by (method) (rate(rag_rpc_calls_total{{{SEL}}}{RATE}))", "{{method}}"
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Errors per second",
                "RPCs that ended with a status other than OK, by method and code.",
                [
                    Target(
                        "sum by (method, code) "
                        f'(rate(rag_rpc_calls_total{{{SEL},code!="OK"}}{RATE}))',
                        "{{method}} {{code}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Error ratio",
                "Share of RPCs not OK, by method (client errors included).",
                [
                    Target(
                        f'sum by (method) (rate(rag_rpc_calls_total{{{SEL},code!="OK"}}{RATE})) '
                        f"/ sum by (method) (rate(rag_rpc_calls_total{{{SEL}}}{RATE}))",
                        "{{method}}",
                    )
                ],
                unit="percentunit",
            ),
            Panel(
                "Duration p95 by method",
                "95th percentile of RPC latency (a streaming RPC: until its last message).",
                [
                    Target(
                        "histogram_quantile(0.95, sum by (le, method) "
                        f"(rate(rag_rpc_duration_milliseconds_bucket{{{SEL}}}{RATE})))",
                        "{{method}}",
                    )
                ],
                unit="ms",
                width=12,
            ),
            Panel(
                "In flight",
                "RPCs being served now, by method.",
                [Target(f"sum by (method) (rag_rpc_in_flight{{{SEL}}})", "{{method}}")],
                width=12,
            ),
        ],
    ),
    (
        "Search and Ask latency",
        [
            Panel(
                "Search latency",
                "Search RPC latency percentiles.",
                quantiles("rag_rpc_duration_milliseconds", "", SEARCH),
                unit="ms",
            ),
            Panel(
                "Ask latency (whole stream)",
                "Ask RPC latency percentiles, until the last streamed message.",
                quantiles("rag_rpc_duration_milliseconds", "", ASK),
                unit="ms",
            ),
            Panel(
                "Ask time to first token",
                "From an Ask's start to its first answer text, retrieval included.",
                quantiles("rag_ask_first_token_milliseconds", ""),
                unit="ms",
            ),
        ],
    ),
    (
        "Retrieval quality",
        [
            Panel(
                "Search success rate by mode",
                "Share of searches whose best hit scores above the relevance threshold.",
                [
                    Target(
                        "sum by (mode) "
                        f'(rate(rag_searches_total{{{SEL},outcome="success"}}{RATE})) '
                        f"/ sum by (mode) (rate(rag_searches_total{{{SEL}}}{RATE}))",
                        "{{mode}}",
                    )
                ],
                unit="percentunit",
            ),
            Panel(
                "Searches by mode and outcome",
                "Searches per second (success: a hit above the relevance threshold; miss: none).",
                [
                    Target(
                        f"sum by (mode, outcome) (rate(rag_searches_total{{{SEL}}}{RATE}))",
                        "{{mode}} {{outcome}}",
                    )
                ],
                unit="ops",
            ),
            Panel(
                "Mean top score by mode",
                "Mean score of the best hit of each search (scores differ in scale by mode).",
                [
                    Target(
                        f"sum by (mode) (rate(rag_search_top_score_sum{{{SEL}}}{RATE})) "
                        f"/ sum by (mode) (rate(rag_search_top_score_count{{{SEL}}}{RATE}))",
                        "{{mode}}",
                    )
                ],
            ),
            Panel(
                "Top score distribution",
                "Best-hit scores per histogram bucket (a heatmap of the buckets).",
                [
                    Target(
                        f"sum by (le) (increase(rag_search_top_score_bucket{{{SEL}}}{RATE}))",
                        "{{le}}",
                    )
                ],
                kind="heatmap",
                width=24,
                options={"calculate": False, "yAxis": {"unit": "short"}},
            ),
        ],
    ),
    (
        "Caches",
        [
            Panel(
                "Embedding cache hit ratio",
                "Embedding cache hits / lookups since the process started.",
                [Target(f"rag_embed_cache_hit_ratio{{{SEL}}}", "{{instance}}")],
                unit="percentunit",
                width=12,
            ),
            Panel(
                "Answer cache",
                "Ask answers per second by answer cache outcome (hit, miss).",
                [
                    Target(
                        f"sum by (outcome) (rate(rag_answer_cache_total{{{SEL}}}{RATE}))",
                        "{{outcome}}",
                    )
                ],
                unit="ops",
                width=12,
            ),
        ],
    ),
    (
        "Embedding",
        [
            Panel(
                "Batch size",
                "Texts per embedding model call, percentiles.",
                quantiles("rag_embed_batch_size", ""),
            ),
            Panel(
                "Model calls and texts per second",
                "Embedding model calls and the texts they carried.",
                [
                    Target(f"sum(rate(rag_embed_batch_size_count{{{SEL}}}{RATE}))", "calls"),
                    Target(f"sum(rate(rag_embed_batch_size_sum{{{SEL}}}{RATE}))", "texts"),
                ],
                unit="ops",
            ),
            Panel(
                "Embedding queue",
                "Texts waiting for the embedding model.",
                [
                    Target(f"rag_embed_queue_texts{{{SEL}}}", "{{instance}} queued"),
                    Target(f"rag_embed_queue_limit_texts{{{SEL}}}", "{{instance}} limit"),
                ],
            ),
        ],
    ),
    (
        "Ingestion and index",
        [
            Panel(
                "Pending ingestion jobs",
                "Jobs not finished yet (with NATS: documents not yet applied).",
                [Target(f"rag_ingestion_pending_jobs{{{SEL}}}", "{{instance}}")],
            ),
            Panel(
                "Ingestion retries",
                "Batches retried after a transient failure (busy or full database).",
                [
                    Target(
                        f"sum by (instance) (increase(rag_ingestion_retries_total{{{SEL}}}{RATE}))",
                        "{{instance}}",
                    )
                ],
            ),
            Panel(
                "Index memory",
                "Memory of the loaded vector indexes and limits.max_index_bytes (0: no limit).",
                [
                    Target(f"rag_index_memory_bytes{{{SEL}}}", "{{instance}} used"),
                    Target(f"rag_index_memory_limit_bytes{{{SEL}}}", "{{instance}} limit"),
                ],
                unit="bytes",
            ),
            Panel(
                "Vectors per namespace",
                "Live vectors in each namespace's index.",
                [
                    Target(
                        f"sum by (namespace) (rag_index_vectors{{{SEL}}})",
                        "{{namespace}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Generation and cost per tenant",
        [
            Panel(
                "Generation tokens per second",
                "Prompt (in) and completion (out) tokens, by generator.",
                [
                    Target(
                        "sum by (direction, generator) "
                        f"(rate(rag_generation_tokens_total{{{SEL}}}{RATE}))",
                        "{{generator}} {{direction}}",
                    )
                ],
                unit="ops",
            ),
            Panel(
                "Usage per tenant, last hour",
                "What each tenant used in the last hour: tokens (embedding, prompt, completion), "
                "searches and asks.",
                [
                    Target(
                        "sum by (tenant, kind) (delta(rag_tenant_usage"
                        f'{{{SEL},tenant=~"$tenant",kind=~".*tokens|searches|asks"}}[1h]))',
                        "{{tenant}} {{kind}}",
                    )
                ],
            ),
            Panel(
                "Budget reached",
                "1 while a tenant's estimated spend today has reached its daily budget.",
                [
                    Target(
                        f'max by (tenant) (rag_tenant_budget_reached{{{SEL},tenant=~"$tenant"}})',
                        "{{tenant}}",
                    )
                ],
                kind="stat",
            ),
            Panel(
                "Usage per tenant, since first counted",
                "Counters since first counted, and stored documents, vectors and bytes.",
                [
                    Target(
                        f'max by (tenant, kind) (rag_tenant_usage{{{SEL},tenant=~"$tenant"}})',
                        "{{tenant}} {{kind}}",
                    )
                ],
                width=24,
            ),
        ],
    ),
    (
        "Replicas and write log",
        [
            Panel(
                "Processes up",
                "Whether Prometheus reaches each rag-grpc process.",
                [Target(f"up{{{SEL}}}", "{{instance}}")],
                kind="stat",
            ),
            Panel(
                "Write log lag",
                "Entries each replica knows exist and has not applied; stalled: 1 once it stopped "
                "applying for good (restore it from a backup).",
                [
                    Target(f"max by (instance) (rag_write_log_lag{{{SEL}}})", "{{instance}}"),
                    Target(
                        f"max by (instance) (rag_write_log_stalled{{{SEL}}})",
                        "{{instance}} stalled",
                    ),
                ],
            ),
            Panel(
                "Write log errors",
                "Entries a replica could not apply (skipped and logged).",
                [
                    Target(
                        f"sum by (instance) (increase(rag_write_log_errors_total{{{SEL}}}{RATE}))",
                        "{{instance}}",
                    )
                ],
            ),
            Panel(
                "Uptime",
                "Seconds since each process started (a drop is a restart).",
                [Target(f"time() - process_start_time_seconds{{{SEL}}}", "{{instance}}")],
                unit="s",
                width=12,
            ),
            Panel(
                "Warnings and errors logged",
                "Log records at WARNING and above per second, by level and logger.",
                [
                    Target(
                        f"sum by (level, logger) (rate(rag_log_messages_total{{{SEL}}}{RATE}))",
                        "{{level}} {{logger}}",
                    )
                ],
                width=12,
            ),
        ],
    ),
]


def query_variable(name: str, label: str, query: str, *, include_all: bool) -> dict[str, Any]:
    """A template variable whose values are a label's values in Prometheus."""
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": include_all,
        "includeAll": include_all,
    }
    if include_all:
        variable["allValue"] = ".*"
        variable["current"] = {"text": "All", "value": "$__all"}
    return variable


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": target.expr,
                "legendFormat": target.legend,
                **({"format": "heatmap"} if panel.kind == "heatmap" else {}),
            }
            for i, target in enumerate(panel.targets)
        ],
    }
    if panel.options:
        out["options"] = panel.options
    return out


def dashboard() -> dict[str, Any]:
    """The dashboard model Grafana imports or provisions."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
        y += 8
    return {
        "uid": "rag-grpc",
        "title": "rag-grpc",
        "description": "RED per RPC, latency, retrieval quality, caches, embedding, "
        "ingestion, generation and cost per tenant, replicas (built by deploy/grafana/build.py)",
        "tags": ["rag-grpc"],
        "timezone": "utc",
        "schemaVersion": 38,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                },
                query_variable(
                    "job", "Job", "label_values(rag_rpc_calls_total, job)", include_all=True
                ),
                query_variable(
                    "instance",
                    "Instance",
                    'label_values(rag_rpc_calls_total{job=~"$job"}, instance)',
                    include_all=True,
                ),
                query_variable(
                    "tenant", "Tenant", "label_values(rag_tenant_usage, tenant)", include_all=True
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    """The dashboard file's exact text."""
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(HERE.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
