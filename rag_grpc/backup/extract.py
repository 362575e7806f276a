"""Reading an archive's tar, once its envelope has been checked: members
allow-listed by name and type, sizes capped (also those of tar's own
extended headers), files written without following links and fsynced, and
every member matched against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any

from rag_grpc.backup.format import (
    CHUNK_BYTES,
    DATABASE,
    MANIFEST,
    MAX_EXTENDED_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_NAMESPACES,
    MAX_SMALL_MEMBER_BYTES,
    BackupError,
    member_namespace,
)


class _StrictTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile reads them into memory, extended headers
    larger than ours could be, and GNU sparse members (never ours)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # _proc_member is tarfile's documented hook for TarInfo subclasses.
        extended = (
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        )
        if self.type in extended and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise BackupError(f"the archive has an oversized tar header ({self.size} bytes)")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BackupError(f"the archive holds a sparse member {self.name!r}; not ours")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _member_limit(name: str, max_bytes: int) -> int:
    if name == MANIFEST:
        return MAX_MANIFEST_BYTES
    if name.endswith(".json"):
        return MAX_SMALL_MEMBER_BYTES
    return max_bytes


def extract_archive(tar_path: Path, dest: Path, max_bytes: int) -> dict[str, Any]:
    """Stream the members of an authentic tar into the new directory
    `dest` (0700, files 0600, fsynced) and check them against the
    manifest; return the manifest. BackupError on anything unexpected."""
    dest.mkdir(mode=0o700)
    written: dict[str, tuple[int, str]] = {}
    manifest_bytes: bytes | None = None
    try:
        # "r:": a plain tar only; never transparently decompressed.
        with tarfile.open(tar_path, mode="r:", tarinfo=_StrictTarInfo) as tar:
            for info in tar:
                name = info.name
                member_namespace(name)
                if name in written or (name == MANIFEST and manifest_bytes is not None):
                    raise BackupError(f"the archive holds {name!r} twice")
                if len(written) > 1 + 3 * MAX_NAMESPACES:
                    raise BackupError("the archive holds too many members")
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise BackupError(f"{name!r} in the archive is not a regular file")
                limit = _member_limit(name, max_bytes)
                if info.size > limit:
                    raise BackupError(
                        f"{name!r} in the archive is {info.size} bytes, over the {limit}-byte "
                        "limit for it"
                    )
                handle = tar.extractfile(info)
                assert handle is not None  # a regular file always has one
                if name == MANIFEST:
                    manifest_bytes = handle.read()
                else:
                    written[name] = _write_member(handle, dest / name, info.size)
    except (tarfile.TarError, EOFError) as exc:
        raise BackupError(f"the archive's tar is damaged: {exc}") from None
    fsync_dir(dest / "index")
    fsync_dir(dest)
    return _check_manifest(manifest_bytes, written)


def _write_member(handle: IO[bytes], target: Path, size: int) -> tuple[int, str]:
    target.parent.mkdir(mode=0o700, exist_ok=True)
    # O_EXCL and O_NOFOLLOW: never through a link, never over a file.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    digest, done = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as out:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
            done += len(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if done != size:
        raise BackupError(f"{target.name} in the archive is truncated")
    return done, digest.hexdigest()


def _check_manifest(raw: bytes | None, written: dict[str, tuple[int, str]]) -> dict[str, Any]:
    try:
        manifest = json.loads(raw or b"")
        files = manifest["files"]
        listed = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise BackupError("the archive has no readable manifest") from None
    if not isinstance(manifest.get("generations"), dict):
        raise BackupError("the archive's manifest has no generations")
    if set(listed) != set(written):
        extra, missing = set(written) - set(listed), set(listed) - set(written)
        raise BackupError(
            f"the archive's members differ from its manifest (not listed: {sorted(extra)[:5]}, "
            f"missing: {sorted(missing)[:5]})"
        )
    for name, (size, digest) in written.items():
        if listed[name] != (size, digest):
            raise BackupError(f"{name} in the archive does not match its checksum (tampered?)")
    if DATABASE not in written:
        raise BackupError(f"the archive holds no {DATABASE}")
    return dict(manifest)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the names just written in it survive a crash."""
    if not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verified_members(archive: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, name -> bytes) of a tar held in memory, through the same
    checks as restore (tests, small tools)."""
    with tempfile.TemporaryDirectory(prefix="rag-archive-") as tmp:
        tar_path = Path(tmp) / "archive.tar"
        tar_path.write_bytes(archive)
        manifest = extract_archive(tar_path, Path(tmp) / "data", len(archive))
        members = {name: (Path(tmp) / "data" / name).read_bytes() for name in manifest["files"]}
    return manifest, members
