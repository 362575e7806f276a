"""The envelope around an archive's tar, written and read as a stream so
neither side ever holds the archive in memory. Version 2 (written now)::

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
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from rag_grpc import __version__
from rag_grpc.backup.format import (
    AES_GCM,
    CHUNK_BYTES,
    DEFAULT_MAX_RESTORE_BYTES,
    HEADER_LEN,
    MAGIC,
    MAX_CHUNK_BYTES,
    NONCE_PREFIX_BYTES,
    PLAIN,
    TAG_BYTES,
    VERSION,
    BackupError,
)

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


def unseal(blob: bytes, key: bytes | None) -> bytes:
    """The tar inside an envelope held in memory (tests, small tools)."""
    out = io.BytesIO()
    unseal_to(io.BytesIO(blob), out, key, allow_unencrypted=True)
    return out.getvalue()
