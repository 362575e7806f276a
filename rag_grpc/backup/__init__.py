"""Snapshots, backup archives and restore.

An archive is a tar of the data dir at one point in time (``rag.sqlite3``,
the index files, and last ``manifest.json`` with every member's size and
sha256) inside an envelope that checks, and optionally encrypts, it as a
stream. One module per step:

- format.py: the member names, limits and version; BackupError
- keys.py: where the 32-byte key comes from (KeyProvider, the key file)
- envelope.py: sealing and unsealing the envelope (AES-256-GCM, STREAM)
- snapshot.py: writing the tar of a consistent copy (SnapshotArchive)
- extract.py: reading an authentic tar, member by member, against its manifest
- checks.py: the restored database and indexes
- restore.py: all of it into a new data dir, or nothing

The names below stay importable from ``rag_grpc.backup``.
"""

from rag_grpc.backup.checks import check_database, check_indexes
from rag_grpc.backup.envelope import Envelope, Sealer, is_encrypted, seal, unseal, unseal_to
from rag_grpc.backup.extract import extract_archive, verified_members
from rag_grpc.backup.format import (
    AES_GCM,
    CHUNK_BYTES,
    DATABASE,
    DEFAULT_MAX_RESTORE_BYTES,
    HEADER_LEN,
    INDEX_SUFFIXES,
    KEY_BYTES,
    MAGIC,
    MANIFEST,
    MAX_CHUNK_BYTES,
    MAX_EXTENDED_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_NAMESPACES,
    MAX_SMALL_MEMBER_BYTES,
    NONCE_PREFIX_BYTES,
    PLAIN,
    REQUIRED_TABLES,
    TAG_BYTES,
    VERSION,
    BackupError,
    member_namespace,
    sha256_bytes,
)
from rag_grpc.backup.keys import (
    FileKeyProvider,
    KeyProvider,
    default_key_provider,
    environment_key_provider,
)
from rag_grpc.backup.restore import Restored, restore
from rag_grpc.backup.snapshot import SnapshotArchive, archive_stream

__all__ = [
    "AES_GCM",
    "CHUNK_BYTES",
    "DATABASE",
    "DEFAULT_MAX_RESTORE_BYTES",
    "HEADER_LEN",
    "INDEX_SUFFIXES",
    "KEY_BYTES",
    "MAGIC",
    "MANIFEST",
    "MAX_CHUNK_BYTES",
    "MAX_EXTENDED_HEADER_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_NAMESPACES",
    "MAX_SMALL_MEMBER_BYTES",
    "NONCE_PREFIX_BYTES",
    "PLAIN",
    "REQUIRED_TABLES",
    "TAG_BYTES",
    "VERSION",
    "BackupError",
    "Envelope",
    "FileKeyProvider",
    "KeyProvider",
    "Restored",
    "Sealer",
    "SnapshotArchive",
    "archive_stream",
    "check_database",
    "check_indexes",
    "default_key_provider",
    "environment_key_provider",
    "extract_archive",
    "is_encrypted",
    "member_namespace",
    "restore",
    "seal",
    "sha256_bytes",
    "unseal",
    "unseal_to",
    "verified_members",
]
