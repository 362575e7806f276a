"""The lexical index: BM25 over the chunks' words with SQLite FTS5.

An external-content FTS5 table over ``chunks`` kept exact by triggers, so
every write that inserts or deletes chunks (upsert, delete, forget, TTL, the
NATS write log, restore) changes it in the same transaction; a snapshot or
backup copies it with the database. Forgetting merges its segments
(``optimize``) so erased words leave the index too; on SQLite 3.42 and later
FTS5's own secure-delete is on as well.

User text never reaches FTS5 as query syntax: `match_expression` keeps only
word characters, quotes every term and joins them with OR, so ``NOT``,
``*``, ``:``, ``^``, quotes and parentheses are plain text. An identifier
such as ``os.path.join`` or ``snake_case_name`` (which the tokenizer splits
at the dots and underscores) is matched as the phrase of its parts as well as
by each part, so code and prose are both found.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

import numpy as np

from rag_grpc.errors import FailedPrecondition
from rag_grpc.store.database import immediate_transaction

TABLE = "chunk_words"
SOURCE = f"{TABLE}_source"
TRIGGERS = tuple(f"{TABLE}_{event}" for event in ("insert", "delete", "update"))

# Each chunk is indexed with its text and its namespace as one token, "n" +
# the hex of the name's UTF-8 bytes + "0" (a name of any characters is one
# alphanumeric token; ending in a digit, no stemming rule touches it), so a
# search matches `space: <token> AND text: (...)` inside FTS5 instead of
# joining every match with the chunks table (4.5 vs 2.4 ms a query over
# 2,485 chunks, bench/RESULTS.md). The view is the external content: FTS5's
# rebuild and integrity check read the same values the triggers write.
# Porter stemming over unicode61 (diacritics folded): "statements" finds
# "statement". Separators are everything but letters and digits, so
# identifiers split at "_" and "." and are matched as phrases (see above).
SCHEMA = f"""
CREATE VIEW IF NOT EXISTS {SOURCE} AS
    SELECT label, text, 'n' || hex(namespace) || '0' AS space FROM chunks;
CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5(
    text, space, content='{SOURCE}', content_rowid='label',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS {TABLE}_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO {TABLE} (rowid, text, space)
    VALUES (new.label, new.text, 'n' || hex(new.namespace) || '0');
END;
CREATE TRIGGER IF NOT EXISTS {TABLE}_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO {TABLE} ({TABLE}, rowid, text, space)
    VALUES ('delete', old.label, old.text, 'n' || hex(old.namespace) || '0');
END;
CREATE TRIGGER IF NOT EXISTS {TABLE}_update AFTER UPDATE OF text, namespace ON chunks BEGIN
    INSERT INTO {TABLE} ({TABLE}, rowid, text, space)
    VALUES ('delete', old.label, old.text, 'n' || hex(old.namespace) || '0');
    INSERT INTO {TABLE} (rowid, text, space)
    VALUES (new.label, new.text, 'n' || hex(new.namespace) || '0');
END;
"""

# Terms a query keeps at most (each one is a posting list to merge).
MAX_TERMS = 64

# Words too common to say what a text is about (English, the model's
# language). A query of only these has nothing to match lexically.
_STOP_WORDS = """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during
    each few for from further had has have having he her here hers herself him himself
    his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some
    such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves"""
STOP_WORDS = frozenset(_STOP_WORDS.split())

_WORD = re.compile(r"[^\W_]+")
# A word, or an identifier: words joined by "." or "_" (os.path.join, max_ef).
_TERM = re.compile(r"[^\W_]+(?:[._]+[^\W_]+)*")


class LexicalUnavailable(FailedPrecondition):
    """This Python's SQLite cannot hold the lexical index."""


def check_fts5(conn: sqlite3.Connection) -> None:
    """Fail with a clear message where this SQLite was built without FTS5."""
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        conn.execute("DROP TABLE temp.fts5_probe")
    except sqlite3.OperationalError as exc:
        raise LexicalUnavailable(
            f"this Python's SQLite {sqlite3.sqlite_version} has no FTS5 ({exc}); the lexical "
            "index needs it: use a Python whose sqlite3 is built with FTS5 (python.org, "
            "Debian and pyenv builds are)"
        ) from None


def install(conn: sqlite3.Connection) -> None:
    """Create the index, its source view and triggers; a database written
    before them (or with an older form of them) gets them built from its
    chunks."""
    check_fts5(conn)
    ours = definitions()
    found = {
        name: sql
        for name, sql in conn.execute("SELECT name, sql FROM sqlite_master")
        if name in ours
    }
    if found != ours:
        with immediate_transaction(conn):
            drop(conn)
            for statement in _statements():
                conn.execute(statement)
            rebuild(conn)
    if sqlite3.sqlite_version_info >= (3, 42, 0):
        conn.execute(f"INSERT INTO {TABLE} ({TABLE}, rank) VALUES ('secure-delete', 1)")


def drop(conn: sqlite3.Connection) -> None:
    """Remove the index, its view and triggers."""
    for trigger in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"DROP VIEW IF EXISTS {SOURCE}")


