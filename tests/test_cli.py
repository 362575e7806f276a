"""The rag-grpc command against a real server process."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import MODEL_DIR, ServerProcess, tool


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("rag-grpc"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def write_corpus(root: Path) -> Path:
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


def test_config_shows_effective_values_with_secrets_redacted(tmp_path: Path) -> None:
    config = tmp_path / "rag.toml"
    config.write_text('port = 6000\n[limits]\nmax_k = 42\n[server]\nauth_token = "s3cret-token"\n')
    shown = cli("config", "--config", str(config), env={"RAG_GRPC_PORT": "7000"})
    assert shown.returncode == 0, shown.stderr
    effective = json.loads(shown.stdout)
    assert effective["port"] == 7000  # the environment overrides the file
    assert effective["limits"]["max_k"] == 42
    assert effective["server"]["auth_token"] == "**********"
    assert "s3cret" not in shown.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_k = 0\nunknown_option = 1\n")
    rejected = cli("config", "--config", str(bad))
    assert rejected.returncode == 2
    assert "limits.max_k" in rejected.stderr and "unknown_option" in rejected.stderr
    env_bad = cli("config", env={"RAG_GRPC_SERVICES": "retrieval,teleport"})
    assert env_bad.returncode == 2 and "teleport" in env_bad.stderr


def test_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    result = cli(
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
        env={"RAG_GRPC_EMBEDDING__MODEL_DIR": str(tmp_path / "no-model")},
    )
    assert result.returncode == 2
    assert "not a prepared model directory" in result.stderr


def test_model_verify_detects_tampering(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for path in MODEL_DIR.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert cli("model", "verify", "--model-dir", str(copy)).returncode == 0
    with open(copy / "tokenizer.json", "ab") as fh:
        fh.write(b" ")
    tampered = cli("model", "verify", "--model-dir", str(copy))
    assert tampered.returncode == 2 and "does not match its sha256" in tampered.stderr


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
