"""Helpers for tests that run the `rag-grpc` command: the command as a
process, and a small corpus of document files to ingest with it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import tool


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `rag-grpc ARGS` with the environment plus ``env``; output captured as text."""
    return subprocess.run(
        [tool("rag-grpc"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def write_corpus(root: Path) -> Path:
    """Four documents under ``root/corpus``: a JSON Lines file of two, a .md and a .txt."""
    corpus = root / "corpus"
    (corpus / "notes").mkdir(parents=True)
    records = [
        {
            "id": "kiwi",
            "text": "The kiwi is a flightless bird native to New Zealand.",
            "metadata": {"kind": "animal"},
        },
        {
            "id": "fjord",
            "text": "A fjord is a long, narrow inlet with steep sides, carved by a glacier.",
            "metadata": {"kind": "landform"},
        },
    ]
    (corpus / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (corpus / "notes" / "bread.md").write_text(
        "# Bread\n\nSourdough is leavened with a culture of wild yeast and lactic acid bacteria.\n"
    )
    (corpus / "notes" / "tides.txt").write_text(
        "Tides are caused by the gravitational pull of the Moon and the Sun on the oceans.\n"
    )
    return corpus
