#!/usr/bin/env python3
"""Render the Envoy gateway configuration for one environment.

    envoy/render.py --listen-port P --admin-port A --upstream HOST:PORT \\
        [--canary HOST:PORT --canary-weight W] [--rate-limit RPS --burst N] \\
        [--client-rate-limit RPS --client-burst N] [--otlp HOST:PORT] \\
        [--upstream-ca F --upstream-cert F --upstream-key F [--upstream-san T:V]] \\
        [--source-address IP] \\
        [--jwt-jwks F --jwt-issuer I --jwt-audience A \\
         [--jwt-allow-missing | --optional-client-certificates]] \\
        --certs DIR --out FILE

Writes FILE (the bootstrap) and, beside it, ``<FILE stem>.cds.json``: the
upstream clusters, which Envoy reads through file-based dynamic configuration
(CDS). Re-running with ``--clusters-only`` and another ``--upstream`` rewrites
that file atomically: Envoy switches over (blue-green) without a restart.

What the gateway does (see envoy/README.md):
- downstream TLS 1.2+ (1.3 preferred) with required client certificates
  checked against DIR/ca.pem; the client identity goes upstream in
  x-forwarded-client-cert (set by Envoy, never passed through);
- with --upstream-ca/--upstream-cert/--upstream-key, mutual TLS to rag-grpc
  too: Envoy presents its own client certificate and checks rag-grpc's
  against the CA and the expected name, so rag-grpc can tell the hop is its
  gateway before it believes the forwarded identity;
- with --jwt-*, Envoy's jwt_authn checks bearer JWTs (signature against a
  local JWKS file, exp/nbf, issuer, audience) before any call goes upstream,
  and forwards the token, which rag-grpc verifies again for the identity;
- gRPC over HTTP/2 for every rag.v1 service, timeouts from the caller's
  grpc-timeout, retries on UNAVAILABLE for idempotent methods only (never
  for the Snapshot stream, which has no timeout but the caller's);
- circuit breakers, outlier detection and active gRPC health checks upstream;
- local token buckets per route and per client identity (health checks
  exempt), answered with RESOURCE_EXHAUSTED;
- canary: weighted clusters, and the header ``x-rag-canary: always`` routes
  to the canary;
- per-method gRPC statistics and, with --otlp, OpenTelemetry tracing;
- the admin interface on loopback only.

Only the standard library is used, so it runs before anything is installed.
The output is JSON, which Envoy reads as YAML too.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

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
TYPE = "type.googleapis.com/"
RATE_LIMIT = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


def hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


SAN_TYPES = {"DNS": "DNS", "URI": "URI", "IP": "IP_ADDRESS", "EMAIL": "EMAIL"}


def subject_alt_name(value: str) -> tuple[str, str]:
    kind, sep, name = value.partition(":")
    if not sep or not name or kind.upper() not in SAN_TYPES:
        raise argparse.ArgumentTypeError(f"expected DNS:NAME, URI:URI or IP:ADDRESS, got {value!r}")
    return SAN_TYPES[kind.upper()], name


def address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def upstream_tls(args: argparse.Namespace, host: str) -> dict[str, Any]:
    """Mutual TLS to a rag-grpc upstream: our client certificate, and its
    certificate checked against the CA and the name it must carry."""
    if args.upstream_san:
        san_type, value = args.upstream_san
    else:
        san_type, value = ("IP_ADDRESS" if is_ip(host) else "DNS"), host
    context: dict[str, Any] = {
        "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3",
            },
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(args.upstream_cert.resolve())},
                    "private_key": {"filename": str(args.upstream_key.resolve())},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(args.upstream_ca.resolve())},
                # Without a name, any certificate from that CA (a client's)
                # could stand in for rag-grpc.
                "match_typed_subject_alt_names": [
                    {"san_type": san_type, "matcher": {"exact": value}}
                ],
            },
        },
    }
    if not is_ip(host):
        context["sni"] = host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def upstream_cluster(name: str, endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """rag-grpc upstreams, round robin: HTTP/2, health-checked, with breakers
    and outlier detection."""
    return {
        "@type": TYPE + "envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC" if all(is_ip(host) for host, _ in endpoints) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": address(host, port)}} for host, port in endpoints
                    ]
                }
            ],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 1024,
                    "max_pending_requests": 1024,
                    "max_requests": 1024,
                    "max_retries": 8,
                }
            ]
        },
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 5,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_percent": 50,
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                # Envoy checks every 60 s until a cluster has had traffic; a
                # replica killed then stayed in rotation until outlier
                # detection saw its failures.
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    }


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


RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"


def transcoder(args: argparse.Namespace) -> list[dict[str, Any]]:
    """JSON over HTTP/1.1 or 2 in, gRPC upstream: `curl -d '{...}' .../rag.v1.X/Method`."""
    if args.transcode is None:
        return []
    return [
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": TYPE
                + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                "proto_descriptor": str(args.transcode.resolve()),
                "services": SERVICES,
                "auto_mapping": True,
                "convert_grpc_status": True,
                "print_options": {
                    "add_whitespace": False,
                    "always_print_primitive_fields": True,
                    "preserve_proto_field_names": True,
                },
            },
        }
    ]


JWT_PROVIDER = "rag"


def jwt_authn(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Bearer JWTs checked at the edge: an invalid or expired token (or, unless
    --jwt-allow-missing, none) gets UNAUTHENTICATED from Envoy (HTTP 401)
    without reaching rag-grpc. Health checks and reflection stay open, as
    rag-grpc keeps them."""
    if args.jwt_jwks is None:
        return []
    requirement: dict[str, Any] = {"provider_name": JWT_PROVIDER}
    if args.jwt_allow_missing:
        # A call without a token passes (its identity is its certificate's);
        # a call with a bad one is still refused.
        requirement = {"requires_any": {"requirements": [requirement, {"allow_missing": {}}]}}
    return [
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    JWT_PROVIDER: {
                        "issuer": args.jwt_issuer,
                        "audiences": args.jwt_audience,
                        # Read at start: restart Envoy (or hot-restart) after
                        # rotating keys, as rag-grpc reloads on SIGHUP.
                        "local_jwks": {"filename": str(args.jwt_jwks.resolve())},
                        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                        # Kept, so rag-grpc verifies it again and takes the
                        # caller's identity and tenant from its claims.
                        "forward": True,
                        # rag-grpc's leeway (auth JwtSettings.leeway_s).
                        "clock_skew_seconds": 30,
                    }
                },
                "rules": [
                    {"match": {"prefix": "/grpc.health.v1.Health/"}},
                    {"match": {"prefix": "/grpc.reflection."}},
                    {"match": {"prefix": "/"}, "requires": requirement},
                ],
            },
        }
    ]


