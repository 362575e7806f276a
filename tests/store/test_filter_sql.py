"""The filter -> SQL compiler (store/filter_sql.py): what each filter kind
matches in a real store, where the boundaries fall, that malformed filters
are refused before they reach SQL, and that keys and values are only ever
bound parameters, never SQL text."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rag_grpc.documents import Document
from rag_grpc.errors import InvalidArgument
from rag_grpc.filters import MAX_ANY_OF, And, AnyOf, Equals, Filter, Or, Range, validate_filter
from rag_grpc.store.filter_sql import compile_filter, metadata_columns
from rag_grpc.store.sqlite import DocumentStore, NewChunk
from tests.in_process import WordEmbedder

INJECTION = "x' OR '1'='1"
DROP = "'); DROP TABLE documents; --"
DOCS = [
    Document("int3", "a", {"n": 3, "s": "red", "b": True}),
    Document("float3", "b", {"n": 3.0, "s": "Red", "b": False}),
    Document("neg", "c", {"n": -1.5, "s": "", "b": 1}),
    Document("ten", "d", {"n": 10, "s": "3"}),
    Document("text3", "e", {"n": "3", "s": INJECTION}),
    Document("drop", "f", {"s": DROP, "quote'key": 1}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> DocumentStore:
    s = DocumentStore(tmp_path_factory.mktemp("filters") / "rag.sqlite3")
    embedder = WordEmbedder()
    chunks = [NewChunk(d.id, 0, d.text, embedder.vector(d.text)) for d in DOCS]
    s.replace_documents("default", DOCS, chunks)
    other = Document("elsewhere", "g", {"n": 3, "s": "red"})
    s.replace_documents("other", [other], [NewChunk(other.id, 0, "g", embedder.vector("g"))])
    return s


def matching(store: DocumentStore, flt: Filter, namespace: str = "default") -> set[str]:
    validate_filter(flt)
    return set(store.doc_ids_matching(namespace, flt))


# -- each kind, against a real store -----------------------------------------


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Equals("n", 3), {"int3", "float3"}),  # ints and floats compare numerically
        (Equals("n", 3.0), {"int3", "float3"}),
        (Equals("n", "3"), {"text3"}),  # a string is not a number
        (Equals("s", "red"), {"int3"}),  # case matters
        (Equals("s", ""), {"neg"}),
        (Equals("b", True), {"int3"}),  # a bool is not the number 1 ...
        (Equals("b", 1), {"neg"}),  # ... nor the number 1 a bool
        (Equals("b", False), {"float3"}),
        (Equals("missing", 3), set()),
        (AnyOf("n", (3, -1.5)), {"int3", "float3", "neg"}),
        (AnyOf("s", ("red", "Red", 3)), {"int3", "float3"}),
        (AnyOf("n", ("3", 10)), {"text3", "ten"}),  # mixed kinds in one condition
        (Range("n", gte=3), {"int3", "float3", "ten"}),
        (Range("n", gt=3), {"ten"}),
        (Range("n", lte=3), {"int3", "float3", "neg"}),
        (Range("n", lt=3), {"neg"}),
        (Range("n", gte=3, lte=3), {"int3", "float3"}),
        (Range("n", gt=-1.5, lt=10), {"int3", "float3"}),
        (Range("b", gte=0), {"neg"}),  # ranges are over numbers only: not True/False
        (Range("s", gte=0), set()),  # nor strings ("3" is text)
        (Range("n", gte=float("-inf")), {"int3", "float3", "neg", "ten"}),
        (And((Equals("n", 3), Equals("b", True))), {"int3"}),
        (Or((Equals("s", "red"), Range("n", gt=5))), {"int3", "ten"}),
        (And((Or((Equals("n", 10), Equals("n", -1.5))), Range("n", lt=0))), {"neg"}),
    ],
)
def test_each_filter_kind_matches_exactly(
    store: DocumentStore, flt: Filter, expected: set[str]
) -> None:
    assert matching(store, flt) == expected


def test_a_filter_sees_only_its_own_namespace(store: DocumentStore) -> None:
    assert matching(store, Equals("s", "red"), "other") == {"elsewhere"}
    assert matching(store, Equals("s", "red")) == {"int3"}


def test_the_limit_bounds_the_ids(store: DocumentStore) -> None:
    assert len(store.doc_ids_matching("default", Range("n", gte=-100), limit=2)) == 2


def test_a_long_any_of_is_one_bound_parameter() -> None:
    values = tuple(range(MAX_ANY_OF))
    sql, params = compile_filter(AnyOf("n", values), "default")
    # namespace, key and one JSON array: never one variable per value.
    assert len(params) == 3
    assert sql.count("?") == 3


def test_metadata_columns_keep_bools_apart_from_numbers() -> None:
    assert metadata_columns(True) == ("b", None, 1.0)
    assert metadata_columns(1) == ("n", None, 1.0)
    assert metadata_columns(2.5) == ("n", None, 2.5)
    assert metadata_columns("1") == ("s", "1", None)


# -- malformed filters never reach SQL ----------------------------------------


@pytest.mark.parametrize(
    "flt",
    [
        Equals(INJECTION, 1),
        Equals("", 1),
        Equals("k" * 129, 1),
        Equals("k", float("nan")),
        Equals("k", float("inf")),
        Equals("k", "v" * 4097),
        AnyOf("k", ()),
        AnyOf("k", tuple(range(MAX_ANY_OF + 1))),
        AnyOf("k", (1, float("-inf"))),
        Range("k"),
        Range("k", gte=1, gt=0),
        Range("k", lte=1, lt=2),
        Range("k", gte=2, lte=1),
        Range("k", gt=float("nan")),
        And(()),
        Or((Equals("k", 1), Or(()))),
    ],
    ids=lambda f: type(f).__name__,
)
def test_malformed_filters_are_refused(flt: Filter) -> None:
    with pytest.raises(InvalidArgument):
        validate_filter(flt)


def test_the_bounds_themselves_are_allowed() -> None:
    validate_filter(Equals("k" * 128, "v" * 4096))
    validate_filter(AnyOf("k", tuple(range(MAX_ANY_OF))))
    validate_filter(Range("k", gte=1, lte=1))
    validate_filter(Equals("a.b-c_D9", True))


# -- keys and values stay data -----------------------------------------------


@pytest.mark.parametrize(
    "text", [INJECTION, DROP, "quote'key", 'x" OR 1=1 --', "k; DELETE FROM metadata"]
)
def test_keys_and_values_are_bound_never_spliced(text: str) -> None:
    for flt in (Equals(text, text), AnyOf(text, (text, 1, True)), Range(text, gte=0)):
        sql, params = compile_filter(flt, text)
        assert text not in sql
        assert params[:2] == [text, text]  # namespace, key


def test_injection_in_a_value_matches_only_that_value(store: DocumentStore) -> None:
    # The value is compared as data: it matches the one document holding it,
    # and the statement it spells is never run.
    assert matching(store, Equals("s", INJECTION)) == {"text3"}
    assert matching(store, Equals("s", DROP)) == {"drop"}
    assert matching(store, AnyOf("s", (DROP, "x' OR 1=1 --"))) == {"drop"}
    assert len(store.get_documents("default", [d.id for d in DOCS])) == len(DOCS)


def test_a_key_no_filter_may_name_is_still_only_data(store: DocumentStore) -> None:
    # validate_filter refuses such keys; compiled anyway, the key is a bound
    # value: it matches what is stored under exactly that key, nothing more.
    assert set(store.doc_ids_matching("default", Equals("quote'key", 1))) == {"drop"}
    assert store.doc_ids_matching("default", Equals("s' OR '1'='1", 1)) == []
    assert store.doc_ids_matching("default", Range("n') OR 1=1 --", gte=0)) == []


def test_the_compiled_sql_is_valid_for_every_kind(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "plan.sqlite3")
    conn.executescript(
        "CREATE TABLE documents (namespace TEXT, doc_id TEXT);"
        "CREATE TABLE metadata (namespace TEXT, doc_id TEXT, key TEXT, kind TEXT, s TEXT, n REAL);"
    )
    for flt in (
        Equals("k", "v"),
        AnyOf("k", ("v", 1, False)),
        Range("k", gt=0, lt=1),
        And((Equals("k", 1), Or((Equals("j", "x"), Range("i", lte=2))))),
    ):
        sql, params = compile_filter(flt, "ns")
        conn.execute(f"SELECT d.doc_id FROM documents d WHERE {sql}", params).fetchall()
