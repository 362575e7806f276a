"""The routes of the Envoy gateway: one per kind of call, with its timeouts,
retries (idempotent methods only, never the Snapshot stream), the canary
split and the local rate limits (per route and per client identity).
"""

from __future__ import annotations

import argparse
from typing import Any

from envoy_clusters import TYPE

# Methods safe to retry: they change nothing.
IDEMPOTENT = [
    "/rag.v1.RetrievalService/Search",
    "/rag.v1.RetrievalService/SearchBatch",
    "/rag.v1.RetrievalService/Get",
    "/rag.v1.EmbeddingService/",
    "/rag.v1.AdminService/",
    "/rag.v1.IngestionService/GetJob",
    "/grpc.reflection.",
]
# Matched before the AdminService prefix above, so it is not retried.
SNAPSHOT = "/rag.v1.AdminService/Snapshot"
CANARY_HEADER = "x-rag-canary"
RATE_LIMIT = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"


def rate_limit(rps: float, burst: int, client_rps: float, client_burst: int) -> dict[str, Any]:
    """One route's buckets: the route's own, and one per client identity."""

    def bucket(per_second: float, size: int) -> dict[str, Any]:
        # Refill every 100 ms (or 1 s for slow rates) with the matching share.
        interval_ms = 100 if per_second >= 10 else 1000
        tokens = max(1, round(per_second * interval_ms / 1000))
        return {
            "max_tokens": size,
            "tokens_per_fill": tokens,
            "fill_interval": f"{interval_ms / 1000}s",
        }

    return {
        "@type": TYPE + RATE_LIMIT,
        "stat_prefix": "route_rate_limit",
        "token_bucket": bucket(rps, burst),
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "rate_limited_as_resource_exhausted": True,
        "response_headers_to_add": [
            {
                "header": {"key": "x-rag-rate-limited", "value": "true"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        # An entry with a key and no value is a bucket per distinct value.
        "descriptors": [
            {"entries": [{"key": "client"}], "token_bucket": bucket(client_rps, client_burst)}
        ],
        "max_dynamic_descriptors": 1024,
    }


def route_action(args: argparse.Namespace, *, retries: bool, streaming: bool) -> dict[str, Any]:
    action: dict[str, Any] = {
        # gRPC: the caller's grpc-timeout is the timeout, capped here.
        "timeout": "0s" if streaming else "60s",
        "max_stream_duration": {"grpc_timeout_header_max": "300s" if streaming else "60s"},
    }
    if args.canary:
        action["weighted_clusters"] = {
            "clusters": [
                {"name": "stable", "weight": 100 - args.canary_weight},
                {"name": "canary", "weight": args.canary_weight},
            ]
        }
    else:
        action["cluster"] = "stable"
    if retries:
        action["retry_policy"] = {
            "retry_on": "unavailable,reset,connect-failure,refused-stream",
            "num_retries": 2,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
            # A retry goes to another replica: without it a retry could land
            # on the dead one again (Search failed after a replica was killed,
            # tests/test_chaos.py).
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": TYPE
                        + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 3,
        }
    return action


def routes(args: argparse.Namespace) -> list[dict[str, Any]]:
    limit = {
        RATE_LIMIT_FILTER: rate_limit(
            args.rate_limit, args.burst, args.client_rate_limit, args.client_burst
        )
    }
    per_client = [
        {
            "actions": [
                {
                    "request_headers": {
                        "header_name": "x-forwarded-client-cert",
                        "descriptor_key": "client",
                    }
                }
            ]
        }
    ]
    # gRPC only, unless JSON clients come in through the transcoder.
    grpc: dict[str, Any] = {} if args.transcode else {"grpc": {}}
    out: list[dict[str, Any]] = [
        {
            # Health checks: never rate limited, never retried.
            "name": "health",
            "match": {"prefix": "/grpc.health.v1.Health/", **grpc},
            "route": {"cluster": "stable", "timeout": "5s"},
        }
    ]
    if args.canary:
        out.append(
            {
                "name": "canary-override",
                "match": {
                    "prefix": "/",
                    "headers": [{"name": CANARY_HEADER, "string_match": {"exact": "always"}}],
                    **grpc,
                },
                "route": {
                    "cluster": "canary",
                    "timeout": "0s",
                    "max_stream_duration": {"grpc_timeout_header_max": "300s"},
                    "rate_limits": per_client,
                },
                "typed_per_filter_config": limit,
            }
        )
    # Snapshot streams the whole data dir: never retried (a retry would take
    # a second full copy), and bounded by the caller's deadline only.
    out.append(
        {
            "name": "snapshot",
            "match": {"path": SNAPSHOT, **grpc},
            "route": {
                **route_action(args, retries=False, streaming=True),
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                # Nothing flows while the server copies the data (minutes for
                # a large store): wait longer than the listener's 5 min.
                "idle_timeout": "3600s",
                "rate_limits": per_client,
            },
            "typed_per_filter_config": limit,
        }
    )
    for prefix in IDEMPOTENT:
        out.append(
            {
                "name": "read:" + prefix.strip("/"),
                "match": {"prefix": prefix, **grpc},
                "route": {
                    **route_action(args, retries=True, streaming=False),
                    "rate_limits": per_client,
                },
                "typed_per_filter_config": limit,
            }
        )
    for name, prefix, streaming in (
        ("ask", "/rag.v1.RagService/", True),
        ("generate", "/rag.v1.GenerationService/", True),
        ("ingest-watch", "/rag.v1.IngestionService/WatchJob", True),
        ("writes", "/rag.v1.", False),
    ):
        out.append(
            {
                "name": name,
                "match": {"prefix": prefix, **grpc},
                "route": {
                    **route_action(args, retries=False, streaming=streaming),
                    "rate_limits": per_client,
                },
                "typed_per_filter_config": limit,
            }
        )
    return out
