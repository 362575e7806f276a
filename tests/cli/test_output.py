"""What the commands print (rag_grpc/cli/output.py): the progress bar on a
terminal, and text from the server with its control characters escaped."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.cli.command import cli, write_corpus
from tests.conftest import ServerProcess, tool

# Every test runs the rag-grpc command (most against `rag-grpc serve`) as a process.
pytestmark = pytest.mark.slow


def test_ingest_shows_a_progress_bar_on_a_terminal(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    import pty

    proc = server_process()
    corpus = write_corpus(tmp_path)
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [tool("rag-grpc"), "ingest", str(corpus), "--target", proc.target],
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    output = b""
    while True:
        try:
            block = os.read(leader, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not block:
            break
        output += block
    assert child.wait(timeout=60) == 0
    os.close(leader)
    text = output.decode(errors="replace")
    assert "ingesting" in text and "4/4" in text and "docs/s" in text and "ETA" in text
    assert "\x1b[" in text  # drawn with terminal control sequences, unlike piped output
    assert "ingested 4 of 4 documents" in text
    proc.stop()


def test_output_from_the_server_is_printed_with_controls_escaped(
    server_process: Callable[..., ServerProcess],
) -> None:
    proc = server_process()
    target = ("--target", proc.target)
    # Ids with controls are refused on write; texts and metadata values are data.
    text = "Lava \x1b[31mflows\x1b[0m from the volcano\u202e at night.\nSecond line\x9b2J."
    note = "\x1b]0;owned\x07 set the title, \u2066isolate\u2069"
    with RagClient(proc.target) as client:
        client.upsert([Document("lava", text, {"note": note})])

    def unsafe(output: str) -> list[str]:
        return [c for c in output if c in "\x1b\x07\x9b\u202e\u2066\u2069"]

    got = cli("get", "lava", *target)
    assert got.returncode == 0, got.stderr
    assert unsafe(got.stdout) == []
    assert "\\u001b[31mflows" in got.stdout and "\\u202e" in got.stdout
    assert "\nSecond line" in got.stdout  # a text keeps its lines
    as_json = cli("get", "lava", "--json", *target)
    assert unsafe(as_json.stdout) == []
    assert json.loads(as_json.stdout)[0]["metadata"] == {"note": note}  # JSON decodes to the data
    assert json.loads(as_json.stdout)[0]["text"] == text
    for command in (
        ("search", "volcano lava"),
        ("search", "volcano lava", "--json"),
        ("ask", "What flows from the volcano?"),
        ("ask", "What flows from the volcano?", "--json"),
    ):
        result = cli(*command, *target)
        assert result.returncode == 0, result.stderr
        assert "flows" in result.stdout, command
        assert unsafe(result.stdout) == [], command
    # Error messages from the server: the metadata key is echoed back.
    bad_filter = cli(
        "search",
        "x",
        "--filter",
        '{"field": {"key": "\\u001b[2Jk\\u202e", "equals": {"stringValue": "v"}}}',
        *target,
    )
    assert bad_filter.returncode in (1, 2), bad_filter.stderr
    assert unsafe(bad_filter.stderr) == []
    proc.stop()
