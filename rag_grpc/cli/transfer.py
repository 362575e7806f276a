"""The commands that move data through a server: ``rag-grpc ingest``
(document files in, as ingestion jobs) and ``backup`` (an archive out)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rag_grpc.cli.connection import client_command, connect
from rag_grpc.cli.documents import DocumentFileError, read_documents
from rag_grpc.cli.output import Progress, UsageError, shown


def add_ingest(sub: Any) -> None:
    """The ingest command."""
    ingest = client_command(sub, "ingest", "ingest JSON Lines, .txt and .md files or directories")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--batch", type=int, default=500, help="documents per ingestion job")
    ingest.set_defaults(func=_ingest)


def add_backup(sub: Any) -> None:
    """The backup command."""
    backup = client_command(sub, "backup", "write a consistent backup archive of a running server")
    backup.add_argument("--out", type=Path, required=True, help="archive file to write")
    backup.add_argument(
        "--unencrypted",
        action="store_true",
        help="accept an unencrypted archive when the server has no backup key",
    )
    # The deadline covers the whole stream, so a backup gets hours, not a minute.
    backup.set_defaults(func=_backup, timeout=6 * 3600.0)


def _ingest(args: argparse.Namespace) -> int:
    try:
        documents = list(read_documents(args.paths))
    except DocumentFileError as exc:
        raise UsageError(str(exc)) from None
    if not documents:
        raise UsageError("no documents found in the given paths")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    started = time.monotonic()
    errors: list[tuple[str, str]] = []
    chunks = 0
    with connect(args) as client:
        job_ids = [
            client.submit(documents[i : i + args.batch], namespace=args.namespace)
            for i in range(0, len(documents), args.batch)
        ]
        progress = Progress(len(documents), interactive=sys.stdout.isatty())
        done_before = 0
        for job_id in job_ids:
            last = None
            for job in client.watch_job(job_id):
                progress.update(done_before + job.processed)
                last = job
            assert last is not None
            done_before += last.total
            chunks += last.chunks
            errors.extend(last.errors)
        progress.close()
    elapsed = time.monotonic() - started
    stored = len(documents) - len(errors)
    print(
        f"ingested {stored} of {len(documents)} documents ({chunks} chunks) in {elapsed:.1f} s "
        f"({len(documents) / max(elapsed, 1e-9):.1f} docs/s)"
    )
    for doc_id, message in errors:
        print(f"rag-grpc: failed: {shown(doc_id)}: {shown(message)}", file=sys.stderr)
    return 1 if errors else 0


def _backup(args: argparse.Namespace) -> int:
    import hashlib
    import tempfile

    digest = hashlib.sha256()
    size = 0
    last = None
    out_dir = args.out.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with connect(args) as client:
        # mkstemp: created 0600; renamed over --out only once complete.
        fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in client.snapshot(unencrypted=args.unencrypted):
                    if chunk.data:
                        fh.write(chunk.data)
                        digest.update(chunk.data)
                        size += len(chunk.data)
                    if chunk.sha256:
                        last = chunk
                fh.flush()
                os.fsync(fh.fileno())
            if last is None or last.sha256 != digest.hexdigest() or last.total_bytes != size:
                raise UsageError("the archive arrived incomplete or damaged; try again")
            os.replace(tmp, args.out)
            # The rename itself is durable only once the directory is synced.
            dir_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    kind = "encrypted (AES-256-GCM)" if last.encrypted else "UNENCRYPTED"
    print(f"wrote {args.out}: {size} bytes, {kind}, sha256 {shown(last.sha256)}")
    return 0
