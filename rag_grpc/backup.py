"""Snapshots, backup archives and restore.

An archive is a tar of the data dir at one point in time: ``rag.sqlite3``
made with SQLite's online backup API, the index files saved under the same
write locks, and, last, ``manifest.json`` with every member's size and
sha256. Nothing else is a valid member.

On disk and on the wire the tar is wrapped in an envelope that is written
and read as a stream, so neither side ever holds the archive in memory.
Version 2 (written now)::

    plain:     b"RAGBACKUP" 2 0   tar   sha256(header + tar)
    encrypted: b"RAGBACKUP" 2 1 chunk_size(u32) nonce_prefix(7)
               then chunks: AES-256-GCM(chunk of chunk_size bytes, the last
               one shorter or equal), nonce = prefix || counter(u32) ||
               last(1), the whole header as associated data

The encrypted form is the STREAM construction (Hoang, Reyhanitabar, Rogaway,
Vizár 2015): every chunk is authenticated on its own, the counter in the
nonce catches reordered or dropped chunks, and the last-chunk flag catches
an archive cut at a chunk boundary. Version 1 (one AES-GCM or one sha256
over the whole tar) is still read, streaming too, so older backups restore.

Restore trusts nothing in an archive: the envelope is checked in full
before the tar is parsed, members are allow-listed by name and type, sizes
are capped, every member must match the manifest, the database must pass
SQLite's integrity check and hold our tables, and each index must load
(one that does not is dropped and rebuilt from the database at start).
The key is 32 random bytes from a `KeyProvider`; by default the file named
by ``RAG_GRPC_BACKUP_KEY_FILE`` (or the ``backup_key_file`` setting).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from rag_grpc import __version__
from rag_grpc.documents import resolve_namespace
from rag_grpc.errors import InvalidArgument
from rag_grpc.store import lexical

MAGIC = b"RAGBACKUP"
VERSION = 2
PLAIN, AES_GCM = 0, 1
HEADER_LEN = len(MAGIC) + 2
KEY_BYTES = 32
# Plaintext per sealed chunk: large enough that the 16-byte tags and the
# per-chunk call cost vanish, small enough to be one gRPC message.
CHUNK_BYTES = 1 << 20
# A reader accepts larger chunks from another writer, up to this (memory bound).
MAX_CHUNK_BYTES = 16 << 20
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
# The default restore cap: an archive that unpacks to more is refused
# (raise it with `rag-grpc restore --max-bytes`).
DEFAULT_MAX_RESTORE_BYTES = 64 << 30
# Small members; a larger one is refused whatever the total cap.
MAX_MANIFEST_BYTES = 16 << 20
MAX_SMALL_MEMBER_BYTES = 1 << 20
# Ours are a few hundred bytes; a bigger pax or GNU long-name header would
# be read into memory by tarfile before we saw its member.
MAX_EXTENDED_HEADER_BYTES = 64 << 10
# tarfile keeps every member's header in memory: bound how many there are.
MAX_NAMESPACES = 10_000
DATABASE = "rag.sqlite3"
MANIFEST = "manifest.json"
INDEX_SUFFIXES = (".hnsw.meta.json", ".hnsw", ".json")
# A tenant's namespaces are stored as "<tenant>~<name>"; resolve_namespace
# checks the name this lets through.
_INDEX_MEMBER = re.compile(r"^index/([A-Za-z0-9_.~-]{1,128})(\.hnsw\.meta\.json|\.hnsw|\.json)$")
# The tables every rag-grpc database has had since the first release; a
# database without them is not ours.
REQUIRED_TABLES = frozenset({"namespaces", "documents", "chunks", "metadata"})


class BackupError(Exception):
    """An archive or key that cannot be used, with what to do about it."""


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


def default_key_provider(configured: Path | None = None) -> FileKeyProvider:
    """RAG_GRPC_BACKUP_KEY_FILE, else the configured file, else no key."""
    env = os.environ.get("RAG_GRPC_BACKUP_KEY_FILE")
    return FileKeyProvider(Path(env) if env else configured)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- writing -----------------------------------------------------------------


class Sealer:
    """Turns a tar byte stream into a version 2 envelope, chunk by chunk."""

    def __init__(self, key: bytes | None, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.encrypted = key is not None
        self._chunk = chunk_bytes
        self._pending = bytearray()
        self._counter = 0
        if key is None:
            self.header = MAGIC + bytes([VERSION, PLAIN])
            self._digest = hashlib.sha256(self.header)
            return
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._prefix = secrets.token_bytes(NONCE_PREFIX_BYTES)
        self.header = (
            MAGIC + bytes([VERSION, AES_GCM]) + chunk_bytes.to_bytes(4, "big") + self._prefix
        )

    def update(self, data: bytes) -> bytes:
        """Sealed bytes ready to send (possibly none yet)."""
        if not self.encrypted:
            self._digest.update(data)
            return data
        self._pending += data
        sealed, start = [], 0
        # Keep at least one byte back: only finish() knows which chunk is last.
        with memoryview(self._pending) as view:  # no copies of the plaintext
            while len(view) - start > self._chunk:
                sealed.append(self._seal(view[start : start + self._chunk], last=False))
                start += self._chunk
        del self._pending[:start]
        return b"".join(sealed)

    def finish(self) -> bytes:
        """The rest: the last chunk, or the plain form's checksum."""
        if not self.encrypted:
            return self._digest.digest()
        return self._seal(bytes(self._pending), last=True)

    def _seal(self, chunk: bytes | memoryview, *, last: bool) -> bytes:
        nonce = _chunk_nonce(self._prefix, self._counter, last)
        self._counter += 1
        return bytes(self._aead.encrypt(nonce, chunk, self.header))


