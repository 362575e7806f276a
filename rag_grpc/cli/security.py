"""The security commands of ``rag-grpc``: API keys, usage per tenant, and the
audit log (verify, export).

    rag-grpc apikey create --name ci [--expires 2027-01-01T00:00:00Z] [--key-file F]
    rag-grpc usage [--tenant T] [--json]
    rag-grpc audit verify [--data-dir D | --file F] [--anchor SEQ:HASH]
    rag-grpc audit export --since ISO [--data-dir D | --file F]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rag_grpc.cli.connection import add_client_arguments, connect
from rag_grpc.cli.output import UsageError, json_line, shown
from rag_grpc.cli.settings import command_settings


def add_commands(sub: Any) -> None:
    """Add apikey, usage and audit to the rag-grpc parser."""
    apikey = sub.add_parser("apikey", help="make API keys for the policy file")
    apikey_sub = apikey.add_subparsers(dest="apikey_command", required=True)
    create = apikey_sub.add_parser(
        "create",
        help="a new key, printed once, and its [[api_keys]] entry (hash only) for the policy",
    )
    create.add_argument(
        "--name", required=True, help="the key's name; the policy grants 'apikey:NAME' a role"
    )
    create.add_argument(
        "--expires",
        type=_aware_datetime,
        help="when the key stops working, with a zone, e.g. 2027-01-01T00:00:00Z",
    )
    create.add_argument(
        "--key-file",
        type=Path,
        help="write the key into this new file (owner-only) instead of printing it",
    )
    create.set_defaults(func=_apikey_create)

    usage = sub.add_parser("usage", help="usage and estimated cost per tenant")
    add_client_arguments(usage)
    usage.add_argument("--tenant", help="only this tenant (default: every tenant you may see)")
    usage.add_argument("--json", action="store_true", help="print one JSON array")
    usage.set_defaults(func=_usage)

    audit = sub.add_parser("audit", help="check or export the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the hash chain; exit status 1 and the reason when it is broken"
    )
    _audit_source(verify)
    verify.add_argument(
        "--anchor",
        type=_anchor,
        help="SEQ:HASH printed by an earlier verify (kept elsewhere): also catches a rewrite "
        "of every row after it",
    )
    verify.set_defaults(func=_audit_verify)
    export = audit_sub.add_parser(
        "export",
        help="print the events since a time, one JSON object per line: from the file "
        "given, else from the server (operators only)",
    )
    add_client_arguments(export)
    export.add_argument(
        "--since",
        type=_aware_datetime,
        required=True,
        help="events at or after this time, e.g. 2026-12-01T00:00:00Z",
    )
    _audit_source(export)
    export.set_defaults(func=_audit_export)


def _audit_source(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", type=Path, help="TOML configuration file (for auth.audit_db)")
    where = cmd.add_mutually_exclusive_group()
    where.add_argument(
        "--data-dir",
        type=Path,
        help="the server's data directory (its audit log, unless auth.audit_db names another)",
    )
    where.add_argument("--file", type=Path, help="the audit log file itself")


def _aware_datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time with a zone, e.g. 2027-01-01T00:00:00Z, got {text!r}"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no zone; add one, e.g. {value.isoformat()}Z"
        )
    return value


_ANCHOR = re.compile(r"([1-9][0-9]*):([0-9a-f]{64})")


def _anchor(text: str) -> Any:
    from rag_grpc.security.audit import ChainHead

    match = _ANCHOR.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            "expected SEQ:HASH as `audit verify` prints it, e.g. 42:3f9a…(64 hex digits)"
        )
    return ChainHead(int(match.group(1)), match.group(2))


# -- apikey ----------------------------------------------------------------


def _apikey_create(args: argparse.Namespace) -> int:
    from rag_grpc.security.api_keys import new_api_key

    try:
        key, entry = new_api_key(args.name, args.expires)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.key_file is not None:
        _write_new_private_file(args.key_file, key + "\n")
        where = f"# The key is in {args.key_file} (owner-only); it is not stored anywhere else."
    else:
        where = (
            "# The key, shown this once and stored nowhere: keep it in a file only you can\n"
            "# read (chmod 600) and give it with --token-file or $RAG_GRPC_TOKEN.\n"
            f"# key: {key}"
        )
    lines = [
        where,
        "# Paste the entry below into the policy file, and grant the key a role in a",
        f'# tenant: {{ identity = "apikey:{entry.name}", role = "reader" }} among its members.',
        "# To rotate, add the new key's entry under the same name, then remove the old one.",
        "[[api_keys]]",
        f"name = {json.dumps(entry.name)}",
        f"hash = {json.dumps(entry.hash)}",
    ]
    if entry.expires is not None:
        lines.append(f"expires = {entry.expires.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}")
    print("\n".join(lines))
    return 0


def _write_new_private_file(path: Path, text: str) -> None:

    try:
        # O_EXCL: an existing file (perhaps the only copy of another key) is
        # never overwritten; 0600 from creation, so the key is never readable
        # by others, not even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists; give a new file for the key") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


# -- usage -----------------------------------------------------------------


def _usage(args: argparse.Namespace) -> int:
    from rag_grpc.security.usage import COUNTERS, GAUGES

    fields = COUNTERS + GAUGES  # in the order they are printed

    with connect(args) as client:
        tenants = client.usage(args.tenant or "")
    rows = [
        {
            "tenant": t.tenant,
            **{f: getattr(t, f) for f in fields},
            "estimated_cost": round(t.estimated_cost, 6),
            "estimated_cost_today": round(t.estimated_cost_today, 6),
        }
        for t in tenants
    ]
    if args.json:
        print(json_line(rows))
        return 0
    if not rows:
        print("no usage recorded")
    for row in rows:
        counters = ", ".join(f"{f.replace('_', ' ')} {row[f]}" for f in fields)
        print(
            f"{shown(row['tenant'])}: {counters}; estimated cost ${row['estimated_cost']:.4f} "
            f"(today ${row['estimated_cost_today']:.4f})"
        )
    return 0


# -- audit -----------------------------------------------------------------


def _audit_file(args: argparse.Namespace) -> Path:
    """The audit log named by --file, else the one of the command's settings
    (--config, --data-dir); UsageError when it does not exist, since opening a
    missing file would create an empty log that verifies."""
    # Settings only without --file: the file alone needs no configuration.
    path: Path = args.file or command_settings(args).audit_path
    if not path.is_file():
        raise UsageError(f"{path} does not exist: no audit log there")
    return path


def _audit_verify(args: argparse.Namespace) -> int:
    from rag_grpc.security.audit import AuditLog

    path = _audit_file(args)
    log = AuditLog(path)
    try:
        result = log.verify(args.anchor)
        head = log.head()
    finally:
        log.close()
    if not result.ok:
        print(
            f"rag-grpc: {path}: the audit log is broken at row {result.first_bad}: "
            f"{result.reason} ({result.checked} rows checked out before it)",
            file=sys.stderr,
        )
        return 1
    if head is None:
        print(f"{path}: empty, nothing to verify")
    else:
        print(
            f"{path}: {result.checked} rows verified; head {head.seq}:{head.hash} "
            "(keep it elsewhere and pass it back with --anchor to catch a full rewrite)"
        )
    return 0


def _audit_export(args: argparse.Namespace) -> int:

    events: Iterable[dict[str, Any]]
    if args.file is not None or args.data_dir is not None:
        events = _export_file(_audit_file(args), args.since)
    else:
        client = connect(args)
        events = _export_rpc(client, args.since)
    for event in events:
        print(json_line(event), flush=False)
    sys.stdout.flush()
    return 0


def _export_file(path: Path, since: datetime) -> Iterator[dict[str, Any]]:
    from rag_grpc.security.audit import AuditLog

    log = AuditLog(path)
    try:
        yield from log.export(since)
    finally:
        log.close()


def _export_rpc(client: Any, since: datetime) -> Iterator[dict[str, Any]]:
    with client:
        yield from client.audit_export(since)
