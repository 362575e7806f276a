"""Taking a backup (rag_grpc/backup/snapshot.py) while the server serves and
writes: the archive restores to the same answers and a consistent point in
time; one snapshot at a time, and a cancelled one cleans up after itself."""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from rag_grpc.backup import (
    is_encrypted,
)
from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from tests.backup.conftest import results
from tests.cli.command import cli
from tests.conftest import CORPUS, ServerThread


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
