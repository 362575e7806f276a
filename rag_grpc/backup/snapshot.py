"""Writing an archive: a tar of a consistent copy of the data dir (the
database from SQLite's online backup, the index files saved under the same
write locks) and, last, ``manifest.json`` with every member's size and
sha256, produced lazily and sealed piece by piece as the caller reads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

from rag_grpc import __version__
from rag_grpc.backup.envelope import Sealer
from rag_grpc.backup.format import CHUNK_BYTES, MANIFEST, VERSION, BackupError


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
