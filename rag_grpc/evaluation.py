"""Retrieval quality over a live server: recall@k, MRR@k and nDCG@k per mode.

A queries file is JSON Lines, one query a line::

    {"query": "how do tides work", "relevant": ["tides", "moon"]}
    {"query": "sourdough", "relevant": {"bread": 2, "yeast": 1}}

``relevant`` names document ids: a list (each of grade 1) or a map of id to a
non-negative grade (0: judged, not relevant). Relevance is per document, so
every search asks for k distinct documents (``by_document``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rag_grpc.client import RagClient, SearchOptions

MODES = ("dense", "lexical", "hybrid")
FUSIONS = ("rrf", "relative_score")
# A queries file is read whole and each line costs one search per mode.
MAX_QUERIES = 100_000
MAX_RELEVANT = 1_000
MAX_QUERY_CHARS = 10_000


class QueriesError(ValueError):
    """A queries file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class EvalQuery:
    """One query and its judged documents: id -> grade (> 0 is relevant)."""

    query: str
    relevant: Mapping[str, float]


@dataclass(frozen=True)
class Variant:
    """One way of searching to evaluate: a label and the search options it
    sets (mode, fusion, re-ranking)."""

    label: str
    options: SearchOptions


@dataclass(frozen=True)
class ModeReport:
    """Means over the queries of one variant, with client-side latency.

    ``duplicates``: hits whose document an earlier hit of the same query
    already returned (a by-document search should give none); ``short``:
    queries that got fewer than k documents. ``error``: why the variant
    stopped (the server refused it), else None."""

    label: str
    queries: int
    k: int
    recall: float
    mrr: float
    ndcg: float
    latency_p50_ms: float
    latency_p95_ms: float
    duplicates: int
    short: int
    error: str | None = None


# -- the queries file ------------------------------------------------------


def parse_queries(lines: Iterable[str], source: str = "queries") -> list[EvalQuery]:
    """EvalQuery per non-blank JSON line; QueriesError naming source:line otherwise."""
    queries: list[EvalQuery] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        if len(queries) == MAX_QUERIES:
            raise QueriesError(f"{where}: more than {MAX_QUERIES} queries; split the file")
        queries.append(_parse_line(line, where))
    if not queries:
        raise QueriesError(f"{source}: no queries (one JSON object per line)")
    return queries


def load_queries(path: Path) -> list[EvalQuery]:
    """The queries of a JSON Lines file (see `parse_queries`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_queries(fh, str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise QueriesError(f"cannot read {path} as UTF-8 text: {exc}") from None


def _parse_line(line: str, where: str) -> EvalQuery:
    expected = 'expected {"query": "...", "relevant": ["doc-id", ...] or {"doc-id": grade}}'
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise QueriesError(f"{where}: not JSON ({exc}); {expected}") from None
    if not isinstance(record, dict):
        raise QueriesError(f"{where}: not a JSON object; {expected}")
    unknown = sorted(set(record) - {"query", "relevant"})
    if unknown:
        raise QueriesError(f"{where}: unknown field(s) {', '.join(unknown)}; {expected}")
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise QueriesError(f"{where}: query must be a non-empty string; {expected}")
    if len(query) > MAX_QUERY_CHARS:
        raise QueriesError(f"{where}: query is longer than {MAX_QUERY_CHARS} characters")
    return EvalQuery(query, _parse_relevant(record.get("relevant"), where, expected))


def _parse_relevant(value: object, where: str, expected: str) -> dict[str, float]:
    grades: dict[str, float] = {}
    if isinstance(value, list):
        for doc_id in value:
            if not isinstance(doc_id, str) or not doc_id:
                raise QueriesError(
                    f"{where}: relevant holds {json.dumps(doc_id)}, not a document id "
                    "(a non-empty string)"
                )
            if doc_id in grades:
                raise QueriesError(f"{where}: relevant lists {json.dumps(doc_id)} twice")
            grades[doc_id] = 1.0
    elif isinstance(value, dict):
        for doc_id, grade in value.items():
            # bool is an int to Python, but true/false is no grade.
            if (
                not isinstance(grade, int | float)
                or isinstance(grade, bool)
                or not math.isfinite(grade)
                or grade < 0
            ):
                raise QueriesError(
                    f"{where}: the grade of {json.dumps(doc_id)} is {json.dumps(grade)}; "
                    "grades are non-negative numbers"
                )
            if not doc_id:
                raise QueriesError(f"{where}: relevant has an empty document id")
            grades[doc_id] = float(grade)
    else:
        raise QueriesError(f"{where}: relevant is missing or not a list or map; {expected}")
    if len(grades) > MAX_RELEVANT:
        raise QueriesError(f"{where}: more than {MAX_RELEVANT} relevant documents")
    if not any(grade > 0 for grade in grades.values()):
        raise QueriesError(f"{where}: no relevant document (none with a grade above 0)")
    return grades


# -- metrics ---------------------------------------------------------------


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents (grade > 0) among the first k ranked."""
    wanted = {doc_id for doc_id, grade in relevant.items() if grade > 0}
    if not wanted:
        return 0.0
    return len(wanted.intersection(ranked[:k])) / len(wanted)


