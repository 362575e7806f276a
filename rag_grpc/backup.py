"""Snapshots, backup archives and restore.

An archive is a tar of the data dir at one point in time: ``rag.sqlite3``
made with SQLite's online backup API, the index files saved under the same
write locks (so they match the database's generation, or are rebuilt on
restore if not), and ``manifest.json`` with every member's size and sha256.

On disk and on the wire it is wrapped in a small envelope::

    b"RAGBACKUP" version(1) mode(1)  then
    mode 0 (plain):     sha256(tar)(32) tar
    mode 1 (AES-256-GCM): nonce(12) ciphertext+tag   (the 11 header bytes are the AAD)

so a tampered, truncated or wrongly keyed archive is refused before
anything is written, and the manifest catches a tampered member of a plain
archive too. The key is 32 random bytes from a `KeyProvider`; by default
the file named by ``RAG_GRPC_BACKUP_KEY_FILE`` (or the ``backup_key_file``
setting).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Protocol

from rag_grpc import __version__

MAGIC = b"RAGBACKUP"
VERSION = 1
PLAIN, AES_GCM = 0, 1
HEADER_LEN = len(MAGIC) + 2
KEY_BYTES = 32


class BackupError(Exception):
    """An archive or key that cannot be used, with what to do about it."""


class KeyProvider(Protocol):
    """Where backup keys come from (a file, a KMS, ...)."""

    def key(self) -> bytes | None:
        """The 32-byte key, or None when none is configured."""
        ...


class FileKeyProvider:
    """A key file: 32 raw bytes, or 64 hex characters."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def key(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise BackupError(f"cannot read the backup key file {self.path}: {exc}") from None
        if len(raw) != KEY_BYTES:
            try:
                raw = bytes.fromhex(raw.decode().strip())
            except (UnicodeDecodeError, ValueError):
                raw = b""
        if len(raw) != KEY_BYTES:
            raise BackupError(
                f"the backup key file {self.path} must hold {KEY_BYTES} random bytes "
                f"(or {2 * KEY_BYTES} hex characters); make one with "
                f"`head -c {KEY_BYTES} /dev/urandom > FILE`"
            )
        return raw


def default_key_provider(configured: Path | None = None) -> FileKeyProvider:
    """RAG_GRPC_BACKUP_KEY_FILE, else the configured file, else no key."""
    env = os.environ.get("RAG_GRPC_BACKUP_KEY_FILE")
    return FileKeyProvider(Path(env) if env else configured)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_archive(files: dict[str, Path], generations: dict[str, int]) -> bytes:
    """A tar of `files` (archive name -> path) with a manifest of checksums."""
    manifest = {
        "format": "rag-grpc-backup",
        "version": VERSION,
        "rag_grpc_version": __version__,
        "created_unix": time.time(),
        "generations": generations,
        "files": {},
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, path in sorted(files.items()):
            data = path.read_bytes()
            manifest["files"][name] = {"bytes": len(data), "sha256": sha256_bytes(data)}  # type: ignore[index]
            _add(tar, name, data)
        _add(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def seal(archive: bytes, key: bytes | None) -> bytes:
    """Wrap a tar in the envelope, encrypted when a key is given."""
    if key is None:
        header = MAGIC + bytes([VERSION, PLAIN])
        return header + hashlib.sha256(archive).digest() + archive
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = MAGIC + bytes([VERSION, AES_GCM])
    nonce = secrets.token_bytes(12)
    return header + nonce + AESGCM(key).encrypt(nonce, archive, header)


def is_encrypted(blob: bytes) -> bool:
    _check_header(blob)
    return blob[len(MAGIC) + 1] == AES_GCM


def unseal(blob: bytes, key: bytes | None) -> bytes:
    """The tar inside an envelope; BackupError if it is damaged or the key is wrong."""
    _check_header(blob)
    header, body = blob[:HEADER_LEN], blob[HEADER_LEN:]
    if header[-1] == PLAIN:
        digest, archive = body[:32], body[32:]
        if len(digest) < 32 or hashlib.sha256(archive).digest() != digest:
            raise BackupError("the archive is damaged or truncated (checksum mismatch)")
        return archive
    if key is None:
        raise BackupError(
            "the archive is encrypted: give its key with --key-file or RAG_GRPC_BACKUP_KEY_FILE"
        )
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(body) < 12 + 16:
        raise BackupError("the archive is truncated")
    try:
        return AESGCM(key).decrypt(body[:12], body[12:], header)
    except InvalidTag:
        raise BackupError(
            "the archive cannot be decrypted: wrong key, or the archive was damaged, "
            "truncated or tampered with"
        ) from None


def _check_header(blob: bytes) -> None:
    if len(blob) < HEADER_LEN or not blob.startswith(MAGIC):
        raise BackupError("not a rag-grpc backup archive (or truncated before its header)")
    if blob[len(MAGIC)] != VERSION:
        raise BackupError(
            f"archive format version {blob[len(MAGIC)]}; this rag-grpc reads {VERSION}"
        )
    if blob[len(MAGIC) + 1] not in (PLAIN, AES_GCM):
        raise BackupError("unknown archive encryption mode")


def verified_members(archive: bytes) -> tuple[dict[str, object], dict[str, bytes]]:
    """(manifest, name -> bytes) after checking every member against the manifest."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
            members = {}
            for info in tar.getmembers():
                if not info.isfile() or info.name.startswith("/") or ".." in Path(info.name).parts:
                    raise BackupError(f"the archive holds an unexpected entry {info.name!r}")
                handle = tar.extractfile(info)
                assert handle is not None
                members[info.name] = handle.read()
    except (tarfile.TarError, EOFError) as exc:
        raise BackupError(f"the archive is damaged: {exc}") from None
    try:
        manifest = json.loads(members.pop("manifest.json"))
        files = dict(manifest["files"])
    except (KeyError, ValueError, TypeError):
        raise BackupError("the archive has no readable manifest") from None
    if set(files) != set(members):
        raise BackupError("the archive's members differ from its manifest")
    for name, data in members.items():
        if sha256_bytes(data) != files[name]["sha256"]:
            raise BackupError(f"{name} in the archive does not match its checksum (tampered?)")
    return manifest, members


def restore(blob: bytes, data_dir: Path, key: bytes | None) -> dict[str, object]:
    """Unpack an archive into an empty (or missing) data dir; return its manifest.

    Everything is checked first and written to a temporary directory that is
    renamed into place, so a refused archive leaves nothing behind.
    """
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty; restore into a new data directory")
    manifest, members = verified_members(unseal(blob, key))
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir.parent))
    try:
        for name, data in members.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        # A quick integrity check of the database itself.
        conn = sqlite3.connect(staging / "rag.sqlite3")
        try:
            if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise BackupError("the database in the archive fails SQLite's integrity check")
        finally:
            conn.close()
        if data_dir.exists():
            data_dir.rmdir()
        staging.rename(data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
