"""Snapshots, backup archives and restore: consistent while serving, streamed
and encrypted chunk by chunk (AES-256-GCM, STREAM), refused clearly when
tampered, truncated, reordered, wrongly keyed or forged, and never trusted:
members allow-listed, database checked, indexes loaded or rebuilt."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import sqlite3
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from rag_grpc.backup import (
    MAGIC,
    BackupError,
    Sealer,
    archive_stream,
    default_key_provider,
    environment_key_provider,
    is_encrypted,
    restore,
    seal,
    unseal,
    verified_members,
)
from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from rag_grpc.store.sqlite import DocumentStore
from tests.cli.test_cli import cli
from tests.conftest import CORPUS, ServerProcess, ServerThread

QUERIES = ["an erupting mountain", "a game with a king and a queen", "making coffee"]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "backup.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def results(client: RagClient) -> list[list[tuple[str, float]]]:
    return [[(h.chunk_id, round(h.score, 4)) for h in client.search(q, k=3)] for q in QUERIES]


@pytest.mark.slow
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
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    restored = tmp_path / "restored"
    done = cli("restore", str(archive), "--data-dir", str(restored), "--key-file", str(key))
    assert done.returncode == 0, done.stderr
    # Private to its owner: the data dir and everything in it.
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    for path in restored.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]
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
        # The lexical index came with the database, checked against its chunks.
        words = client.search("glaciers valleys", namespace="geo", k=1, mode="lexical")
        assert [h.document_id for h in words] == ["extra"]


@pytest.mark.slow
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
    assert "rag.sqlite3" in members and manifest["generations"]["default"] >= 1
    # A member changed inside the plain archive: the manifest catches it.
    blob = bytearray(archive.read_bytes())
    at = blob.find(b"SQLite format 3")
    blob[at + 200] ^= 0xFF
    with pytest.raises(BackupError, match="checksum"):
        restore(bytes(blob), tmp_path / "x", None)
    assert not (tmp_path / "x").exists()
    ok = cli("restore", str(archive), "--data-dir", str(tmp_path / "plain-restored"), env=env)
    assert ok.returncode == 0, ok.stderr


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


# -- the envelope ----------------------------------------------------------------


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


# -- keys ------------------------------------------------------------------------


@pytest.mark.slow
def test_restore_refuses_a_plain_archive_where_a_key_is_configured(
    start_server: Callable[..., ServerThread], tmp_path: Path, key: Path
) -> None:
    server = start_server(tmp_path / "live")
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:2])
    archive = tmp_path / "plain.rag"
    env = {"RAG_GRPC_BACKUP_KEY_FILE": ""}
    made = cli("backup", "--target", server.target, "--out", str(archive), "--unencrypted", env=env)
    assert made.returncode == 0, made.stderr
    keyed = {"RAG_GRPC_BACKUP_KEY_FILE": str(key)}
    refused = cli("restore", str(archive), "--data-dir", str(tmp_path / "a"), env=keyed)
    assert refused.returncode == 2 and "not encrypted" in refused.stderr, refused.stderr
    assert "--allow-unencrypted" in refused.stderr and not (tmp_path / "a").exists()
    allowed = cli(
        "restore", str(archive), "--data-dir", str(tmp_path / "a"), "--allow-unencrypted", env=keyed
    )
    assert allowed.returncode == 0 and "UNENCRYPTED" in allowed.stdout, allowed.stderr


@pytest.mark.slow
def test_a_key_file_others_can_read_is_refused(
    start_server: Callable[..., ServerThread], tmp_path: Path, key: Path
) -> None:
    server = start_server(tmp_path / "live", backup_key_file=key)
    archive = tmp_path / "backup.rag"
    assert cli("backup", "--target", server.target, "--out", str(archive)).returncode == 0
    key.chmod(0o640)
    refused = cli("backup", "--target", server.target, "--out", str(tmp_path / "again.rag"))
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    assert "chmod 600" in refused.stderr, refused.stderr
    target = tmp_path / "restored"
    bad = cli("restore", str(archive), "--data-dir", str(target), "--key-file", str(key))
    assert bad.returncode == 2 and "group or others" in bad.stderr and not target.exists()
    key.chmod(0o600)
    ok = cli("restore", str(archive), "--data-dir", str(target), "--key-file", str(key))
    assert ok.returncode == 0, ok.stderr


def test_the_default_key_provider_reads_the_setting_not_the_environment(
    tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_GRPC_BACKUP_KEY_FILE", str(key))
    # The setting decides; the variable only reaches it through Settings.
    assert default_key_provider(None).key() is None
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    assert default_key_provider(other).key() == other.read_bytes()
    # A command that loads no settings (`rag-grpc restore`) reads the variable itself.
    assert environment_key_provider().key() == key.read_bytes()
    monkeypatch.setenv("RAG_GRPC_BACKUP_KEY_FILE", "")
    assert environment_key_provider().key() is None


# -- forged archives -------------------------------------------------------------


def genuine_database(tmp_path: Path) -> bytes:
    path = tmp_path / "genuine" / "rag.sqlite3"
    path.parent.mkdir()
    DocumentStore(path).close()
    return path.read_bytes()


Entry = tuple[str, bytes] | tarfile.TarInfo


def forge(
    entries: list[Entry], *, listed: dict[str, object] | None = None, gz: bool = False
) -> bytes:
    """A plain archive as a forger makes it: any members, a manifest recomputed
    to list every regular one (or `listed`), and a valid envelope checksum."""
    buffer = io.BytesIO()
    files: dict[str, object] = {}
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            name, data = entry
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = json.dumps({"generations": {}, "files": files if listed is None else listed})
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest.encode()))
    data = buffer.getvalue()
    return seal(gzip.compress(data) if gz else data, None)


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_forged_archives_are_refused_and_write_nothing(tmp_path: Path) -> None:
    db = genuine_database(tmp_path)
    sql = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(sql)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()
    not_ours = sql.read_bytes()
    trap = tmp_path / "trap.sqlite3"
    trap.write_bytes(db)
    conn = sqlite3.connect(trap)
    conn.execute("CREATE TRIGGER t AFTER INSERT ON documents BEGIN DELETE FROM chunks; END")
    conn.commit()
    conn.close()  # checkpoints the WAL into the file
    trapped = trap.read_bytes()
    # Look-alikes of the lexical index: a trigger under its name doing
    # something else, and index entries no chunk backs.
    lookalike = tmp_path / "lookalike.sqlite3"
    lookalike.write_bytes(db)
    conn = sqlite3.connect(lookalike)
    conn.execute("DROP TRIGGER chunk_words_insert")
    conn.execute(
        "CREATE TRIGGER chunk_words_insert AFTER INSERT ON chunks BEGIN DELETE FROM documents; END"
    )
    conn.commit()
    conn.close()
    forged_words = tmp_path / "words.sqlite3"
    forged_words.write_bytes(db)
    conn = sqlite3.connect(forged_words)
    conn.execute("INSERT INTO chunk_words (rowid, text) VALUES (999, 'words of no chunk')")
    conn.commit()
    conn.close()
    huge_pax = tarfile.TarInfo("index/default.json")
    huge_pax.pax_headers = {"comment": "x" * (1 << 20)}
    cases: dict[str, tuple[bytes, str]] = {
        "parent path": (forge([("rag.sqlite3", db), ("../escape", b"x")]), "unexpected member"),
        "absolute path": (forge([("rag.sqlite3", db), ("/tmp/x.json", b"x")]), "unexpected"),
        "traversal in index": (
            forge([("rag.sqlite3", db), ("index/../../e.json", b"{}")]),
            "unexpected",
        ),
        "dots namespace": (forge([("rag.sqlite3", db), ("index/...hnsw", b"x")]), "unexpected"),
        "dot namespace": (forge([("rag.sqlite3", db), ("index/..json", b"{}")]), "unexpected"),
        "nested": (forge([("rag.sqlite3", db), ("index/a/b.json", b"{}")]), "unexpected"),
        "other file": (forge([("rag.sqlite3", db), ("notes.txt", b"x")]), "unexpected"),
        "directory": (
            forge([("rag.sqlite3", db), special("index", tarfile.DIRTYPE)]),
            "unexpected",
        ),
        "symlink": (
            forge([special("rag.sqlite3", tarfile.SYMTYPE, "/etc/passwd")]),
            "not a regular",
        ),
        "hard link": (
            forge([("rag.sqlite3", db), special("index/a.json", tarfile.LNKTYPE, "rag.sqlite3")]),
            "not a regular file",
        ),
        "device": (forge([special("rag.sqlite3", tarfile.CHRTYPE)]), "not a regular file"),
        "duplicate": (forge([("rag.sqlite3", db), ("rag.sqlite3", db)]), "twice"),
        "no database": (forge([("index/a.json", b"{}")]), "holds no rag.sqlite3"),
        "unlisted member": (
            forge([("rag.sqlite3", db), ("index/a.json", b"{}")], listed={}),
            "differ from its manifest",
        ),
        "wrong checksum": (
            forge([("rag.sqlite3", db)], listed={"rag.sqlite3": {"bytes": len(db), "sha256": "0"}}),
            "checksum",
        ),
        "compressed": (forge([("rag.sqlite3", db)], gz=True), "tar is damaged"),
        "huge tar header": (forge([("rag.sqlite3", db), huge_pax]), "oversized tar header"),
        "huge small member": (
            forge([("rag.sqlite3", db), ("index/a.json", b" " * ((1 << 20) + 1))]),
            "over the 1048576-byte limit",
        ),
        "not a database": (
            forge([("rag.sqlite3", b"SQLite format 3\0" + b"\xff" * 4096)]),
            "database in the archive",
        ),
        "someone else's database": (forge([("rag.sqlite3", not_ours)]), "not a rag-grpc database"),
        "a trigger": (forge([("rag.sqlite3", trapped)]), "never makes"),
        "a look-alike trigger": (forge([("rag.sqlite3", lookalike.read_bytes())]), "never makes"),
        "forged words": (forge([("rag.sqlite3", forged_words.read_bytes())]), "disagrees"),
    }
    for name, (blob, message) in cases.items():
        parent = tmp_path / "cases" / name.replace(" ", "-").replace("'", "")
        parent.mkdir(parents=True)
        with pytest.raises(BackupError, match=message):
            restore(blob, parent / "data", None)
            pytest.fail(name)
        assert list(parent.iterdir()) == [], name
    assert not (tmp_path / "cases" / "escape").exists()
    # Over the total cap: refused while unsealing, before any member is read.
    with pytest.raises(BackupError, match="restore limit"):
        restore(forge([("rag.sqlite3", db)]), tmp_path / "capped", None, max_bytes=len(db) // 2)
    assert not (tmp_path / "capped").exists()
    # The same helper makes an archive that restores: the refusals above are
    # about what each case changed.
    done = restore(forge([("rag.sqlite3", db)]), tmp_path / "fine", None)
    assert done.files == ["rag.sqlite3"] and (tmp_path / "fine" / "rag.sqlite3").read_bytes() == db


@pytest.mark.slow
def test_a_forged_index_is_dropped_and_rebuilt_from_the_database(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = start_server(tmp_path / "live")
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        before = results(client)
        blob = b"".join(c.data for c in client.snapshot(unencrypted=True))
    manifest, members = verified_members(unseal(blob, None))
    # Garbage where the graph was, with its checksum and size recomputed so
    # that only the native loader's own checks stand in the way.
    garbage = random.Random(3).randbytes(len(members["index/default.hnsw"]))
    members["index/default.hnsw"] = garbage
    meta = json.loads(members["index/default.hnsw.meta.json"])
    meta.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    members["index/default.hnsw.meta.json"] = json.dumps(meta).encode()
    staged = tmp_path / "forged"
    files = {}
    for name, data in members.items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(data)
        files[name] = staged / name
    archive = tmp_path / "forged.rag"
    archive.write_bytes(b"".join(archive_stream(files, manifest["generations"], None)))
    # In child processes: a crash in native code fails the test, not pytest.
    restored = tmp_path / "restored"
    done = cli(
        "restore", str(archive), "--data-dir", str(restored), env={"RAG_GRPC_BACKUP_KEY_FILE": ""}
    )
    assert done.returncode == 0, done.stderr
    assert "index of namespace 'default' dropped" in done.stdout, done.stdout
    assert not list((restored / "index").glob("default*"))
    copy = ServerProcess(restored)
    try:
        with RagClient(copy.target) as client:
            assert results(client) == before
    finally:
        assert copy.stop() == 0


# -- the service -----------------------------------------------------------------


def test_one_snapshot_at_a_time_and_a_cancelled_one_cleans_up(
    start_server: Callable[..., ServerThread], tmp_path: Path, key: Path
) -> None:
    data = tmp_path / "live"
    server = start_server(data, backup_key_file=key)
    with RagClient(server.target) as client:
        client.upsert(CORPUS[:2])
    retriever = server.server.retriever
    assert retriever is not None
    copy, entered, release = retriever.snapshot, threading.Event(), threading.Event()

    def held_copy(out_dir: Path) -> tuple[dict[str, Path], dict[str, int]]:
        # The first snapshot waits here, inside the server, until released.
        entered.set()
        release.wait(30)
        return copy(out_dir)

    retriever.snapshot = held_copy  # type: ignore[method-assign]
    first: list[bytes] = []
    with RagClient(server.target, timeout=60) as one, RagClient(server.target) as two:
        taking = threading.Thread(target=lambda: first.extend(c.data for c in one.snapshot()))
        taking.start()
        assert entered.wait(30)
        with pytest.raises(RpcError) as info:
            list(two.snapshot())
        assert info.value.code == "RESOURCE_EXHAUSTED" and "already" in info.value.message
        release.set()
        taking.join(60)
    assert first and is_encrypted(b"".join(first))
    # A caller that goes away mid-copy: the copy is removed, the slot freed.
    entered.clear()
    release.clear()
    channel = grpc.insecure_channel(server.target)
    call = admin_service_pb2_grpc.AdminServiceStub(channel).Snapshot(admin_pb2.SnapshotRequest())
    assert entered.wait(30)
    call.cancel()
    channel.close()
    release.set()
    retriever.snapshot = copy  # type: ignore[method-assign]
    with RagClient(server.target) as client:
        for _ in range(100):
            try:
                assert is_encrypted(b"".join(c.data for c in client.snapshot()))
                break
            except RpcError as exc:
                assert exc.code == "RESOURCE_EXHAUSTED"
                threading.Event().wait(0.1)
        else:
            pytest.fail("the cancelled snapshot never freed its slot")
    assert not list(data.glob(".snapshot-*"))
