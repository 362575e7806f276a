"""The Envoy gateway's bootstrap: the TLS listener with its HTTP filters
(gRPC statistics, JWT authentication, JSON transcoding, rate limit, router),
tracing, the admin interface and where the clusters come from (the CDS file).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from envoy_clusters import TYPE, address, upstream_cluster
from envoy_routes import RATE_LIMIT, RATE_LIMIT_FILTER, routes


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


def bootstrap(args: argparse.Namespace, cds_path: Path) -> dict[str, Any]:
    """The bootstrap file; its clusters come from `cds_path`, re-read when it changes."""
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
