"""Documents from files: JSON Lines (one ``{"id", "text", "metadata"}``
object a line) and .txt/.md files, directories walked. Used by
``rag-grpc ingest``; usable by anything else that loads a corpus from disk."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from rag_grpc.documents import Document

TEXT_SUFFIXES = {".txt", ".md"}


class DocumentFileError(ValueError):
    """A path that does not exist, or a file that is not a document file."""


def read_documents(paths: Sequence[Path]) -> Iterator[Document]:
    """Documents from JSON Lines files and .txt/.md files, directories walked.

    A text file's id (and ``source`` metadata) is its path relative to the
    directory given, or its name when given as a file."""
    for path in paths:
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")
            )
            for file in files:
                yield from read_file(file, base=path)
        elif path.is_file():
            yield from read_file(path, base=path.parent)
        else:
            raise DocumentFileError(f"{path} does not exist")


def read_file(path: Path, base: Path) -> Iterator[Document]:
    """The documents of one file; DocumentFileError names the line at fault."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    yield Document(
                        str(record["id"]), str(record["text"]), dict(record.get("metadata") or {})
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise DocumentFileError(
                        f"{path}:{number}: expected a JSON object with id, text and optional "
                        f"metadata ({exc})"
                    ) from None
        return
    if path.suffix not in TEXT_SUFFIXES:
        raise DocumentFileError(f"{path}: unsupported file type (use .jsonl, .txt or .md)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DocumentFileError(f"{path} is not UTF-8 text") from None
    rel = path.relative_to(base).as_posix()
    yield Document(rel, text, {"source": rel})
