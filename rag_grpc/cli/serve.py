"""``rag-grpc serve`` (run the server), ``config`` (the effective
configuration) and ``descriptor`` (the contract, for Envoy)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rag_grpc.cli.output import UsageError
from rag_grpc.cli.settings import command_settings, configure_logging, private_files
from rag_grpc.services.registry import SERVICE_NAMES

_ENV_HELP = (
    "environment overlay read over the config file: --env prod reads rag-grpc.toml "
    "then rag-grpc.prod.toml (default $RAG_GRPC_ENV)"
)


def add_serve(sub: Any) -> None:
    """The serve command."""
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 50051; 0 picks one)")
    serve.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--env", help=_ENV_HELP)
    serve.add_argument(
        "--services",
        help="comma-separated services to run (default: all): " + ",".join(SERVICE_NAMES),
    )
    serve.add_argument("--retrieval-target", help="HOST:PORT of a remote RetrievalService")
    serve.add_argument("--generation-target", help="HOST:PORT of a remote GenerationService")
    serve.add_argument(
        "--generator",
        choices=["extractive", "triton"],
        help="answer generator (default extractive; triton calls a Triton server)",
    )
    serve.add_argument("--triton-url", help="HOST:PORT of Triton's gRPC endpoint")
    serve.add_argument("--triton-model", help="Triton model to generate with")
    serve.add_argument(
        "--tls-cert", type=Path, help="serve TLS with this certificate chain (server.tls_cert)"
    )
    serve.add_argument("--tls-key", type=Path, help="the certificate's key (server.tls_key)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="require client certificates signed by this CA: mutual TLS (server.tls_client_ca)",
    )
    serve.add_argument(
        "--policy", type=Path, help="tenants, roles, operators and API keys (auth.policy_file)"
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="serve a non-loopback address without authentication (auth.insecure_no_auth); "
        "anyone who reaches the port can read and change everything",
    )
    serve.add_argument(
        "--seed-demo",
        action="store_true",
        help="ingest the demo corpus (Python's pydoc topics) if the data dir is empty",
    )
    serve.set_defaults(func=_serve)


def add_config(sub: Any) -> None:
    """The config command."""
    config = sub.add_parser("config", help="print the effective configuration (secrets redacted)")
    config.add_argument("--config", type=Path, help="TOML configuration file")
    config.add_argument("--env", help=_ENV_HELP)
    config.add_argument(
        "--show-origin",
        action="store_true",
        help="print each value as `key = value  # origin` (default, a file, an environment "
        "variable or the command line) instead of JSON",
    )
    config.set_defaults(func=_config)


def add_descriptor(sub: Any) -> None:
    """The descriptor command."""
    descriptor = sub.add_parser(
        "descriptor", help="write the rag.v1 FileDescriptorSet (for Envoy's JSON transcoder)"
    )
    descriptor.add_argument("--out", type=Path, required=True)
    descriptor.set_defaults(func=_descriptor)


def _serve(args: argparse.Namespace) -> int:
    from rag_grpc.demo import pydoc_topics
    from rag_grpc.embed.model_files import ModelFilesError
    from rag_grpc.server import serve

    private_files()
    settings = command_settings(args)
    configure_logging(settings)
    seed = pydoc_topics() if args.seed_demo else None
    try:
        asyncio.run(serve(settings, seed))
    except ModelFilesError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _config(args: argparse.Namespace) -> int:
    settings = command_settings(args)
    if not args.show_origin:
        print(json.dumps(settings.redacted(), indent=2))
        return 0
    for path, value in _leaf_values(settings.redacted()):
        print(f"{'.'.join(path)} = {json.dumps(value)}  # {settings.origin(path)}")
    return 0


def _leaf_values(
    data: dict[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaf_values(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _descriptor(args: argparse.Namespace) -> int:
    from rag_grpc.pb import descriptor_set

    args.out.write_bytes(descriptor_set())
    print(f"wrote {args.out}")
    return 0