def _service_registry() -> Any:
    """rag_grpc/services/registry.py, loaded by path: it imports only the
    standard library, so this script still runs before anything is installed."""
    path = Path(__file__).resolve().parent.parent / "rag_grpc" / "services" / "registry.py"
    spec = importlib.util.spec_from_file_location("_rag_grpc_service_registry", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SERVICES = [entry.full_name for entry in _service_registry().SERVICES.values()]


def bootstrap(args: argparse.Namespace, cds_path: Path) -> dict[str, Any]:
    certs = args.certs.resolve()
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            # Optional only for JWT callers (checked in main): a certificate
            # that is sent is still verified against ca.pem.
            "require_client_certificate": not args.optional_client_certificates,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                # HTTP/1.1 too when JSON clients (curl) are let in.
                "alpn_protocols": ["h2", "http/1.1"] if args.transcode else ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certs / "server.pem")},
                        "private_key": {"filename": str(certs / "server.key")},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(certs / "ca.pem")}},
            },
        },
    }
    hcm: dict[str, Any] = {
        "@type": TYPE
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "rag_gateway",
        "codec_type": "AUTO",
        "use_remote_address": True,
        # The client's certificate identity, set by Envoy and never taken
        # from the client: whatever x-forwarded-client-cert a client sends is
        # dropped, and Envoy's own element (By, Hash, Subject, URI, quoted
        # and escaped as Envoy documents) is the only one rag-grpc sees.
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True, "subject": True},
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "route_config": {
            "name": "rag",
            # The clusters come from the CDS file, after the routes load.
            "validate_clusters": False,
            "virtual_hosts": [{"name": "rag", "domains": ["*"], "routes": routes(args)}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_stats",
                "typed_config": {
                    "@type": TYPE + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                    "stats_for_all_methods": True,
                    "enable_upstream_stats": True,
                    "emit_filter_state": True,
                },
            },
            *jwt_authn(args),
            *transcoder(args),
            {
                # Off here; each route turns on its own buckets.
                "name": RATE_LIMIT_FILTER,
                "typed_config": {"@type": TYPE + RATE_LIMIT, "stat_prefix": "rate_limit"},
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    static_clusters: list[dict[str, Any]] = []
    if args.otlp:
        host, port = args.otlp
        hcm["tracing"] = {
            "random_sampling": {"value": 100},
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": TYPE + "envoy.config.trace.v3.OpenTelemetryConfig",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "otel_collector"},
                        "timeout": "1s",
                    },
                    "service_name": "rag-grpc-gateway",
                },
            },
        }
        collector = upstream_cluster("otel_collector", [(host, port)])
        for key in ("@type", "health_checks", "outlier_detection", "common_lb_config"):
            collector.pop(key)
        static_clusters.append(collector)
    return {
        "node": {"id": "rag-gateway", "cluster": "rag-gateway"},
        "admin": {"address": address("127.0.0.1", args.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "rag_grpc",
                    "address": address(args.listen_address, args.listen_port),
                    "filter_chains": [
                        {
                            "transport_socket": tls,
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": static_clusters,
        },
        "dynamic_resources": {
            "cds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(cds_path.resolve()),
                    "watched_directory": {"path": str(cds_path.resolve().parent)},
                },
            }
        },
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {}}]},
    }