def _chunk_nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= 1 << 32:
        raise BackupError("the archive is too large for its chunk size")
    return prefix + counter.to_bytes(4, "big") + bytes([1 if last else 0])


def archive_stream(
    files: dict[str, Path],
    generations: dict[str, int],
    key: bytes | None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> Generator[bytes, None, None]:
    """The envelope of a tar of `files` (archive name -> path) and its
    manifest, as pieces of about `chunk_bytes`; reads each file once."""
    sealer = Sealer(key, chunk_bytes)
    yield sealer.header
    for piece in _tar_pieces(files, generations, chunk_bytes):
        sealed = sealer.update(piece)
        if sealed:
            yield sealed
    yield sealer.finish()


def _tar_pieces(
    files: dict[str, Path], generations: dict[str, int], chunk_bytes: int
) -> Iterator[bytes]:
    # Written by hand from TarInfo.tobuf() (not TarFile) so the archive can
    # be produced lazily, a piece at a time, as the client reads it.
    listed: dict[str, dict[str, object]] = {}
    for name, path in sorted(files.items()):
        size = path.stat().st_size
        yield _tar_header(name, size)
        digest, done = hashlib.sha256(), 0
        with path.open("rb") as fh:
            while block := fh.read(chunk_bytes):
                digest.update(block)
                done += len(block)
                yield block
        if done != size:
            raise BackupError(f"{name} changed while it was archived")
        yield _tar_padding(size)
        listed[name] = {"bytes": size, "sha256": digest.hexdigest()}
    manifest = json.dumps(
        {
            "format": "rag-grpc-backup",
            "version": VERSION,
            "rag_grpc_version": __version__,
            "created_unix": time.time(),
            "generations": generations,
            "files": listed,
        },
        indent=2,
    ).encode()
    yield _tar_header(MANIFEST, len(manifest)) + manifest + _tar_padding(len(manifest))
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end of archive


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o600
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_padding(size: int) -> bytes:
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


class SnapshotArchive:
    """A consistent copy of a server's data, sent as an archive stream.

    open() makes the copy in a private directory under `work_dir` (the
    snapshot callable holds the write locks for the copy only); next_piece()
    reads and seals about one chunk at a time, so memory stays flat whatever
    the data size; close() removes the copy. The steps are serialised, so a
    close() from another thread (a cancelled call) waits for the step in
    progress instead of deleting files under it.
    """

    def __init__(
        self,
        snapshot: Callable[[Path], tuple[dict[str, Path], dict[str, int]]],
        work_dir: Path,
        key: bytes | None,
    ) -> None:
        self.snapshot = snapshot
        self.work_dir = work_dir
        self.key = key
        self.size = 0
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self._copy: Path | None = None
        self._pieces: Generator[bytes, None, None] | None = None

    def open(self) -> None:
        with self._lock:
            # Beside the data it copies: the same disk, not a RAM-backed /tmp.
            self._copy = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=self.work_dir))
            files, generations = self.snapshot(self._copy)
            self._pieces = archive_stream(files, generations, self.key)

    def next_piece(self) -> bytes | None:
        """The next piece of the envelope, or None after the last."""
        with self._lock:
            assert self._pieces is not None, "open() first"
            piece = next(self._pieces, None)
            if piece is not None:
                self._digest.update(piece)
                self.size += len(piece)
            return piece

    @property
    def sha256(self) -> str:
        """Of the whole envelope, once next_piece() has returned None."""
        return self._digest.hexdigest()

    def close(self) -> None:
        with self._lock:
            if self._pieces is not None:
                self._pieces.close()  # closes the file being read
            if self._copy is not None:
                shutil.rmtree(self._copy, ignore_errors=True)
                self._copy = None


