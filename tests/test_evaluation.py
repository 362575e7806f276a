"""Retrieval evaluation: the metrics by hand, the queries file's errors, and
`rag-grpc eval` / `rag-grpc search --mode` against a real server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rag_grpc import cli
from rag_grpc.client import RagClient
from rag_grpc.evaluation import (
    QueriesError,
    evaluate,
    ndcg_at_k,
    parse_queries,
    percentile,
    recall_at_k,
    reciprocal_rank_at_k,
)
from tests.conftest import ServerThread

# -- metrics ---------------------------------------------------------------


def test_recall_counts_relevant_documents_in_the_first_k() -> None:
    relevant = {"a": 1.0, "b": 1.0, "c": 1.0, "judged-not": 0.0}
    ranked = ["x", "a", "judged-not", "b", "c"]
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 4) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, relevant, 10) == 1.0
    assert recall_at_k([], relevant, 10) == 0.0


def test_reciprocal_rank_is_the_first_relevant_rank_within_k() -> None:
    relevant = {"a": 1.0, "z": 0.0}
    assert reciprocal_rank_at_k(["a", "b"], relevant, 10) == 1.0
    assert reciprocal_rank_at_k(["z", "b", "a"], relevant, 10) == pytest.approx(1 / 3)
    assert reciprocal_rank_at_k(["z", "b", "a"], relevant, 2) == 0.0


def test_ndcg_with_graded_relevance() -> None:
    # Grades a=3, b=2, c=1; ranking c, x, a, b at k=3:
    # DCG = 1/log2(2) + 0 + 3/log2(4) = 1 + 1.5 = 2.5
    # ideal (a, b, c) = 3 + 2/log2(3) + 1/log2(4) = 3.5 + 1.26186 = 4.76186
    relevant = {"a": 3.0, "b": 2.0, "c": 1.0}
    ideal = 3 + 2 / math.log2(3) + 0.5
    assert ndcg_at_k(["c", "x", "a", "b"], relevant, 3) == pytest.approx(2.5 / ideal)
    assert ndcg_at_k(["a", "b", "c"], relevant, 3) == pytest.approx(1.0)
    # At k=1 the ideal holds only the best grade: c first scores 1/3.
    assert ndcg_at_k(["c", "a"], relevant, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(["x", "y"], relevant, 2) == 0.0


def test_ndcg_with_binary_relevance() -> None:
    # One relevant document at rank 2: 1/log2(3).
    assert ndcg_at_k(["x", "a"], {"a": 1.0}, 10) == pytest.approx(1 / math.log2(3))


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert percentile([5.0, 1.0, 3.0, 2.0], 95) == 5.0
    assert percentile([], 50) == 0.0


# -- the queries file ------------------------------------------------------


def test_queries_parse_lists_and_graded_maps() -> None:
    queries = parse_queries(
        [
            '{"query": "tides", "relevant": ["moon", "sea"]}\n',
            "\n",
            '{"query": "bread", "relevant": {"sourdough": 2, "yeast": 0.5, "cake": 0}}\n',
        ]
    )
    assert [q.query for q in queries] == ["tides", "bread"]
    assert queries[0].relevant == {"moon": 1.0, "sea": 1.0}
    assert queries[1].relevant == {"sourdough": 2.0, "yeast": 0.5, "cake": 0.0}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "q.jsonl:2: not JSON"),
        ('["a"]', "q.jsonl:2: not a JSON object"),
        ('{"relevant": ["a"]}', "q.jsonl:2: query must be a non-empty string"),
        ('{"query": "  ", "relevant": ["a"]}', "q.jsonl:2: query must be a non-empty string"),
        ('{"query": "q"}', "q.jsonl:2: relevant is missing"),
        ('{"query": "q", "relevant": "a"}', "q.jsonl:2: relevant is missing or not a list"),
        ('{"query": "q", "relevant": [1]}', "q.jsonl:2: relevant holds 1, not a document id"),
        ('{"query": "q", "relevant": ["a", "a"]}', 'relevant lists "a" twice'),
        ('{"query": "q", "relevant": {"a": -1}}', 'the grade of "a" is -1'),
        ('{"query": "q", "relevant": {"a": "high"}}', 'the grade of "a" is "high"'),
        ('{"query": "q", "relevant": {"a": true}}', 'the grade of "a" is true'),
        ('{"query": "q", "relevant": []}', "q.jsonl:2: no relevant document"),
        ('{"query": "q", "relevant": {"a": 0}}', "q.jsonl:2: no relevant document"),
        ('{"query": "q", "relevant": ["a"], "k": 3}', "q.jsonl:2: unknown field(s) k"),
    ],
)
def test_queries_file_errors_name_the_line(line: str, message: str) -> None:
    good = '{"query": "fine", "relevant": ["a"]}'
    with pytest.raises(QueriesError) as caught:
        parse_queries([good, line], "q.jsonl")
    assert message in str(caught.value)


def test_an_empty_or_oversized_queries_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QueriesError, match="no queries"):
        parse_queries(["", "  "], "q.jsonl")
    monkeypatch.setattr("rag_grpc.evaluation.MAX_QUERIES", 2)
    line = '{"query": "q", "relevant": ["a"]}'
    with pytest.raises(QueriesError, match=r"q\.jsonl:3: more than 2 queries"):
        parse_queries([line, line, line], "q.jsonl")


# -- over a server ---------------------------------------------------------

# CORPUS (tests/conftest.py): a query that copies a document's sentence finds
# that document first in every mode; a document that is not stored is never
# found. At k=2 the means are therefore exactly 0.5.
QUERIES: list[dict[str, object]] = [
    {
        "query": "Mount Etna in Sicily is one of the most active volcanoes in Europe.",
        "relevant": ["volcano"],
    },
    {"query": "board game for two players with sixteen pieces", "relevant": {"not-stored": 2}},
]


def write_queries(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_evaluate_reports_the_metrics_the_data_implies(seeded: RagClient) -> None:
    queries = parse_queries(json.dumps(r) for r in QUERIES)
    [report] = evaluate(seeded, queries, k=2, modes=["dense"])
    assert report.label == "dense" and report.error is None
    assert (report.queries, report.k) == (2, 2)
    assert report.recall == 0.5 and report.mrr == 0.5 and report.ndcg == 0.5
    assert report.duplicates == 0 and report.short == 0
    assert 0 < report.latency_p50_ms <= report.latency_p95_ms
    # Five documents stored: k=10 finds all of them, so every query is short.
    [report] = evaluate(seeded, queries, k=10, modes=["dense"])
    assert (report.recall, report.short, report.duplicates) == (0.5, 2, 0)


def test_a_mode_the_server_refuses_reports_its_error(seeded: RagClient) -> None:
    queries = parse_queries(json.dumps(r) for r in QUERIES)
    reports = evaluate(seeded, queries, k=2, modes=["dense"], namespace="nowhere")
    assert reports[0].error is not None and "NOT_FOUND" in reports[0].error
    assert reports[0].queries == 0


def test_eval_command_prints_each_mode(
    server: ServerThread, seeded: RagClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_queries(tmp_path / "queries.jsonl", QUERIES)
    target = ("--target", server.target)

    assert cli.main(["eval", str(path), "--k", "2", "--mode", "dense", "--json", *target]) == 0
    [line] = capsys.readouterr().out.splitlines()
    report = json.loads(line)
    assert report["label"] == "dense"
    assert (report["recall"], report["mrr"], report["ndcg"]) == (0.5, 0.5, 0.5)
    assert report["duplicates"] == 0 and report["error"] is None

    # --fusion applies to the hybrid mode only (the server refuses it elsewhere).
    assert cli.main(["eval", str(path), "-k", "2", "--fusion", "relative_score", *target]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 queries, k=2, namespace default"
    assert out[1].split() == [
        "mode",
        "recall@2",
        "MRR@2",
        "nDCG@2",
        "p50",
        "ms",
        "p95",
        "ms",
        "dup",
    ]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert set(rows) == {"dense", "lexical", "hybrid"}
    assert "hybrid relative_score" in "\n".join(out)
    for row in rows.values():
        assert row[-6:-3] == ["0.500", "0.500", "0.500"] and row[-1] == "0"

    assert cli.main(["eval", str(path), "--namespace", "nowhere", *target]) == 1
    assert "rag-grpc: dense: NOT_FOUND" in capsys.readouterr().err

    # No cross-encoder on this server: the re-ranked mode fails, the others run.
    argv = ["eval", str(path), "-k", "2", "--mode", "dense", "--json", *target]
    assert cli.main([*argv, "--mode", "hybrid", "--rerank"]) == 1
    captured = capsys.readouterr()
    reports = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["label"] for r in reports] == ["dense + rerank", "hybrid + rerank"]
    assert all("FAILED_PRECONDITION" in r["error"] for r in reports)
    assert "hybrid + rerank: FAILED_PRECONDITION" in captured.err


def test_eval_command_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "relevant": ["a"]}\n{"query": "q"}\n')
    assert cli.main(["eval", str(bad), "--target", "127.0.0.1:1"]) == 2
    assert f"{bad}:2: relevant is missing" in capsys.readouterr().err

    good = write_queries(tmp_path / "good.jsonl", QUERIES)
    assert cli.main(["eval", str(good), "--mode", "dense,sparse", "--target", "127.0.0.1:1"]) == 2
    assert "unknown mode 'sparse'" in capsys.readouterr().err
    assert cli.main(["eval", str(good), "--k", "0", "--target", "127.0.0.1:1"]) == 2
    assert "--k must be at least 1" in capsys.readouterr().err


def test_search_passes_mode_fusion_and_rerank_to_the_client() -> None:
    parser = cli._parser()
    args = parser.parse_args(
        ["search", "q", "--mode", "hybrid", "--fusion", "relative_score", "--rrf-k", "10"]
    )
    assert cli.search_options(args) == {"mode": "hybrid", "fusion": "relative_score", "rrf_k": 10}
    args = parser.parse_args(["search", "q", "--rerank"])
    assert cli.search_options(args) == {"rerank": True}
    assert cli.search_options(parser.parse_args(["search", "q"])) == {}


def test_search_command_with_a_mode(
    server: ServerThread, seeded: RagClient, capsys: pytest.CaptureFixture[str]
) -> None:
    target = server.target
    argv = ["search", "sixteen pieces on a board", "--by-document", "-k", "2", "--json"]
    assert cli.main([*argv, "--mode", "dense", "--target", target]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["document_id"] == "chess" and len(hits) == 2
    for options in (["--mode", "lexical"], ["--mode", "hybrid", "--fusion", "rrf", "--rrf-k", "5"]):
        assert cli.main([*argv, *options, "--target", target]) == 0
        assert json.loads(capsys.readouterr().out)[0]["document_id"] == "chess"
