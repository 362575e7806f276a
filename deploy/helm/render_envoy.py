#!/usr/bin/env python3
"""Render the chart's Envoy gateway configuration with envoy/render.py.

    deploy/helm/render_envoy.py [--check]

Helm cannot run Python, so the gateway's configuration is rendered here, at
chart build time, into deploy/helm/rag-grpc/files/envoy/ and committed; the
chart's ConfigMap reads those files and puts the retrieval replicas' address
in place of UPSTREAM_HOST (tests/test_helm.py checks that the committed files
equal a fresh render). Paths are those of the gateway pod: the bootstrap and
clusters in /etc/envoy/config (the ConfigMap), the certificates in
/etc/envoy/certs and /etc/envoy/upstream (Secrets).

- envoy.json: the bootstrap (TLS for clients with required client
  certificates, routes, retries of idempotent calls, rate limits, statistics);
- clusters-plain.cds.json / clusters-mtls.cds.json: the upstream cluster,
  the replicas' headless Service (STRICT_DNS: every pod is an endpoint,
  round robin, gRPC health-checked), in plaintext or with mutual TLS
  (tls.enabled).

Run it again after changing envoy/render.py; --check only compares.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "rag-grpc" / "files" / "envoy"
# Replaced by the ConfigMap template with the headless Service's DNS name.
UPSTREAM_HOST = "UPSTREAM_HOST"
UPSTREAM_PORT = 50051
LISTEN_PORT = 8443
ADMIN_PORT = 9901
CONFIG_DIR = Path("/etc/envoy/config")
CERTS_DIR = Path("/etc/envoy/certs")
UPSTREAM_DIR = Path("/etc/envoy/upstream")


def load_renderer() -> ModuleType:
    """envoy/render.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("envoy_render", ROOT / "envoy" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arguments(mtls: bool) -> argparse.Namespace:
    """What `envoy/render.py` would parse for the gateway pod: its defaults
    for rate limits, all interfaces, no canary, JWT or tracing."""
    return argparse.Namespace(
        listen_port=LISTEN_PORT,
        listen_address="0.0.0.0",
        admin_port=ADMIN_PORT,
        upstream=[(UPSTREAM_HOST, UPSTREAM_PORT)],
        canary=None,
        canary_weight=10,
        rate_limit=200.0,
        burst=400,
        client_rate_limit=50.0,
        client_burst=100,
        otlp=None,
        certs=CERTS_DIR,
        transcode=None,
        upstream_ca=UPSTREAM_DIR / "ca.crt" if mtls else None,
        upstream_cert=UPSTREAM_DIR / "tls.crt" if mtls else None,
        upstream_key=UPSTREAM_DIR / "tls.key" if mtls else None,
        upstream_san=None,
        source_address=None,
        jwt_jwks=None,
        jwt_issuer=None,
        jwt_audience=[],
        jwt_allow_missing=False,
        optional_client_certificates=False,
        out=CONFIG_DIR / "envoy.json",
        clusters_only=False,
    )


def render() -> dict[str, str]:
    """File name -> content of every file the chart carries for Envoy."""
    envoy = load_renderer()
    out: dict[str, Any] = {}
    plain = arguments(mtls=False)
    cds = envoy.cds_path_for(plain.out)
    out["envoy.json"] = envoy.bootstrap(plain, cds)
    out["clusters-plain.cds.json"] = envoy.clusters(plain)
    out["clusters-mtls.cds.json"] = envoy.clusters(arguments(mtls=True))
    return {name: json.dumps(content, indent=2) + "\n" for name, content in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, content in render().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != content:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    if stale:
        print(f"stale: {', '.join(stale)}; run deploy/helm/render_envoy.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
