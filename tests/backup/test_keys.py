"""Where the backup key comes from and what is refused without one
(rag_grpc/backup/keys.py): no backup without a key unless told, no plain
archive restored where a key is configured unless allowed, no key file others
can read, and the setting (not the environment) decides in a server."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.backup import (
    BackupError,
    default_key_provider,
    environment_key_provider,
    restore,
    unseal,
    verified_members,
)
from rag_grpc.client import RagClient
from tests.cli.command import cli
from tests.conftest import CORPUS, ServerThread


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
