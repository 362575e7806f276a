"""Restore: an archive (a file, a stream or bytes) into a new data dir.

Restore trusts nothing in an archive: the envelope is checked in full
before the tar is parsed (envelope.py), members are allow-listed by name and
type, sizes are capped, every member must match the manifest (extract.py),
the database must pass SQLite's integrity check and hold our tables, and
each index must load, one that does not being dropped and rebuilt from the
database at start (checks.py). All of it happens in a staging directory
renamed into place at the end.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rag_grpc.backup.checks import check_database, check_indexes
from rag_grpc.backup.envelope import Envelope, unseal_to
from rag_grpc.backup.extract import extract_archive, fsync_dir
from rag_grpc.backup.format import DATABASE, DEFAULT_MAX_RESTORE_BYTES, BackupError


@dataclass(frozen=True)
class Restored:
    """A finished restore: the archive's manifest, and the indexes dropped
    (namespace -> reason) that the server will rebuild from the database."""

    manifest: dict[str, Any]
    encrypted: bool
    rebuilt_indexes: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest["files"])

    @property
    def generations(self) -> dict[str, int]:
        return dict(self.manifest["generations"])


def restore(
    source: bytes | Path | IO[bytes],
    data_dir: Path,
    key: bytes | None,
    *,
    allow_unencrypted: bool = False,
    max_bytes: int = DEFAULT_MAX_RESTORE_BYTES,
) -> Restored:
    """Unpack an archive (a file, a stream or bytes) into an empty or
    missing data dir. Everything is checked in a staging directory beside
    it that is renamed into place at the end, so a refused archive leaves
    nothing behind."""
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise BackupError(f"{data_dir} is not empty; restore into a new data directory")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, Path):
        try:
            size = source.stat().st_size
            free = shutil.disk_usage(data_dir.parent).free
        except OSError as exc:
            raise BackupError(f"cannot read {source}: {exc}") from None
        # The checked tar and the unpacked files are on disk together.
        if 2 * size > free:
            raise BackupError(
                f"restoring {source} ({size} bytes) needs about {2 * size} bytes free in "
                f"{data_dir.parent}; {free} are"
            )
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=data_dir.parent))
    try:
        tar_path = staging / "archive.tar"
        fd = os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            envelope = _unseal_from(source, out, key, allow_unencrypted, max_bytes)
        unpacked = staging / "data"
        manifest = extract_archive(tar_path, unpacked, max_bytes)
        tar_path.unlink()
        check_database(unpacked / DATABASE)
        rebuilt = check_indexes(unpacked / "index")
        if data_dir.exists():
            data_dir.rmdir()
        os.rename(unpacked, data_dir)
        fsync_dir(data_dir.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Restored(manifest, envelope.encrypted, rebuilt)


def _unseal_from(
    source: bytes | Path | IO[bytes],
    out: IO[bytes],
    key: bytes | None,
    allow_unencrypted: bool,
    max_bytes: int,
) -> Envelope:
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, Path):
        try:
            handle = source.open("rb")
        except OSError as exc:
            raise BackupError(f"cannot read {source}: {exc}") from None
        with handle:
            return unseal_to(
                handle, out, key, allow_unencrypted=allow_unencrypted, max_bytes=max_bytes
            )
    return unseal_to(source, out, key, allow_unencrypted=allow_unencrypted, max_bytes=max_bytes)
