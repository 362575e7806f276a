"""Restore (rag_grpc/backup/restore.py) trusts nothing in an archive: forged
members, manifests and tar headers (extract.py) and forged databases
(checks.py) are refused, and a refused archive writes nothing; an index that
does not load is dropped and rebuilt from the database (checks.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.backup import (
    BackupError,
    archive_stream,
    restore,
    seal,
    unseal,
    verified_members,
)
from rag_grpc.client import RagClient
from tests.backup.conftest import genuine_database, results
from tests.cli.command import cli
from tests.conftest import CORPUS, ServerProcess, ServerThread

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
