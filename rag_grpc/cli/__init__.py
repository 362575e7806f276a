"""The ``rag-grpc`` command: run the server, and talk to one from the shell."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rag_grpc.cli import client_commands, data_dir, model, security, serve, transfer
from rag_grpc.cli.client_commands import search_options
from rag_grpc.cli.documents import read_documents
from rag_grpc.cli.output import UsageError, shown
from rag_grpc.cli.settings import command_settings
from rag_grpc.config import ConfigError

__all__ = ["UsageError", "command_settings", "main", "read_documents", "search_options", "shown"]

# Each adds its command(s) to the parser, in the order `rag-grpc --help` lists them.
_COMMANDS = (
    serve.add_serve,
    serve.add_config,
    model.add_model,
    data_dir.add_restore,
    serve.add_descriptor,
    transfer.add_ingest,
    client_commands.add_search,
    client_commands.add_eval,
    client_commands.add_ask,
    client_commands.add_documents,
    client_commands.add_embed,
    transfer.add_backup,
    data_dir.add_compact,
    client_commands.add_stats,
    security.add_commands,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as exc:
        print(f"rag-grpc: {shown(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from rag_grpc.client import RpcError

        if isinstance(exc, RpcError):
            print(f"rag-grpc: {exc.code}: {shown(exc.message)}", file=sys.stderr)
            return 1
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-grpc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser
