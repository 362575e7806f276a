"""The upstream clusters of the Envoy gateway: the rag-grpc replicas (and the
canary) that Envoy reads from the CDS file, round robin over HTTP/2 with
health checks, circuit breakers, outlier detection and, optionally, mutual TLS.

Also the small pieces every part of the configuration uses (`TYPE`,
`address`, `is_ip`). Standard library only, as envoy/render.py.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

TYPE = "type.googleapis.com/"


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


def clusters(args: argparse.Namespace) -> dict[str, Any]:
    """The CDS file: the `stable` cluster over every --upstream and the `canary`."""
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
