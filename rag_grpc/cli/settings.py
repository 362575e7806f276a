"""The settings a command runs with: the files, the environment, and the
command's flags on top, loaded once; and the process set-up that goes with
them (logging, private files)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from rag_grpc.config import Settings, load_settings


def command_settings(args: argparse.Namespace) -> Settings:
    """The configuration (--config, --env overlay, environment variables)
    with the command's flags on top.

    The flags are one nested mapping of what was given: pydantic-settings
    merges it into the files' and the environment's values table by table,
    field by field, so `--triton-url` keeps the file's triton.model."""
    flag = _flags(args)
    overrides = {
        "host": flag("host"),
        "port": flag("port"),
        "data_dir": flag("data_dir"),
        "services": flag("services"),
        "remote": {
            "retrieval_target": flag("retrieval_target") or None,
            "generation_target": flag("generation_target") or None,
        },
        "server": {
            "tls_cert": flag("tls_cert"),
            "tls_key": flag("tls_key"),
            "tls_client_ca": flag("tls_client_ca"),
        },
        "auth": {
            "policy_file": flag("policy"),
            "insecure_no_auth": flag("insecure_no_auth"),
        },
        "generation": {
            "generator": flag("generator") or None,
            "triton": {"url": flag("triton_url") or None, "model": flag("triton_model") or None},
        },
        "embedding": {
            "model_dir": flag("model_dir") or None,
            "export_dir": flag("export_dir") or None,
        },
    }
    return load_settings(flag("config"), env=flag("env"), **_given(overrides))


def _flags(args: argparse.Namespace) -> Any:
    """A flag's value, None where this command has no such flag."""
    return lambda name: getattr(args, name, None)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """values without the flags not given (None) and the tables left empty."""
    given: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _given(value) or None
        if value is not None:
            given[key] = value
    return given


def configure_logging(settings: Settings) -> None:
    """Log to stderr, as JSON lines where logging.json_format says so."""
    from rag_grpc.telemetry import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if settings.logging.json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=settings.logging.level, handlers=[handler])


def private_files() -> None:
    """Files this process creates from now on are its user's alone.

    The store makes rag.sqlite3 (and SQLite its -wal/-shm) 0600 itself, but
    the index files are written by native code and the model exports by ONNX
    tooling, both with the process umask (0644 under the usual 022): a umask
    at process start covers every file, including ones added later."""
    os.umask(0o077)
