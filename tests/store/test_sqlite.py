"""The DocumentStore built directly: documents, chunks, generations and log
positions as SQLite keeps them, one transaction per write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.documents import Document
from rag_grpc.store.lexical import match_expression
from rag_grpc.store.sqlite import DocumentStore, NewChunk
from tests.conftest import CORPUS
from tests.in_process import WordEmbedder

EMBEDDER = WordEmbedder()


def chunks_of(*docs: Document) -> list[NewChunk]:
    """One chunk per document (its whole text), embedded by the word embedder."""
    return [NewChunk(d.id, 0, d.text, EMBEDDER.vector(d.text)) for d in docs]


@pytest.fixture
def store(tmp_path: Path) -> DocumentStore:
    s = DocumentStore(tmp_path / "rag.sqlite3")
    s.replace_documents("default", CORPUS, chunks_of(*CORPUS))
    return s


def test_a_fresh_store_has_the_empty_default_namespace(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "rag.sqlite3")
    assert store.namespaces() == ["default"]
    assert store.generation("default") == 0
    assert store.generation("absent") == 0
    assert not store.has_namespace("absent")
    assert (tmp_path / "rag.sqlite3").stat().st_mode & 0o077 == 0  # private to its owner


def test_documents_come_back_as_written(store: DocumentStore) -> None:
    found = store.get_documents("default", ["chess", "gil", "nope"])
    assert found == {"chess": CORPUS[2], "gil": CORPUS[4]}
    assert found["chess"].metadata == {"topic": "games", "year": 2015, "reviewed": False}
    assert isinstance(found["chess"].metadata["reviewed"], bool)  # not 0
    counts = {c.name: (c.documents, c.chunks, c.generation) for c in store.counts()}
    assert counts == {"default": (5, 5, 1)}


def test_replacing_a_document_drops_its_old_chunks(store: DocumentStore) -> None:
    old = store.labels("default")
    new = Document("chess", "Draughts.", {"topic": "games"})
    outcome = store.replace_documents("default", [new], chunks_of(new))
    assert len(outcome.removed_labels) == 1 and outcome.removed_labels[0] in old
    assert len(outcome.added_labels) == 1 and outcome.added_labels[0] not in old
    assert outcome.generation == 2
    assert store.get_documents("default", ["chess"])["chess"] == new
    records = store.get_chunks([int(outcome.removed_labels[0]), int(outcome.added_labels[0])])
    assert list(records) == [int(outcome.added_labels[0])]
    assert records[int(outcome.added_labels[0])].text == "Draughts."


def test_stored_vectors_are_the_written_ones(store: DocumentStore) -> None:
    batches = list(store.iter_vectors("default"))
    labels = np.concatenate([b[0] for b in batches])
    vectors = np.concatenate([b[1] for b in batches])
    assert len(labels) == 5
    by_label = store.get_chunks([int(x) for x in labels])
    for label, vector in zip(labels, vectors, strict=True):
        assert np.array_equal(vector, EMBEDDER.vector(by_label[int(label)].text))


def test_unchanged_means_same_text_and_same_metadata(store: DocumentStore) -> None:
    same = CORPUS[0]
    other_meta = Document("chess", CORPUS[2].text, {"topic": "games", "year": 2016})
    other_text = Document("gil", CORPUS[4].text + " ", dict(CORPUS[4].metadata))
    assert store.unchanged("default", [same, other_meta, other_text, Document("new", "x")]) == {
        "volcano"
    }
    assert store.unchanged("elsewhere", [same]) == set()


def test_delete_reports_only_what_was_there_and_bumps_only_then(store: DocumentStore) -> None:
    deleted, labels, generation = store.delete_documents("default", ["volcano", "nope"])
    assert deleted == ["volcano"] and len(labels) == 1 and generation == 2
    deleted, labels, generation = store.delete_documents("default", ["volcano", "nope"])
    assert deleted == [] and len(labels) == 0 and generation == 2
    assert "volcano" not in store.get_documents("default", ["volcano"])


def test_delete_older_than_keeps_documents_written_since(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "rag.sqlite3")
    old, fresh = Document("old", "old text"), Document("fresh", "fresh text")
    store.replace_documents("default", [old], chunks_of(old), written_at=100.0)
    store.replace_documents("default", [fresh], chunks_of(fresh), written_at=300.0)
    assert store.expired_ids("default", before=200.0) == ["old"]
    deleted, _, _ = store.delete_documents("default", ["old", "fresh"], older_than=200.0)
    assert deleted == ["old"]
    assert list(store.get_documents("default", ["old", "fresh"])) == ["fresh"]


def test_namespaces_keep_their_own_documents_and_generations(store: DocumentStore) -> None:
    doc = Document("chess", "Tea.")
    store.replace_documents("other", [doc], chunks_of(doc))
    assert store.namespaces() == ["default", "other"]
    assert store.generation("other") == 1 and store.generation("default") == 1
    assert store.get_documents("other", ["chess"])["chess"].text == "Tea."
    assert store.get_documents("default", ["chess"])["chess"] == CORPUS[2]


def test_the_log_position_commits_with_the_write(store: DocumentStore) -> None:
    assert store.position("nats:W") == 0
    doc = Document("a", "text")
    store.replace_documents("default", [doc], chunks_of(doc), position=("nats:W", 7))
    store.delete_documents("default", ["a"], position=("nats:W", 8))
    assert store.position("nats:W") == 8
    assert store.position("nats:other") == 0


def test_a_failed_write_leaves_nothing_behind(store: DocumentStore) -> None:
    twice = [Document("dup", "one"), Document("dup", "two")]
    with pytest.raises(sqlite3.IntegrityError):
        store.replace_documents("default", twice, chunks_of(*twice), position=("nats:W", 3))
    assert store.get_documents("default", ["dup"]) == {}
    assert store.generation("default") == 1
    assert store.position("nats:W") == 0
    assert len(store.labels("default")) == 5


def test_the_lexical_index_follows_writes(store: DocumentStore) -> None:
    def matches(query: str) -> set[str]:
        expression = match_expression(query)
        assert expression is not None
        labels = [label for label, _ in store.lexical_ranking("default", expression)]
        return {r.doc_id for r in store.get_chunks(labels).values()}

    assert matches("espresso") == {"espresso"}
    store.delete_documents("default", ["espresso"])
    assert matches("espresso") == set()


def test_the_audit_log_records_who_did_what_without_content(store: DocumentStore) -> None:
    store.record_audit("alice", "forget", "default", ["volcano"])
    (entry,) = store.audit_log()
    assert (entry["actor"], entry["action"], entry["namespace"]) == ("alice", "forget", "default")
    assert entry["doc_ids"] == ["volcano"]
    assert CORPUS[0].text not in repr(entry)


def test_a_reopened_store_has_everything(tmp_path: Path, store: DocumentStore) -> None:
    store.close()
    again = DocumentStore(tmp_path / "rag.sqlite3")
    assert again.get_documents("default", ["gil"])["gil"] == CORPUS[4]
    assert again.generation("default") == 1