def _statements() -> list[str]:
    """SCHEMA as single statements (executescript would commit first)."""
    parts, statement = [], ""
    for line in SCHEMA.strip().splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            parts.append(statement.strip())
            statement = ""
    return parts


def definitions() -> dict[str, str]:
    """name -> SQL of the index, its view and triggers as SQLite records
    them, to tell ours from look-alikes in a database we did not write."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE chunks (label INTEGER PRIMARY KEY, namespace TEXT, text TEXT)")
        conn.executescript(SCHEMA)
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE name IN (?, ?) OR type = 'trigger'",
            (TABLE, SOURCE),
        ).fetchall()
    finally:
        conn.close()
    return dict(rows)


def rebuild(conn: sqlite3.Connection) -> None:
    """Rebuild the index from the chunks table (a restored or doubted file)."""
    conn.execute(f"INSERT INTO {TABLE} ({TABLE}) VALUES ('rebuild')")


def merge_away_deleted(conn: sqlite3.Connection) -> None:
    """Merge every segment into one, dropping deleted chunks' words (their
    terms and positions stay in older segments until a merge)."""
    conn.execute(f"INSERT INTO {TABLE} ({TABLE}) VALUES ('optimize')")


def check_integrity(conn: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError if the index disagrees with the chunks."""
    conn.execute(f"INSERT INTO {TABLE} ({TABLE}, rank) VALUES ('integrity-check', 1)")


def match_expression(text: str) -> str | None:
    """An FTS5 query for the words of user text, or None when it has none
    worth matching (only stop words or punctuation)."""
    terms: dict[str, None] = {}
    for found in _TERM.finditer(text.lower()):
        parts = _WORD.findall(found.group())
        if len(parts) > 1:
            terms['"' + " ".join(parts) + '"'] = None
        for part in parts:
            if part not in STOP_WORDS:
                terms['"' + part + '"'] = None
        if len(terms) >= MAX_TERMS:
            break
    return " OR ".join(list(terms)[:MAX_TERMS]) or None


def space_token(namespace: str) -> str:
    """The namespace's token, as the triggers compute it in SQL."""
    return "n" + namespace.encode("utf-8", errors="surrogatepass").hex().upper() + "0"


def ranked_labels(
    conn: sqlite3.Connection,
    namespace: str,
    expression: str,
    allowed: np.ndarray | None = None,
) -> Iterator[tuple[int, float]]:
    """(label, BM25 score) of the namespace's matching chunks, best first;
    only labels in allowed (sorted) when given. Scores: higher is better
    (BM25 of the text column; the namespace token weighs nothing)."""
    rows = conn.execute(
        f"SELECT rowid, -rank FROM {TABLE} WHERE {TABLE} MATCH ? "
        "AND rank MATCH 'bm25(1.0, 0.0)' ORDER BY rank",
        (f'space : "{space_token(namespace)}" AND text : ({expression})',),
    )
    for label, score in rows:
        if allowed is not None:
            at = int(np.searchsorted(allowed, label))
            if at == len(allowed) or int(allowed[at]) != label:
                continue
        yield int(label), float(score)