def reciprocal_rank_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """1 / rank of the first relevant document in the first k, 0 if none;
    its mean over queries is MRR@k."""
    for rank, doc_id in enumerate(ranked[:k], start=1):
        if relevant.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """DCG of the first k over the ideal DCG of the grades: gain = grade
    (linear, as trec_eval), discount log2(rank + 1); 0 with no relevant grade."""
    dcg = sum(
        relevant.get(doc_id, 0) / math.log2(rank + 1)
        for rank, doc_id in enumerate(ranked[:k], start=1)
    )
    ideal_grades = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal_grades, start=1))
    return dcg / ideal if ideal else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- over a server ---------------------------------------------------------


def variants(
    modes: Sequence[str], *, fusion: str = "", rerank: bool | None = None
) -> list[Variant]:
    """One Variant per mode name, each with the same re-ranking; fusion goes
    to the hybrid mode only (the server refuses it for the others)."""
    if fusion and fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose {' or '.join(FUSIONS)}")
    out = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")
        options: SearchOptions = {"mode": mode}
        if fusion and mode == "hybrid":
            options["fusion"] = fusion
        if rerank is not None:
            options["rerank"] = rerank
        label = mode + (f" {fusion}" if fusion and mode == "hybrid" else "")
        out.append(Variant(label + (" + rerank" if rerank else ""), options))
    return out


def evaluate(
    client: RagClient,
    queries: Sequence[EvalQuery],
    k: int = 10,
    modes: Sequence[str | Variant] = MODES,
    namespace: str = "",
    *,
    progress: Callable[[int], None] | None = None,
) -> list[ModeReport]:
    """Search every query once per mode (a name or a Variant), k distinct
    documents each, and report the metrics' means and the latency a client
    sees. A mode the server refuses (an RpcError) ends that mode with its
    error; the others still run. progress(done) after each query."""
    from rag_grpc.client import RpcError

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    runs = [_Run(m if isinstance(m, Variant) else variants([m])[0]) for m in modes]
    for number, query in enumerate(queries):
        # The modes take turns on each query, first place rotating, so a
        # change in the machine's load while this runs reaches every mode
        # alike and their latencies stay comparable.
        for i in range(len(runs)):
            run = runs[(number + i) % len(runs)]
            if run.error is not None:
                continue
            started = time.perf_counter()
            try:
                hits = client.search(query.query, k=k, namespace=namespace, **run.options)
            except RpcError as exc:
                run.error = str(exc)
                continue
            run.latencies.append((time.perf_counter() - started) * 1000)
            ranked = list(dict.fromkeys(hit.document_id for hit in hits))
            run.duplicates += len(hits) - len(ranked)
            run.short += len(ranked) < k
            run.recalls.append(recall_at_k(ranked, query.relevant, k))
            run.rranks.append(reciprocal_rank_at_k(ranked, query.relevant, k))
            run.ndcgs.append(ndcg_at_k(ranked, query.relevant, k))
        if progress is not None:
            progress(number + 1)
    return [run.report(k) for run in runs]


class _Run:
    """What one variant has gathered so far."""

    def __init__(self, variant: Variant) -> None:
        self.label = variant.label
        # Relevance is judged per document: k distinct documents, one hit each.
        self.options: SearchOptions = {
            **variant.options,
            "by_document": True,
            "chunks_per_document": 1,
        }
        self.recalls: list[float] = []
        self.rranks: list[float] = []
        self.ndcgs: list[float] = []
        self.latencies: list[float] = []
        self.duplicates = 0
        self.short = 0
        self.error: str | None = None

    def report(self, k: int) -> ModeReport:
        return ModeReport(
            self.label,
            len(self.recalls),
            k,
            _mean(self.recalls),
            _mean(self.rranks),
            _mean(self.ndcgs),
            percentile(self.latencies, 50),
            percentile(self.latencies, 95),
            self.duplicates,
            self.short,
            self.error,
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
