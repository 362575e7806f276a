"""Write rag-grpc's Prometheus rules from slos.yaml: SLO recording rules and
multiwindow, multi-burn-rate alerts (rules/slos.yml), and the operational,
cost and log-anomaly alerts (rules/operations.yml).

    python deploy/prometheus/generate.py                 # the committed files
    python deploy/prometheus/generate.py --time-scale 60 --out DIR

``--time-scale S`` divides every range and ``for:`` by S (1 h becomes 1 min
at 60), so a test can watch a burn-rate alert fire in seconds; thresholds
and record names stay the same. Only the standard library is used: the
config is JSON syntax (valid YAML) and the rules are written in block YAML
whose strings are JSON-quoted (valid YAML double-quoted scalars).

One file although past 400 lines: 170 of them are OPERATIONS, the table of
operational alerts (data, one entry per alert); the generator around it is
250 lines, and the SLO rules and the operational ones share its scaling,
runbook links and YAML writer.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "slos.yaml"
RULES = HERE / "rules"
UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
HISTOGRAM_BUCKETS_MS = (5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
# Every window a recording rule is kept for (the burn-rate alerts read them).
SLO_WINDOWS = ("5m", "30m", "1h", "6h", "3d")


def seconds(duration: str) -> float:
    """'5m' -> 300.0 (one unit: d, h, m or s)."""
    match = re.fullmatch(r"(\d+)([dhms])", duration)
    if match is None:
        raise ValueError(f"duration {duration!r} is not a number and one of d, h, m, s")
    return int(match.group(1)) * UNITS[match.group(2)]


def duration(value_s: float) -> str:
    """A Prometheus duration for value_s seconds, in the largest whole unit
    (milliseconds when no unit divides it)."""
    millis = round(value_s * 1000)
    if millis <= 0:
        raise ValueError(f"a {value_s} s window is too small for Prometheus")
    for unit, size in UNITS.items():
        if millis % (size * 1000) == 0:
            return f"{millis // (size * 1000)}{unit}"
    return f"{millis}ms"


class Scale:
    """Windows divided by a time scale (1: as written)."""

    def __init__(self, factor: float) -> None:
        if factor <= 0:
            raise ValueError("the time scale must be positive")
        self.factor = factor

    def __call__(self, window: str) -> str:
        return duration(seconds(window) / self.factor)

    def expr(self, text: str) -> str:
        """`$5m` in an expression -> the scaled window."""
        return re.sub(r"\$(\d+[dhms])", lambda m: self(m.group(1)), text)


def anchor(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook(config: dict[str, Any], heading: str) -> str:
    return f"{config['runbook']}#{anchor(heading)}"


# -- SLOs ----------------------------------------------------------------------


def _methods(slo: dict[str, Any]) -> str:
    return "|".join(re.escape(m) for m in slo["methods"]).replace("\\", "\\\\")


def sli_errors(config: dict[str, Any], slo: dict[str, Any], window: str) -> str:
    """Fraction of the SLO's events that were bad over the window."""
    if slo["sli"] == "availability":
        selector = f'method=~"{_methods(slo)}"'
        codes = "|".join(config["server_error_codes"])
        return (
            f'(sum(rate(rag_rpc_calls_total{{{selector},code=~"{codes}"}}[{window}])) or vector(0))'
            f"\n/\nsum(rate(rag_rpc_calls_total{{{selector}}}[{window}]))"
        )
    if slo["sli"] == "latency":
        threshold = slo["threshold_ms"]
        if threshold not in HISTOGRAM_BUCKETS_MS:
            raise ValueError(
                f"SLO {slo['name']}: threshold_ms {threshold} is not a histogram bucket "
                f"boundary ({', '.join(map(str, HISTOGRAM_BUCKETS_MS))})"
            )
        matchers = [f'method=~"{_methods(slo)}"', 'code="OK"'] if "methods" in slo else []
        selector = ",".join(matchers)
        fast = ",".join([*matchers, f'le="{float(threshold)}"'])
        metric = slo["metric"]
        return (
            f"1 - (\n  sum(rate({metric}_bucket{{{fast}}}[{window}]))\n  /\n"
            f"  sum(rate({metric}_count{{{selector}}}[{window}]))\n)"
        )
    raise ValueError(f"SLO {slo['name']}: sli must be availability or latency")