def seal(archive: bytes, key: bytes | None) -> bytes:
    """Wrap a whole tar held in memory in the envelope (tests, small tools)."""
    sealer = Sealer(key)
    return sealer.header + sealer.update(archive) + sealer.finish()


# -- reading the envelope ----------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """What the envelope said: format version, and whether it was encrypted."""

    version: int
    encrypted: bool


def is_encrypted(blob: bytes) -> bool:
    _, mode = _parse_header(blob[:HEADER_LEN])
    return mode == AES_GCM


def _parse_header(head: bytes) -> tuple[int, int]:
    if len(head) < HEADER_LEN or not head.startswith(MAGIC):
        raise BackupError("not a rag-grpc backup archive (or truncated before its header)")
    version, mode = head[len(MAGIC)], head[len(MAGIC) + 1]
    if version not in (1, 2):
        raise BackupError(
            f"archive format version {version}; this rag-grpc ({__version__}) reads 1 and 2"
        )
    if mode not in (PLAIN, AES_GCM):
        raise BackupError("unknown archive encryption mode")
    return version, mode


def unseal_to(
    source: IO[bytes],
    out: IO[bytes],
    key: bytes | None,
    *,
    allow_unencrypted: bool = False,
    max_bytes: int = DEFAULT_MAX_RESTORE_BYTES,
) -> Envelope:
    """Check the envelope read from `source` and write the tar inside to
    `out`. Only once this returns is the tar authentic; a BackupError says
    it is damaged, truncated, too large, wrongly keyed or not allowed."""
    head = _read_exact(source, HEADER_LEN)
    version, mode = _parse_header(head)
    if mode == PLAIN and key is not None and not allow_unencrypted:
        # Anyone can forge a plain archive (its checksum is no signature);
        # where backups are encrypted, a plain one is a red flag.
        raise BackupError(
            "the archive is not encrypted but a backup key is configured, so it may not come "
            "from this deployment; if you trust it, restore with --allow-unencrypted"
        )
    if mode == AES_GCM and key is None:
        raise BackupError(
            "the archive is encrypted: give its key with --key-file or RAG_GRPC_BACKUP_KEY_FILE"
        )
    sink = _CappedSink(out, max_bytes)
    if mode == PLAIN:
        _read_plain(source, sink, head, version)
    elif version == 1:
        assert key is not None
        _read_v1_encrypted(source, sink, head, key)
    else:
        assert key is not None
        _read_v2_encrypted(source, sink, head, key)
    out.flush()
    return Envelope(version, mode == AES_GCM)


class _CappedSink:
    def __init__(self, out: IO[bytes], max_bytes: int) -> None:
        self.out = out
        self.max_bytes = max_bytes
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.max_bytes:
            raise BackupError(
                f"the archive unpacks to more than {self.max_bytes} bytes, the restore limit; "
                "if it is genuine, raise the limit with --max-bytes"
            )
        self.out.write(data)


def _read_exact(source: IO[bytes], n: int) -> bytes:
    first = source.read(n)
    if len(first) == n or not first:  # the usual case, without a copy
        return first
    data = bytearray(first)
    while len(data) < n:
        block = source.read(n - len(data))
        if not block:
            break
        data += block
    return bytes(data)


