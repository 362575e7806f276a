"""Commands on a data directory no server is using: ``rag-grpc restore``
(a backup archive into an empty one) and ``compact``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rag_grpc.cli.output import UsageError, shown
from rag_grpc.cli.settings import command_settings, private_files


def add_restore(sub: Any) -> None:
    """The restore command."""
    restore = sub.add_parser("restore", help="restore a backup archive into an empty data dir")
    restore.add_argument("archive", type=Path)
    restore.add_argument("--data-dir", type=Path, required=True)
    restore.add_argument(
        "--key-file", type=Path, help="the archive's key (default $RAG_GRPC_BACKUP_KEY_FILE)"
    )
    restore.add_argument(
        "--allow-unencrypted",
        action="store_true",
        help="accept an unencrypted archive even though a backup key is configured",
    )
    restore.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="refuse an archive that unpacks to more than this (default 64 GiB)",
    )
    restore.set_defaults(func=_restore)


def add_compact(sub: Any) -> None:
    """The compact command."""
    compact = sub.add_parser(
        "compact",
        help="reclaim deleted vectors and database space in a data dir no server is using",
    )
    compact.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    compact.add_argument("--config", type=Path, help="TOML configuration file")
    compact.add_argument("--namespace", help="only this namespace (default: all)")
    compact.set_defaults(func=_compact)


def _restore(args: argparse.Namespace) -> int:
    from rag_grpc.backup import (
        DEFAULT_MAX_RESTORE_BYTES,
        BackupError,
        FileKeyProvider,
        environment_key_provider,
        restore,
    )

    # restore loads no settings: the key is --key-file or the variable.
    provider = FileKeyProvider(args.key_file) if args.key_file else environment_key_provider()
    try:
        restored = restore(
            args.archive,
            args.data_dir,
            provider.key(),
            allow_unencrypted=args.allow_unencrypted,
            max_bytes=args.max_bytes or DEFAULT_MAX_RESTORE_BYTES,
        )
    except BackupError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # no space, no permission: nothing was put in place
        raise UsageError(f"restore into {args.data_dir} failed: {exc}") from None
    kind = "encrypted" if restored.encrypted else "UNENCRYPTED"
    print(
        f"restored {len(restored.files)} files from a {kind} archive into {args.data_dir} "
        f"(generations {restored.generations})"
    )
    for namespace, reason in sorted(restored.rebuilt_indexes.items()):
        print(
            f"index of namespace {namespace!r} dropped ({reason}); the server rebuilds it from "
            "the database at start"
        )
    return 0


def _compact(args: argparse.Namespace) -> int:
    from rag_grpc.embed.chunking import TokenChunker
    from rag_grpc.embed.loader import load_encoder
    from rag_grpc.embed.model_files import ModelFilesError
    from rag_grpc.errors import RagError
    from rag_grpc.index.retriever import Retriever
    from rag_grpc.store.sqlite import DocumentStore

    private_files()
    settings = command_settings(args)
    database = settings.data_dir / "rag.sqlite3"
    if not database.is_file():
        raise UsageError(f"{database} does not exist: nothing to compact in {settings.data_dir}")
    _refuse_if_in_use(database)
    bytes_before = _database_bytes(database)
    try:
        # The index is rebuilt from the stored vectors; the model is loaded
        # only for what the server would check too (dimension, tokenizer).
        encoder = load_encoder(settings.embedding, settings.data_dir)
    except ModelFilesError as exc:
        raise UsageError(str(exc)) from None
    store = DocumentStore(database)
    try:
        chunker = TokenChunker(
            encoder.spec.tokenizer, settings.chunking.chunk_tokens, settings.chunking.overlap_tokens
        )
        retriever = Retriever(
            store, encoder, chunker, settings.data_dir / "index", settings.index, settings.limits
        )
        try:
            slots = retriever.compact(args.namespace or None)
        except RagError as exc:
            raise UsageError(str(exc)) from None
        retriever.save_indexes()
    finally:
        store.close()
    for namespace, (before, after) in sorted(slots.items()):
        print(f"{shown(namespace)}: index slots {before} -> {after}")
    print(f"database: {bytes_before} -> {_database_bytes(database)} bytes")
    return 0


def _refuse_if_in_use(database: Path) -> None:
    """UsageError when another process has the database open (a server).

    Compacting under a running server would rewrite index files it goes on
    using and saves over at stop. SQLite grants exclusive locking mode on a
    WAL database only while no other connection has it open, idle ones
    included, so this asks SQLite rather than guessing from files."""
    import sqlite3

    conn = sqlite3.connect(database, timeout=0.5, isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("COMMIT")
    except sqlite3.OperationalError:
        raise UsageError(
            f"{database} is in use by another process (a running server?): stop it, then "
            "compact; a running server compacts by itself (index.compact_deleted_fraction)"
        ) from None
    finally:
        conn.close()


def _database_bytes(database: Path) -> int:
    """The database and its write-ahead log, as they take space on disk."""
    wal = database.with_name(database.name + "-wal")
    return database.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