def slo_groups(config: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    groups = []
    for slo in config["slos"]:
        if not 0 < slo["objective"] < 1:
            raise ValueError(f"SLO {slo['name']}: objective must be between 0 and 1")
        budget = round(1 - slo["objective"], 10)
        records = [
            {
                "record": f"rag:slo_errors:ratio_rate{window}",
                "expr": sli_errors(config, slo, scale(window)),
                "labels": {"slo": slo["name"]},
            }
            for window in SLO_WINDOWS
        ]
        records.append(
            {
                "record": "rag:slo_objective:ratio",
                "expr": f"vector({slo['objective']})",
                "labels": {"slo": slo["name"]},
            }
        )
        alerts = []
        for burn in config["burn_rates"]:
            threshold = f"({burn['factor']} * {budget})"
            short, long = burn["short"], burn["long"]
            selector = f'{{slo="{slo["name"]}"}}'
            alerts.append(
                {
                    "alert": f"{slo['alert']}BurnRate{burn['name']}",
                    "expr": (
                        f"rag:slo_errors:ratio_rate{long}{selector} > {threshold}\n"
                        f"and\nrag:slo_errors:ratio_rate{short}{selector} > {threshold}"
                    ),
                    "for": scale(burn["for"]),
                    "labels": {"severity": burn["severity"], "slo": slo["name"]},
                    "annotations": {
                        "summary": (
                            f"{slo['name']} is burning its error budget {burn['factor']}x "
                            f"too fast over {long} and {short}"
                        ),
                        "description": (
                            f"Of {slo['what']}, {{{{ $value | humanizePercentage }}}} failed "
                            f"over the last {long} (more than {burn['factor']}x the "
                            f"{budget:.2%} budget, and so over the last {short}); the objective is "
                            f"{slo['objective']:.2%}."
                        ),
                        "runbook_url": runbook(config, f"{slo['alert']}BurnRate"),
                    },
                }
            )
        groups.append({"name": f"rag-slo-{slo['name']}", "rules": records + alerts})
    return groups


# -- operational, cost and log alerts -------------------------------------------

# (heading in docs/operations.md, rule). Ranges written `$5m` are scaled.
OPERATIONS: list[dict[str, Any]] = [
    {
        "record": "rag:log_messages:rate5m",
        "expr": "sum by (job, level, logger) (rate(rag_log_messages_total[$5m]))",
    },
    {
        "record": "rag:tenant_usage:increase1h",
        # Replicas report the same replicated totals: the max, not the sum.
        "expr": "max by (tenant, kind) (delta(rag_tenant_usage[$1h]))",
    },
    {
        "record": "rag:answer_cache_hit_ratio:rate1h",
        "expr": (
            'sum(rate(rag_answer_cache_total{outcome="hit"}[$1h]))\n'
            "/\nsum(rate(rag_answer_cache_total[$1h]))"
        ),
    },
    {
        "alert": "RagTargetDown",
        "expr": 'up{job="$job"} == 0',
        "for": "5m",
        "severity": "page",
        "summary": "Prometheus cannot scrape rag-grpc at {{ $labels.instance }}",
        "description": "The metrics endpoint has not answered for 5 minutes: the process is "
        "down, hung, or unreachable.",
    },
    {
        "alert": "RagServerCrashLooping",
        "expr": 'changes(process_start_time_seconds{job="$job"}[$30m]) >= 3',
        "severity": "page",
        "summary": "rag-grpc at {{ $labels.instance }} restarted {{ $value }} times in 30 minutes",
        "description": "The process start time changed on each restart: it is crashing or "
        "being killed (out of memory, failed health checks).",
    },
    {
        "alert": "RagCertificateExpiresSoon",
        "expr": "rag_tls_certificate_expiry_timestamp_seconds - time() < 14 * 86400",
        "severity": "ticket",
        "summary": "The TLS certificate of {{ $labels.instance }} expires in less than 14 days",
        "description": "It expires in {{ $value | humanizeDuration }}; rotate it.",
    },
    {
        "alert": "RagCertificateExpiryImminent",
        "expr": "rag_tls_certificate_expiry_timestamp_seconds - time() < 2 * 86400",
        "severity": "page",
        "summary": "The TLS certificate of {{ $labels.instance }} expires in less than 2 days",
        "description": "It expires in {{ $value | humanizeDuration }}; clients will refuse "
        "the handshake after that. Rotate it now.",
    },
    {
        "alert": "RagIngestionBacklogGrowing",
        "expr": "min_over_time(rag_ingestion_pending_jobs[$30m]) > 0\n"
        "and\nderiv(rag_ingestion_pending_jobs[$30m]) >= 0",
        "for": "15m",
        "severity": "ticket",
        "summary": "Ingestion on {{ $labels.instance }} is not draining its backlog",
        "description": "{{ $value }} jobs (NATS: documents) have been waiting for 30 minutes "
        "without the backlog shrinking.",
    },
    {
        "alert": "RagIngestionBatchesFailing",
        "expr": 'sum by (job, instance) (increase(rag_log_messages_total{level=~"ERROR|CRITICAL",'
        'logger=~"rag_grpc\\\\.ingest\\\\..*"}[$15m])) > 0',
        "severity": "ticket",
        "summary": "Ingestion on {{ $labels.instance }} logged errors",
        "description": "{{ $value }} ingestion errors in 15 minutes: whole batches failing "
        "(not one bad document, which fails alone and is reported in its job).",
    },
    {
        "alert": "RagWriteLogApplyErrors",
        "expr": "increase(rag_write_log_errors_total[$15m]) > 0",
        "severity": "ticket",
        "summary": "{{ $labels.instance }} skipped write log entries it could not apply",
        "description": "{{ $value }} entries in 15 minutes were recorded as applied with an "
        "error; every replica skips the same entries, but the writes they carried are lost.",
    },
    {
        "alert": "RagReplicaLagging",
        "expr": "min_over_time(rag_write_log_lag[$10m]) > 100",
        "severity": "ticket",
        "summary": "Replica {{ $labels.instance }} is {{ $value }} write log entries behind",
        "description": "It has stayed more than 100 entries behind for 10 minutes: its "
        "searches answer from older data and writes sent to it wait for their entry.",
    },
    {
        "alert": "RagReplicaStalled",
        "expr": "rag_write_log_stalled == 1",
        "for": "1m",
        "severity": "page",
        "summary": "Replica {{ $labels.instance }} stopped applying the write log",
        "description": "The log no longer holds the entries after its position; it refuses "
        "writes until it is restored from a peer's backup.",
    },
    {
        "alert": "RagGenerationCircuitOpen",
        "expr": "min_over_time(rag_generation_circuit_open[$5m]) == 1",
        "severity": "ticket",
        "summary": "The circuit breaker in front of Triton on {{ $labels.instance }} has been "
        "open for 5 minutes",
        "description": "Generation calls are refused (or answered by the extractive fallback "
        "when configured) because Triton kept failing.",
    },
    {
        "alert": "RagEmbeddingQueueSaturated",
        "expr": "max_over_time(rag_embed_queue_texts[$5m])\n"
        "/ on (job, instance) rag_embed_queue_limit_texts > 0.8",
        "for": "5m",
        "severity": "ticket",
        "summary": "The embedding queue on {{ $labels.instance }} is over 80 % full",
        "description": "The queue was {{ $value | humanizePercentage }} full; at the limit, "
        "Search and Upsert are "
        "refused with RESOURCE_EXHAUSTED.",
    },
    {
        "alert": "RagAnswerCacheHitRatioCollapsed",
        "expr": "rag:answer_cache_hit_ratio:rate1h\n"
        "< 0.5 * avg_over_time(rag:answer_cache_hit_ratio:rate1h[$1d] offset $1h)",
        "for": "30m",
        "severity": "ticket",
        "summary": "The answer cache hit ratio fell below half of its previous day",
        "description": "{{ $value | humanizePercentage }} of Ask answers came from the cache "
        "this hour: more generation cost and slower answers.",
    },
    {
        "alert": "RagIndexMemoryNearLimit",
        "expr": "rag_index_memory_bytes\n"
        "/ on (job, instance) (rag_index_memory_limit_bytes > 0) > 0.85",
        "for": "15m",
        "severity": "ticket",
        "summary": "Vector indexes on {{ $labels.instance }} use over 85 % of their memory limit",
        "description": "{{ $value | humanizePercentage }} of the limit used; writes past "
        "limits.max_index_bytes "
        "are refused with RESOURCE_EXHAUSTED.",
    },
    {
        "alert": "RagTenantOverBudget",
        "expr": "max by (tenant) (rag_tenant_budget_reached) == 1",
        "for": "5m",
        "severity": "ticket",
        "summary": "Tenant {{ $labels.tenant }} has reached its daily budget",
        "description": "Its estimated spend today reached the budget in its policy; its calls "
        "that cost money are refused until the next UTC day.",
    },
    {
        "alert": "RagTenantSpendRateAnomaly",
        "expr": 'rag:tenant_usage:increase1h{kind=~".*_tokens|searches|asks"}\n'
        "> 3 * avg_over_time(rag:tenant_usage:increase1h[$1d] offset $1h)\n"
        'and\nrag:tenant_usage:increase1h{kind=~".*_tokens|searches|asks"} > 1000',
        "for": "15m",
        "severity": "ticket",
        "summary": "Tenant {{ $labels.tenant }} uses {{ $labels.kind }} 3x faster than its "
        "previous day",
        "description": "{{ $value }} {{ $labels.kind }} in the last hour, over 3x its hourly "
        "average of the day before.",
    },
    {
        "alert": "RagLogAnomaly",
        "expr": "(\n  rag:log_messages:rate5m - avg_over_time(rag:log_messages:rate5m[$1d])\n)\n"
        "/ stddev_over_time(rag:log_messages:rate5m[$1d]) > 3\n"
        "and\nrag:log_messages:rate5m > 1 / 60",
        "for": "10m",
        "severity": "ticket",
        "summary": "{{ $labels.level }} lines from {{ $labels.logger }} are far above their "
        "usual rate",
        "description": "The rate is {{ $value }} standard deviations above its mean of the "
        "last day (and above one a minute).",
    },
]


def operations_group(config: dict[str, Any], scale: Scale) -> dict[str, Any]:
    rules = []
    for entry in OPERATIONS:
        expr = scale.expr(entry["expr"].replace("$job", config["job"]))
        if "record" in entry:
            rules.append({"record": entry["record"], "expr": expr})
            continue
        rule: dict[str, Any] = {"alert": entry["alert"], "expr": expr}
        if "for" in entry:
            rule["for"] = scale(entry["for"])
        rule["labels"] = {"severity": entry["severity"]}
        rule["annotations"] = {
            "summary": entry["summary"],
            "description": entry["description"],
            "runbook_url": runbook(config, entry["alert"]),
        }
        rules.append(rule)
    return {"name": "rag-operations", "rules": rules}


# -- output ----------------------------------------------------------------------


def to_yaml(value: Any, indent: int = 0) -> Iterator[str]:
    """Block YAML for dicts, lists, strings and numbers; strings JSON-quoted."""
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                yield f"{pad}{key}:"
                yield from to_yaml(item, indent + 2)
            elif isinstance(item, str) and "\n" in item:
                # A literal block keeps a multi-line expression readable.
                yield f"{pad}{key}: |-"
                yield from (f"{pad}  {line}" if line else "" for line in item.split("\n"))
            else:
                yield f"{pad}{key}: {json.dumps(item)}"
    elif isinstance(value, list):
        for item in value:
            lines = list(to_yaml(item, indent + 2))
            yield f"{pad}- {lines[0][indent + 2 :]}"
            yield from lines[1:]
    else:
        yield f"{pad}{json.dumps(value)}"


def render(groups: list[dict[str, Any]], scale: Scale) -> str:
    header = "# Generated by deploy/prometheus/generate.py from slos.yaml; do not edit.\n"
    if scale.factor != 1:
        header += f"# Time scale {scale.factor}: every range and for: divided by it.\n"
    return header + "\n".join(to_yaml({"groups": groups})) + "\n"


def generate(config_path: Path = CONFIG, time_scale: float = 1) -> dict[str, str]:
    """File name -> text of every rule file."""
    config = json.loads(config_path.read_text())
    scale = Scale(time_scale)
    return {
        "slos.yml": render(slo_groups(config, scale), scale),
        "operations.yml": render([operations_group(config, scale)], scale),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=RULES)
    parser.add_argument(
        "--time-scale", type=float, default=1, help="divide every range and for: by this"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in generate(args.config, args.time_scale).items():
        (args.out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