class _Trailed:
    """The blocks of a stream but its last `size` bytes, which are kept in
    `trailer` once the blocks run out (shorter if the stream was)."""

    def __init__(self, source: IO[bytes], size: int) -> None:
        self.source = source
        self.size = size
        self.trailer = b""

    def __iter__(self) -> Iterator[bytes]:
        held = b""
        while block := self.source.read(CHUNK_BYTES):
            held += block
            if len(held) > self.size:
                yield held[: -self.size]
                held = held[-self.size :]
        self.trailer = held


def _read_plain(source: IO[bytes], sink: _CappedSink, head: bytes, version: int) -> None:
    if version == 1:
        expected = _read_exact(source, 32)
        digest = hashlib.sha256()
        body: Iterator[bytes] | _Trailed = iter(lambda: source.read(CHUNK_BYTES), b"")
    else:
        digest = hashlib.sha256(head)
        body = _Trailed(source, 32)
    for block in body:
        digest.update(block)
        sink.write(block)
    if isinstance(body, _Trailed):
        expected = body.trailer
    if len(expected) < 32 or digest.digest() != expected:
        raise BackupError("the archive is damaged or truncated (checksum mismatch)")


def _undecryptable() -> BackupError:
    return BackupError(
        "the archive cannot be decrypted: wrong key, or the archive was damaged, "
        "truncated or tampered with"
    )


def _read_v1_encrypted(source: IO[bytes], sink: _CappedSink, head: bytes, key: bytes) -> None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    nonce = _read_exact(source, 12)
    if len(nonce) < 12:
        raise _undecryptable()
    # One GCM over the whole tar: decrypt as a stream and check the tag (its
    # last 16 bytes) at the end; the caller parses nothing before that.
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    decryptor.authenticate_additional_data(head)
    body = _Trailed(source, TAG_BYTES)
    for block in body:
        sink.write(decryptor.update(block))
    if len(body.trailer) < TAG_BYTES:
        raise _undecryptable()
    try:
        sink.write(decryptor.finalize_with_tag(body.trailer))
    except InvalidTag:
        raise _undecryptable() from None


def _read_v2_encrypted(source: IO[bytes], sink: _CappedSink, head: bytes, key: bytes) -> None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    rest = _read_exact(source, 4 + NONCE_PREFIX_BYTES)
    if len(rest) < 4 + NONCE_PREFIX_BYTES:
        raise BackupError("the archive is truncated (in its header)")
    chunk_bytes = int.from_bytes(rest[:4], "big")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise BackupError(f"the archive's chunk size {chunk_bytes} is not allowed (damaged?)")
    header, prefix = head + rest, rest[4:]
    aead = AESGCM(key)
    sealed_len = chunk_bytes + TAG_BYTES
    counter = 0
    current = _read_exact(source, sealed_len)
    while True:
        # A chunk is the last one exactly when nothing follows it; the flag
        # in its nonce must agree, so a cut or an appendix fails the tag.
        following = _read_exact(source, sealed_len) if len(current) == sealed_len else b""
        last = not following
        if len(current) < TAG_BYTES:
            raise _undecryptable()
        try:
            plain = aead.decrypt(_chunk_nonce(prefix, counter, last), current, header)
        except InvalidTag:
            raise _undecryptable() from None
        sink.write(plain)
        if last:
            return
        counter += 1
        current = following


# -- reading the tar ---------------------------------------------------------


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


def member_namespace(name: str) -> str | None:
    """The namespace of an index member's name; None for the database and
    the manifest; BackupError for any name the format does not define."""
    if name in (DATABASE, MANIFEST):
        return None
    match = _INDEX_MEMBER.match(name)
    namespace = match.group(1) if match else ""
    try:
        valid = bool(match) and resolve_namespace(namespace) == namespace
    except InvalidArgument:
        valid = False
    # "." and ".." pass the namespace pattern but must never name a file.
    if not valid or not namespace.strip("."):
        raise BackupError(
            f"the archive holds an unexpected member {name[:120]!r}; a rag-grpc archive holds "
            f"only {MANIFEST}, {DATABASE} and index/<namespace>{{{','.join(INDEX_SUFFIXES)}}}"
        )
    return namespace


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
    _fsync_dir(dest / "index")
    _fsync_dir(dest)
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


