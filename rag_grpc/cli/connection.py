"""How a client command reaches a server: the flags (address, TLS files,
token), the RagClient they make, and a --filter parsed into the core filter."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_grpc.cli.output import UsageError
from rag_grpc.config import read_secret_file

if TYPE_CHECKING:
    from rag_grpc.client import RagClient

DEFAULT_TARGET = "localhost:50051"

# The TLS files a client command takes: flag, environment variable, meaning.
_TLS_FILES = (
    ("--ca", "RAG_GRPC_CA", "call over TLS, verifying the server against this CA"),
    ("--cert", "RAG_GRPC_CERT", "this client's certificate, for mutual TLS"),
    ("--key", "RAG_GRPC_KEY", "the client certificate's key"),
)


def add_client_arguments(cmd: argparse.ArgumentParser) -> None:
    """How a command reaches a server: its address, TLS files and token."""
    cmd.add_argument(
        "--target",
        default=os.environ.get("RAG_GRPC_TARGET", DEFAULT_TARGET),
        help=f"server HOST:PORT (default $RAG_GRPC_TARGET or {DEFAULT_TARGET})",
    )
    cmd.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    for flag, variable, meaning in _TLS_FILES:
        cmd.add_argument(
            flag,
            type=Path,
            default=os.environ.get(variable),
            help=f"{meaning} (default ${variable})",
        )
    cmd.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("RAG_GRPC_TOKEN_FILE"),
        help="file holding the bearer token (a JWT or an API key), if the server requires "
        "one (owner-only, chmod 600; default $RAG_GRPC_TOKEN_FILE, else the token in "
        "$RAG_GRPC_TOKEN)",
    )
    # Refused with a message rather than dropped: argparse would take an
    # unknown --token as an abbreviation of --token-file and then name the
    # token itself in its "cannot read file" error.
    cmd.add_argument("--token", help=argparse.SUPPRESS)


def client_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A command that calls a server in a namespace."""
    cmd: argparse.ArgumentParser = sub.add_parser(name, help=help)
    add_client_arguments(cmd)
    cmd.add_argument("--namespace", default="", help="namespace (default: default)")
    return cmd


def connect(args: argparse.Namespace) -> RagClient:
    """A client for the server the flags name."""
    from rag_grpc.client import RagClient

    token = _token(args)
    try:
        return RagClient(
            args.target,
            timeout=args.timeout,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            token=token,
        )
    except ValueError as exc:  # TlsConfigError names the file; a bad token is not shown
        raise UsageError(str(exc)) from None


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file or the environment, never argv."""
    if args.token is not None:
        raise UsageError(
            "--token is not accepted: the command line is visible to every user of this "
            "machine (ps, /proc); give the token in a file readable only by you with "
            "--token-file FILE (or $RAG_GRPC_TOKEN_FILE), or in $RAG_GRPC_TOKEN"
        )
    if args.token_file:
        try:
            return read_secret_file(Path(args.token_file), "token file")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return os.environ.get("RAG_GRPC_TOKEN") or None


def parse_filter(text: str | None) -> Any:
    """--filter's proto JSON as the core filter; None when not given."""
    if not text:
        return None
    from google.protobuf import json_format

    from rag_grpc.errors import InvalidArgument
    from rag_grpc.pb import common_pb2
    from rag_grpc.services.convert import filter_from_pb

    try:
        message = json_format.Parse(text, common_pb2.Filter())
        return filter_from_pb(message)
    except (json_format.ParseError, InvalidArgument) as exc:
        raise UsageError(f"--filter is not a valid rag.v1.Filter: {exc}") from None
