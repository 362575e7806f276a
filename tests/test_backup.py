"""Snapshots, backup archives and restore: consistent while serving, encrypted
with AES-256-GCM, and refused clearly when tampered, truncated or wrongly keyed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.backup import BackupError, is_encrypted, restore, unseal, verified_members
from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.conftest import CORPUS, ServerThread
from tests.test_cli import cli

QUERIES = ["an erupting mountain", "a game with a king and a queen", "making coffee"]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    path.write_bytes(os.urandom(32))
    return path


def results(client: RagClient) -> list[list[tuple[str, float]]]:
    return [[(h.chunk_id, round(h.score, 4)) for h in client.search(q, k=3)] for q in QUERIES]


def test_backup_while_serving_then_restore_gives_the_same_results(
    start_server: Callable[..., ServerThread], tmp_path: Path, key: Path
) -> None:
    server = start_server(tmp_path / "live", backup_key_file=key)
    archive = tmp_path / "backup.rag"
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        client.upsert([Document("extra", "Glaciers carve valleys into mountains.", {})], "geo")
        before = results(client)
        # Writes keep coming while the snapshot is taken.
        stop, started = threading.Event(), threading.Event()

        def write() -> None:
            with RagClient(server.target) as writer:
                i = 0
                while not stop.is_set():
                    writer.upsert([Document(f"busy-{i}", f"busy note number {i}", {})], "busy")
                    started.set()
                    i += 1

        writer = threading.Thread(target=write)
        writer.start()
        assert started.wait(30)
        try:
            made = cli("backup", "--target", server.target, "--out", str(archive))
        finally:
            stop.set()
            writer.join(30)
    assert made.returncode == 0, made.stderr
    assert "encrypted (AES-256-GCM)" in made.stdout
    blob = archive.read_bytes()
    assert is_encrypted(blob) and b"volcano" not in blob
    restored = tmp_path / "restored"
    done = cli("restore", str(archive), "--data-dir", str(restored), "--key-file", str(key))
    assert done.returncode == 0, done.stderr
    copy = start_server(restored)
    with RagClient(copy.target) as client:
        assert results(client) == before
        namespaces = {ns.name: ns for ns in client.stats().namespaces}
        assert namespaces["geo"].documents == 1
        # The busy namespace is a consistent point in time: every stored
        # document is searchable, nothing half-written.
        busy = namespaces["busy"]
        assert busy.documents == busy.chunks == busy.vectors
        hits = client.search("busy note number 0", namespace="busy", k=1)
        assert hits and hits[0].document_id == "busy-0"


def test_without_a_key_backup_refuses_unless_told(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = start_server(tmp_path / "live")
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:2])
    archive = tmp_path / "plain.rag"
    env = {"RAG_GRPC_BACKUP_KEY_FILE": ""}
    refused = cli("backup", "--target", server.target, "--out", str(archive), env=env)
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    assert "RAG_GRPC_BACKUP_KEY_FILE" in refused.stderr and not archive.exists()
    made = cli("backup", "--target", server.target, "--out", str(archive), "--unencrypted", env=env)
    assert made.returncode == 0 and "UNENCRYPTED" in made.stdout
    manifest, members = verified_members(unseal(archive.read_bytes(), None))
    assert "rag.sqlite3" in members and manifest["generations"]["default"] >= 1  # type: ignore[index]
    # A member changed inside the plain archive: the manifest catches it.
    blob = bytearray(archive.read_bytes())
    at = blob.find(b"SQLite format 3")
    blob[at + 200] ^= 0xFF
    with pytest.raises(BackupError, match="checksum"):
        restore(bytes(blob), tmp_path / "x", None)
    assert not (tmp_path / "x").exists()
    ok = cli("restore", str(archive), "--data-dir", str(tmp_path / "plain-restored"), env=env)
    assert ok.returncode == 0, ok.stderr


def test_tampered_truncated_or_wrongly_keyed_archives_are_refused(
    start_server: Callable[..., ServerThread], tmp_path: Path, key: Path
) -> None:
    server = start_server(tmp_path / "live", backup_key_file=key)
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:2])
    archive = tmp_path / "backup.rag"
    assert cli("backup", "--target", server.target, "--out", str(archive)).returncode == 0
    blob = archive.read_bytes()
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 0x01
    cases = {
        "wrong key": (blob, wrong, "cannot be decrypted"),
        "tampered": (bytes(tampered), key, "cannot be decrypted"),
        "truncated": (blob[: len(blob) // 3], key, "cannot be decrypted"),
        "not an archive": (b"hello", key, "not a rag-grpc backup"),
        "no key": (blob, None, "encrypted: give its key"),
    }
    for name, (data, key_file, message) in cases.items():
        path = tmp_path / f"{name}.rag"
        path.write_bytes(data)
        target = tmp_path / f"restore-{name}"
        args = ["restore", str(path), "--data-dir", str(target)]
        if key_file is not None:
            args += ["--key-file", str(key_file)]
        result = cli(*args, env={"RAG_GRPC_BACKUP_KEY_FILE": ""})
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert not target.exists(), name
    # A data dir in use is never overwritten.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "rag.sqlite3").write_bytes(b"precious")
    result = cli("restore", str(archive), "--data-dir", str(busy), "--key-file", str(key))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (busy / "rag.sqlite3").read_bytes() == b"precious"
    short = tmp_path / "short.key"
    short.write_bytes(b"too short")
    bad_key = cli(
        "restore", str(archive), "--data-dir", str(tmp_path / "k"), "--key-file", str(short)
    )
    assert bad_key.returncode == 2 and "32 random bytes" in bad_key.stderr