def check_database(path: Path) -> None:
    """SQLite's integrity check, and our tables (a database, but not ours, is refused)."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise BackupError(f"the database in the archive cannot be opened: {exc}") from None
    try:
        # The database is untrusted until checked: no SQL functions from its
        # schema, and page damage found rather than followed.
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA cell_size_check = ON")
        result = conn.execute("PRAGMA integrity_check").fetchone()
        if not result or result[0] != "ok":
            raise BackupError(
                f"the database in the archive fails SQLite's integrity check: {result}"
            )
        objects = conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    except sqlite3.Error as exc:
        raise BackupError(f"the database in the archive is damaged: {exc}") from None
    finally:
        conn.close()
    tables = {name for kind, name, _ in objects if kind == "table"}
    if not tables >= REQUIRED_TABLES:
        raise BackupError(
            "the database in the archive is not a rag-grpc database (it lacks the tables "
            f"{sorted(REQUIRED_TABLES - tables)})"
        )
    # We create tables and indexes, and the lexical index (virtual table, view,
    # triggers) exactly as lexical.SCHEMA writes it; another trigger, view or
    # virtual table in a restored database would run its SQL or module on our
    # reads and writes.
    ours = lexical.definitions()
    foreign = sorted(
        f"{kind} {name}"
        for kind, name, sql in objects
        if not (
            kind == "index"
            or (kind == "table" and not (sql or "").upper().startswith("CREATE VIRTUAL"))
            or ours.get(name) == sql
        )
    )
    if foreign:
        raise BackupError(
            f"the database in the archive holds objects rag-grpc never makes: {foreign}"
        )
    if lexical.TABLE in tables:
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA trusted_schema = OFF")
                lexical.check_integrity(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise BackupError(
                f"the database's lexical index disagrees with its chunks: {exc}"
            ) from None


def check_indexes(index_dir: Path) -> dict[str, str]:
    """Load each restored index; drop the files of every namespace whose
    index is incomplete or does not load (the server rebuilds it from the
    database at start). Returns namespace -> why it was dropped."""
    from rag_grpc.native import VectorIndex

    namespaces: dict[str, list[Path]] = {}
    for path in sorted(index_dir.iterdir()) if index_dir.is_dir() else []:
        namespace = member_namespace(f"index/{path.name}")
        assert namespace is not None
        namespaces.setdefault(namespace, []).append(path)
    dropped: dict[str, str] = {}
    for namespace, paths in namespaces.items():
        graph, graph_meta, meta = (
            index_dir / f"{namespace}{s}" for s in (".hnsw", ".hnsw.meta.json", ".json")
        )
        try:
            if not (graph.is_file() and graph_meta.is_file() and meta.is_file()):
                raise ValueError("its index files are incomplete")
            saved = json.loads(meta.read_text())
            if not isinstance(saved, dict) or not isinstance(saved.get("last_label"), int):
                raise ValueError(f"{meta.name} does not say which rows the index holds")
            # Structural checks happen in load(); the int8 codes are not needed here.
            VectorIndex.load(graph, quantized=False)
        except (ValueError, UnicodeDecodeError) as exc:
            dropped[namespace] = str(exc)
            for path in paths:
                path.unlink()
    if dropped:
        _fsync_dir(index_dir)
    return dropped


def _fsync_dir(path: Path) -> None:
    if not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- restore -----------------------------------------------------------------


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
        _fsync_dir(data_dir.parent)
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


def unseal(blob: bytes, key: bytes | None) -> bytes:
    """The tar inside an envelope held in memory (tests, small tools)."""
    out = io.BytesIO()
    unseal_to(io.BytesIO(blob), out, key, allow_unencrypted=True)
    return out.getvalue()


def verified_members(archive: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest, name -> bytes) of a tar held in memory, through the same
    checks as restore (tests, small tools)."""
    with tempfile.TemporaryDirectory(prefix="rag-archive-") as tmp:
        tar_path = Path(tmp) / "archive.tar"
        tar_path.write_bytes(archive)
        manifest = extract_archive(tar_path, Path(tmp) / "data", len(archive))
        members = {name: (Path(tmp) / "data" / name).read_bytes() for name in manifest["files"]}
    return manifest, members
