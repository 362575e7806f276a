"""The envelope around an archive (rag_grpc/backup/envelope.py): tampered,
truncated, wrongly keyed or foreign archives are refused; chunked encryption
catches cut, reordered, dropped and appended chunks; archives stream both ways
in bounded memory; version 1 archives still restore."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.backup import (
    MAGIC,
    BackupError,
    Sealer,
    archive_stream,
    restore,
    unseal,
)
from rag_grpc.client import RagClient
from tests.backup.conftest import genuine_database, results
from tests.cli.command import cli
from tests.conftest import CORPUS, ServerThread


@pytest.mark.slow
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
    wrong.chmod(0o600)
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
    short.chmod(0o600)
    bad_key = cli(
        "restore", str(archive), "--data-dir", str(tmp_path / "k"), "--key-file", str(short)
    )
    assert bad_key.returncode == 2 and "32 random bytes" in bad_key.stderr


def sealed_chunks(data: bytes, key: bytes, chunk_bytes: int) -> tuple[bytes, list[bytes]]:
    """An encrypted envelope of data split as sent: (header, sealed chunks)."""
    sealer = Sealer(key, chunk_bytes)
    body = sealer.update(data) + sealer.finish()
    step = chunk_bytes + 16
    return sealer.header, [body[i : i + step] for i in range(0, len(body), step)]


def test_chunked_encryption_catches_cut_reordered_dropped_and_appended_chunks() -> None:
    key, data = os.urandom(32), random.Random(1).randbytes(1000)
    header, chunks = sealed_chunks(data, key, 64)
    assert len(chunks) == 16 and b"".join(chunks[:-1]).find(data[:64]) == -1
    assert unseal(header + b"".join(chunks), key) == data
    cases = {
        "cut at a chunk boundary": chunks[:-1],
        "cut inside a chunk": [*chunks[:-1], chunks[-1][:-1]],
        "two chunks swapped": [chunks[1], chunks[0], *chunks[2:]],
        "a chunk dropped": [chunks[0], *chunks[2:]],
        "a chunk repeated": [chunks[0], *chunks],
        "bytes appended": [*chunks, b"\0" * 16],
        "a chunk from another archive": [*chunks[:-1], sealed_chunks(data, key, 64)[1][-1]],
    }
    for name, body in cases.items():
        with pytest.raises(BackupError, match="cannot be decrypted"):
            unseal(header + b"".join(body), key)
            pytest.fail(name)
    # The header (chunk size, nonce prefix) is authenticated too.
    changed = bytearray(header)
    changed[-1] ^= 1
    with pytest.raises(BackupError, match="cannot be decrypted"):
        unseal(bytes(changed) + b"".join(chunks), key)
    # An exact multiple of the chunk size still ends in a chunk marked last.
    header, chunks = sealed_chunks(data[:640], key, 64)
    assert len(chunks) == 10 and unseal(header + b"".join(chunks), key) == data[:640]
    with pytest.raises(BackupError, match="cannot be decrypted"):
        unseal(header + b"".join(chunks[:-1]), key)


def test_archives_stream_and_restore_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    db = tmp_path / "source" / "rag.sqlite3"
    db.parent.mkdir()
    db.write_bytes(genuine_database(tmp_path))
    with db.open("ab") as fh:  # 12 MiB of free pages: bigger than any buffer
        fh.write(bytes(12 << 20))
    key = os.urandom(32)
    pieces = archive_stream({"rag.sqlite3": db}, {"default": 1}, key)
    # Lazy: nothing is read before the caller asks.
    header = next(pieces)
    assert header.startswith(MAGIC)
    archive = tmp_path / "big.rag"
    tracemalloc.start()
    try:
        with archive.open("wb") as out:
            out.write(header)
            sizes = [out.write(piece) for piece in pieces]
        sending = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        restored = restore(archive, tmp_path / "restored", key)
        restoring = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(sizes) >= 12 and max(sizes) <= (1 << 20) + 16
    # A few chunks in flight, never the archive (12 MiB) or a member.
    assert sending < 6 << 20 and restoring < 6 << 20, (sending, restoring)
    assert restored.files == ["rag.sqlite3"]
    assert (tmp_path / "restored" / "rag.sqlite3").read_bytes() == db.read_bytes()


@pytest.mark.slow
def test_version_1_archives_still_restore(
    start_server: Callable[..., ServerThread], tmp_path: Path, key: Path
) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    server = start_server(tmp_path / "live")
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        before = results(client)
        tar = unseal(b"".join(c.data for c in client.snapshot(unencrypted=True)), None)
    header, nonce = MAGIC + bytes([1, 1]), os.urandom(12)
    old = tmp_path / "v1.rag"
    old.write_bytes(header + nonce + AESGCM(key.read_bytes()).encrypt(nonce, tar, header))
    done = cli("restore", str(old), "--data-dir", str(tmp_path / "r"), "--key-file", str(key))
    assert done.returncode == 0, done.stderr
    copy = start_server(tmp_path / "r")
    with RagClient(copy.target) as client:
        assert results(client) == before
