"""What a backup archive is: its envelope's magic and version, its members
(``rag.sqlite3``, ``index/<namespace>.*``, ``manifest.json``, nothing else)
and the size limits a reader enforces; the one error every backup step raises.
"""

from __future__ import annotations

import hashlib
import re

from rag_grpc.documents import resolve_namespace
from rag_grpc.errors import InvalidArgument

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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
