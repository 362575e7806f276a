"""Where the 32-byte key that encrypts backup archives comes from.

The default is the file the ``backup_key_file`` setting names (the settings
read ``RAG_GRPC_BACKUP_KEY_FILE`` into it); ``rag-grpc restore --key-file``
names one directly.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from rag_grpc.backup.format import KEY_BYTES, BackupError


class KeyProvider(Protocol):
    """Where backup keys come from (a file, a KMS, ...)."""

    def key(self) -> bytes | None:
        """The 32-byte key, or None when none is configured."""
        ...


class FileKeyProvider:
    """A key file: 32 raw bytes, or 64 hex characters, readable by its owner only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def key(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            mode = self.path.stat().st_mode
            raw = self.path.read_bytes()
        except OSError as exc:
            raise BackupError(f"cannot read the backup key file {self.path}: {exc}") from None
        # Like ssh with private keys: a key others can read is not secret.
        if mode & 0o077:
            raise BackupError(
                f"the backup key file {self.path} can be read by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); restrict it with `chmod 600 {self.path}`"
            )
        if len(raw) != KEY_BYTES:
            try:
                raw = bytes.fromhex(raw.decode().strip())
            except (UnicodeDecodeError, ValueError):
                raw = b""
        if len(raw) != KEY_BYTES:
            raise BackupError(
                f"the backup key file {self.path} must hold {KEY_BYTES} random bytes "
                f"(or {2 * KEY_BYTES} hex characters); make one with "
                f"`(umask 077; head -c {KEY_BYTES} /dev/urandom > FILE)`"
            )
        return raw


def default_key_provider(key_file: Path | None) -> FileKeyProvider:
    """The key file the ``backup_key_file`` setting names (the settings read
    RAG_GRPC_BACKUP_KEY_FILE into it), or no key."""
    return FileKeyProvider(key_file)


def environment_key_provider() -> FileKeyProvider:
    """For a command that loads no settings (``rag-grpc restore``): the file
    RAG_GRPC_BACKUP_KEY_FILE names, or no key."""
    path = os.environ.get("RAG_GRPC_BACKUP_KEY_FILE")
    return FileKeyProvider(Path(path) if path else None)
