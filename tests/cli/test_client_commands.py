"""The commands that query a server (rag_grpc/cli/client_commands.py): search,
ask and get against a real server process, and the exit status and message of
a failed call."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.command import cli, write_corpus
from tests.conftest import ServerProcess

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def test_ingest_search_ask_get(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc = server_process()
    target = ("--target", proc.target)
    corpus = write_corpus(tmp_path)

    ingested = cli("ingest", str(corpus), *target)
    assert ingested.returncode == 0, ingested.stderr
    assert "ingested 4 of 4 documents" in ingested.stdout
    assert "docs/s" in ingested.stdout

    found = cli("search", "bird that cannot fly", "-k", "2", "--json", *target)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert len(hits) == 2
    assert {"document_id", "chunk_id", "score", "text"} <= hits[0].keys()
    assert hits[0]["document_id"] == "kiwi" and hits[0]["chunk_id"] == "kiwi#0"

    plain = cli("search", "what makes sourdough rise", *target)
    assert plain.returncode == 0 and "notes/bread.md#0" in plain.stdout.splitlines()[0]

    filtered = cli(
        "search",
        "bird",
        "--json",
        "--filter",
        '{"field": {"key": "kind", "equals": {"stringValue": "landform"}}}',
        *target,
    )
    assert [h["document_id"] for h in json.loads(filtered.stdout)] == ["fjord"]

    asked = cli("ask", "What causes tides?", "--json", *target)
    assert asked.returncode == 0, asked.stderr
    messages = [json.loads(line) for line in asked.stdout.splitlines()]
    assert "citations" in messages[0]
    assert messages[0]["citations"][0]["document_id"] == "notes/tides.txt"
    assert all("delta" in m for m in messages[1:-1]) and len(messages) > 3
    assert "Moon" in "".join(m["delta"] for m in messages[1:-1])
    assert {"usage", "timings"} <= messages[-1].keys()
    assert messages[-1]["usage"]["completion_tokens"] > 0

    streamed = cli("ask", "What causes tides?", *target)
    assert "Moon" in streamed.stdout and "extractive" in streamed.stdout
    assert "notes/tides.txt#0" in streamed.stdout

    got = cli("get", "kiwi", "fjord", "--json", *target)
    assert got.returncode == 0
    assert [d["id"] for d in json.loads(got.stdout)] == ["kiwi", "fjord"]
    assert json.loads(got.stdout)[0]["metadata"] == {"kind": "animal"}

    partly = cli("get", "kiwi", "nope", "--json", *target)
    assert partly.returncode != 0
    assert [d["id"] for d in json.loads(partly.stdout)] == ["kiwi"]
    assert "nope" in partly.stderr
    proc.stop()


def test_client_errors_exit_nonzero_with_status(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc = server_process()
    target = ("--target", proc.target)
    missing_ns = cli("search", "x", "--namespace", "ghost", *target)
    assert missing_ns.returncode == 1
    assert missing_ns.stderr.startswith("rag-grpc: NOT_FOUND: namespace 'ghost' does not exist")
    empty = cli("search", "x", "--json", *target)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []  # fresh server: no hits
    bad_k = cli("search", "x", "-k", "5000", *target)
    assert bad_k.returncode == 1 and "INVALID_ARGUMENT" in bad_k.stderr
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    ingest = cli("ingest", str(bad_line), *target)
    assert ingest.returncode == 2 and "bad.jsonl:2" in ingest.stderr
    proc.stop()
    down = cli("search", "x", "--target", proc.target, "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