def clusters(args: argparse.Namespace) -> dict[str, Any]:
    resources = []
    upstreams = [("stable", list(args.upstream))]
    if args.canary:
        upstreams.append(("canary", [args.canary]))
    for name, endpoints in upstreams:
        cluster = upstream_cluster(name, endpoints)
        if args.upstream_ca:
            cluster["transport_socket"] = upstream_tls(args, endpoints[0][0])
        if args.source_address:
            # The address rag-grpc's auth.trusted_proxies names: calls from any
            # other address of this host are not the gateway's.
            cluster["upstream_bind_config"] = {
                "source_address": {"address": args.source_address, "port_value": 0}
            }
        resources.append(cluster)
    return {"version_info": "1", "resources": resources}


def uses_upstream_tls(cds: Path) -> bool:
    """Whether the clusters Envoy runs now (the CDS file) speak TLS upstream."""
    try:
        current = json.loads(cds.read_text())
    except (OSError, ValueError):
        return False
    return any("transport_socket" in c for c in current.get("resources", []))


def write_atomically(path: Path, content: dict[str, Any]) -> None:
    """Write then rename, so Envoy never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(content, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def cds_path_for(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".cds.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen-port", type=int, default=8443)
    parser.add_argument(
        "--listen-address", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 for all"
    )
    parser.add_argument(
        "--admin-port", type=int, default=9901, help="admin interface, on 127.0.0.1"
    )
    parser.add_argument(
        "--upstream",
        type=hostport,
        action="append",
        required=True,
        help="HOST:PORT of a rag-grpc replica; repeat for each (round robin)",
    )
    parser.add_argument("--canary", type=hostport, help="HOST:PORT of the canary rag-grpc")
    parser.add_argument("--canary-weight", type=int, default=10, help="percent to the canary (10)")
    parser.add_argument("--rate-limit", type=float, default=200.0, help="calls/s per route (200)")
    parser.add_argument("--burst", type=int, default=400, help="bucket size per route (400)")
    parser.add_argument(
        "--client-rate-limit", type=float, default=50.0, help="calls/s per client and route (50)"
    )
    parser.add_argument(
        "--client-burst", type=int, default=100, help="bucket size per client and route (100)"
    )
    parser.add_argument(
        "--otlp", type=hostport, help="HOST:PORT of an OTLP/gRPC collector for traces"
    )
    parser.add_argument(
        "--certs", type=Path, required=True, help="directory made by envoy/certs.sh"
    )
    parser.add_argument(
        "--transcode",
        type=Path,
        metavar="DESCRIPTOR_SET",
        help="gRPC-JSON transcoding (POST /rag.v1.<Service>/<Method> with a JSON body) from "
        "this descriptor set; make it with `rag-grpc descriptor --out FILE`",
    )
    upstream = parser.add_argument_group(
        "mutual TLS to rag-grpc (all three together; rag-grpc then believes the "
        "forwarded client identity only over this hop)"
    )
    upstream.add_argument(
        "--upstream-ca", type=Path, help="the CA that signed rag-grpc's server certificate"
    )
    upstream.add_argument(
        "--upstream-cert", type=Path, help="Envoy's client certificate towards rag-grpc"
    )
    upstream.add_argument("--upstream-key", type=Path, help="that certificate's key")
    upstream.add_argument(
        "--upstream-san",
        type=subject_alt_name,
        help="the name rag-grpc's certificate must carry, as DNS:NAME, URI:URI or IP:ADDRESS "
        "(default: the --upstream host)",
    )
    parser.add_argument(
        "--source-address",
        help="connect to rag-grpc from this local address (the one its auth.trusted_proxies names)",
    )
    jwt = parser.add_argument_group("JWT authentication at the gateway (jwt_authn)")
    jwt.add_argument("--jwt-jwks", type=Path, help="JWKS file with the issuer's public keys")
    jwt.add_argument("--jwt-issuer", help="the iss every token must carry")
    jwt.add_argument(
        "--jwt-audience",
        action="append",
        default=[],
        help="an accepted aud (repeat for several)",
    )
    jwt.add_argument(
        "--jwt-allow-missing",
        action="store_true",
        help="let calls without a token through (a bad token is still refused)",
    )
    jwt.add_argument(
        "--optional-client-certificates",
        action="store_true",
        help="let clients connect without a certificate, known by their JWT alone (a "
        "certificate sent is still verified, and names the caller upstream)",
    )
    parser.add_argument("--out", type=Path, required=True, help="bootstrap file to write")
    parser.add_argument(
        "--clusters-only",
        action="store_true",
        help="rewrite only the upstream clusters (blue-green)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.canary_weight <= 100:
        parser.error("--canary-weight must be between 0 and 100")
    if (
        args.rate_limit <= 0
        or args.burst < 1
        or args.client_rate_limit <= 0
        or args.client_burst < 1
    ):
        parser.error("rate limits must be positive")
    if args.transcode is not None and not args.transcode.is_file():
        parser.error(f"{args.transcode} is missing; make it with `rag-grpc descriptor --out FILE`")
    given = [args.upstream_ca, args.upstream_cert, args.upstream_key]
    if any(given) and not all(given):
        parser.error("--upstream-ca, --upstream-cert and --upstream-key go together (mutual TLS)")
    if args.upstream_san and not args.upstream_ca:
        parser.error("--upstream-san needs --upstream-ca, --upstream-cert and --upstream-key")
    for path in (p for p in given if p is not None):
        if not path.is_file():
            parser.error(f"{path} is missing")
    if args.source_address is not None and not is_ip(args.source_address):
        parser.error(f"--source-address must be an IP address, got {args.source_address!r}")
    if args.jwt_jwks is not None:
        if not args.jwt_issuer or not args.jwt_audience:
            parser.error("--jwt-jwks needs --jwt-issuer and at least one --jwt-audience")
        if not args.jwt_jwks.is_file():
            parser.error(f"{args.jwt_jwks} is missing")
    elif args.jwt_issuer or args.jwt_audience or args.jwt_allow_missing:
        parser.error("--jwt-issuer, --jwt-audience and --jwt-allow-missing need --jwt-jwks")
    if args.optional_client_certificates and (args.jwt_jwks is None or args.jwt_allow_missing):
        # Otherwise a call could come through with neither credential.
        parser.error(
            "--optional-client-certificates needs --jwt-jwks, without --jwt-allow-missing: "
            "every call must then carry a valid token"
        )
    for name in ("ca.pem", "server.pem", "server.key"):
        if not (args.certs / name).is_file():
            parser.error(
                f"{args.certs / name} is missing; make it with envoy/certs.sh {args.certs}"
            )
    cds = cds_path_for(args.out)
    if args.clusters_only and not args.upstream_ca and uses_upstream_tls(cds):
        parser.error(
            f"the clusters in {cds} speak mutual TLS to rag-grpc; give the same "
            "--upstream-ca, --upstream-cert and --upstream-key (rewritten without them, "
            "Envoy would call rag-grpc in plaintext)"
        )
    write_atomically(cds, clusters(args))
    if not args.clusters_only:
        write_atomically(args.out, bootstrap(args, cds))
    print(f"wrote {cds}" + ("" if args.clusters_only else f" and {args.out}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
