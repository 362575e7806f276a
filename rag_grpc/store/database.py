"""Opening SQLite files the one way every part of rag-grpc does (WAL,
durable commits, secure_delete, private to this user), queries that stop at
the caller's deadline, and the errors a busy or full database becomes."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rag_grpc.errors import RagError, ResourceExhausted, Unavailable

# How many SQLite virtual-machine steps run between checks of the caller's
# deadline and cancellation in a filter query.
PROGRESS_STEPS = 10_000


@contextmanager
def interruptible(
    conn: sqlite3.Connection, stage: str = "matching the filter"
) -> Iterator[sqlite3.Connection]:
    """Run queries on conn that stop (sqlite3.OperationalError 'interrupted',
    raised as DeadlineExceeded/Cancelled) when the call's deadline passes or it
    is cancelled."""
    from rag_grpc import deadlines

    stopped: list[BaseException] = []

    def progress() -> int:
        try:
            deadlines.check(stage)
        except Exception as exc:  # raised again below, once SQLite has stopped
            stopped.append(exc)
            return 1
        return 0

    conn.set_progress_handler(progress, PROGRESS_STEPS)
    try:
        yield conn
    except sqlite3.OperationalError:
        if stopped:
            raise stopped[0] from None
        raise
    finally:
        conn.set_progress_handler(None, 0)


@contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock taken now, not at the first write),
    COMMIT when the block ends, ROLLBACK and raise again when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite has already rolled back after some errors (a full disk).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def storage_error(exc: BaseException) -> RagError | None:
    """The caller-facing error for a database that is busy or full (retry
    later), or None when exc is not one of those."""
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return Unavailable("the database is busy with another writer; retry shortly")
    if "full" in text:
        return ResourceExhausted(
            "the server's disk is full; nothing was written (free space, then retry)"
        )
    return None


def private_file(path: Path) -> None:
    """Create the database file (and its directory) readable by this user
    only; SQLite gives its -wal and -shm files the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def connect(path: Path) -> sqlite3.Connection:
    """A connection as every part of rag-grpc opens one: WAL, durable commits,
    a busy timeout, and secure_delete on (freed pages are zeroed, whatever
    this SQLite build's default)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode can lose the last transactions on power loss but
    # never corrupts; FULL makes each acknowledged write durable.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA secure_delete=ON")
    return conn
