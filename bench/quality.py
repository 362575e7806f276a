"""Retrieval quality and its cost per mode, on CPython's own documentation.

    python -m bench.quality [--docs 0] [--queries 300] [--k 10] [--rerank-model DIR]

Corpus: text that ships with this machine's Python, nothing downloaded and
no manual pages. Every `pydoc_data.topics` page, and one document per
standard-library module (top level and submodules, private and test modules
left out, a few with side effects on import skipped): the module's docstring,
then each public class's and function's docstring defined in it, and each
public method's, in name order. Documents under --min-chars (4,000) are
skipped and long ones cut at --max-chars (16,000): about 200 pages of 5-18
chunks of 200 tokens, so each query has one long reference page to find among
a few hundred, as in the issue's first measurement. Whitespace inside
paragraphs is folded, so a sentence is one string.

Queries: inverse cloze (Lee et al., ORQA, 2019), derived mechanically with a
fixed seed and never tuned to the system: a prose sentence (8-40 words,
mostly words, no code, no "version" notes, found in no other document) is
drawn from a document and removed from the indexed copy; the sentence is the
query and its document the one relevant answer. Because the sentence is not
in the index, neither mode can match it verbatim: the query has to be
answered from the surrounding text, as a user's paraphrase would be. (A
topic's or function's title line was the other candidate; it stays in the
index verbatim, which rewards exact word match rather than retrieval.)
Near-duplicate pages (a module and the topic about it) make some "misses"
right answers, so the numbers are lower bounds, the same for every mode.

Modes: dense, lexical, hybrid with RRF, hybrid with relative-score fusion,
and hybrid RRF + re-rank when --rerank-model names a cross-encoder, or with
--rerank-random (skipped with the reason otherwise). No trained cross-encoder
is on this machine: --rerank-random builds one of the shape of
cross-encoder/ms-marco-MiniLM-L-6-v2 (6 layers, 384 wide) from the embedding
model's BERT body and a classifier with random weights, so the stage's cost is
a real one while its quality figures are no claim (they are left out). Searches go
one at a time through `rag_grpc.evaluation.evaluate` (k distinct documents),
with the server's result and embedding caches off so each mode pays its own
way. Targets (measured, not asserted): hybrid >= dense + 0.02 in recall@10
and MRR@10; no duplicate documents in by-document results; hybrid p50 <=
1.5x dense p50.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import math
import pkgutil
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from bench.common import MODEL_DIR, command_line, free_port, record, table
from bench.load import start_server
from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from rag_grpc.evaluation import EvalQuery, ModeReport, Variant, evaluate

# Importing these opens a browser, prints, starts a GUI or is test scaffolding.
SKIP_MODULES = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "ensurepip",
    "pydoc_data",
    "lib2to3",
    "msvcrt",
    "winreg",
    "winsound",
    "nt",
    "nturl2path",
}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"[A-Za-z]+")


def topic_documents() -> Iterator[tuple[str, str]]:
    """(id, text) of every pydoc topic page."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic/{name}", topics[name]


def module_names() -> list[str]:
    """Public standard-library modules and their public submodules, sorted."""
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        names.append(name)
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(spec.submodule_search_locations, name + "."):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in ("test", "tests") for p in parts):
                names.append(info.name)
    return sorted(set(names))


def module_text(name: str) -> str:
    """A module's docstring, then its public classes', functions' and methods'."""
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except BaseException:  # a platform's module, or one that exits on import
            return ""
    parts = [inspect.getdoc(module) or ""]
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for attr in sorted(set(public)):
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        if doc := inspect.getdoc(obj):
            parts.append(f"{attr}\n\n{doc}")
        if inspect.isclass(obj):
            for method, value in sorted(vars(obj).items()):
                if (
                    method[:1] != "_"
                    and inspect.isroutine(value)
                    and (doc := inspect.getdoc(value))
                ):
                    parts.append(f"{attr}.{method}\n\n{doc}")
    return "\n\n".join(p for p in parts if p)


def folded(text: str) -> str:
    """Paragraphs kept, whitespace inside each folded to single spaces."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def corpus(min_chars: int, max_chars: int) -> list[Document]:
    """The documents, in id order."""
    sources = [*topic_documents(), *((f"module/{n}", module_text(n)) for n in module_names())]
    docs = []
    for doc_id, text in sources:
        text = folded(text)
        if len(text) >= min_chars:
            docs.append(Document(doc_id, text[:max_chars], {"kind": doc_id.split("/")[0]}))
    return sorted(docs, key=lambda d: d.id)


def cloze_sentences(text: str) -> list[str]:
    """Prose sentences of a document that can stand alone as a query."""
    out = []
    for paragraph in text.split("\n\n"):
        for sentence in SENTENCE_END.split(paragraph):
            words = sentence.split()
            if not 8 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] != ".":
                continue
            if ">>>" in sentence or "version" in sentence.lower():
                continue
            if sum(bool(WORD.fullmatch(w.strip(".,;:()'\""))) for w in words) < 0.8 * len(words):
                continue
            out.append(sentence)
    return out


def cloze_queries(
    docs: list[Document], count: int, seed: int
) -> tuple[list[Document], list[EvalQuery]]:
    """count queries (fewer if the documents hold fewer sentences), and the
    documents with those sentences removed."""
    rng = random.Random(seed)
    candidates = {d.id: cloze_sentences(d.text) for d in docs}
    # A sentence that occurs twice (in two documents, or inside another
    # sentence) has no single right answer.
    seen = Counter(s for sentences in candidates.values() for s in set(sentences))
    everything = "\n".join(d.text for d in docs)
    having = [doc_id for doc_id in sorted(candidates) if candidates[doc_id]]
    per_document = math.ceil(count / max(len(having), 1))
    picked = []
    for doc_id in having:
        sentences = [s for s in candidates[doc_id] if seen[s] == 1]
        rng.shuffle(sentences)
        unique = (s for s in sentences if everything.count(s) == 1)
        picked += [(doc_id, s) for s in list(itertools.islice(unique, per_document))]
    rng.shuffle(picked)
    picked = picked[:count]
    removed: dict[str, list[str]] = {}
    for doc_id, sentence in picked:
        removed.setdefault(doc_id, []).append(sentence)
    indexed = []
    for doc in docs:
        text = doc.text
        for sentence in removed.get(doc.id, ()):
            text = text.replace(sentence, "", 1)
        indexed.append(Document(doc.id, text, doc.metadata))
    return indexed, [EvalQuery(sentence, {doc_id: 1.0}) for doc_id, sentence in picked]


def random_cross_encoder(model_dir: Path, seed: int) -> Path:
    """A BertForSequenceClassification directory: the embedding model's body
    and pooler with a random one-logit classifier (cost only, no quality)."""
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file

    source = MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config.update(
        architectures=["BertForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
    )
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(source / "tokenizer.json", model_dir / "tokenizer.json")
    weights = load_file(str(source / "model.safetensors"))
    rng = np.random.default_rng(seed)
    hidden = int(config["hidden_size"])
    weights["classifier.weight"] = rng.normal(0, hidden**-0.5, (1, hidden)).astype(np.float32)
    weights["classifier.bias"] = np.zeros(1, np.float32)
    save_file(weights, str(model_dir / "model.safetensors"))
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=0, help="documents (0: all), drawn by seed")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--min-chars", type=int, default=4000)
    parser.add_argument("--max-chars", type=int, default=16000)
    parser.add_argument(
        "--rerank-model", type=Path, help="cross-encoder model dir (rerank.model_dir)"
    )
    parser.add_argument(
        "--rerank-random",
        action="store_true",
        help="re-rank with a MiniLM-L6-shaped cross-encoder of random head weights (cost only)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()

    docs = corpus(args.min_chars, args.max_chars)
    if args.docs:
        docs = sorted(
            random.Random(args.seed).sample(docs, min(args.docs, len(docs))), key=lambda d: d.id
        )
    docs, queries = cloze_queries(docs, args.queries, args.seed)
    topics = sum(d.id.startswith("topic/") for d in docs)
    print(
        f"{len(docs)} documents ({topics} pydoc topics, {len(docs) - topics} modules), "
        f"{sum(len(d.text) for d in docs) / 1e6:.2f} M characters; {len(queries)} queries"
    )

    workdir = Path(tempfile.mkdtemp(prefix="rag-quality-"))
    port = free_port()
    env = {
        # Each mode pays for its own embedding and search.
        "RAG_GRPC_INDEX__RESULT_CACHE_ENTRIES": "0",
        "RAG_GRPC_EMBEDDING__CACHE_BYTES": "0",
    }
    if args.rerank_random:
        if args.rerank_model:
            parser.error("give --rerank-model or --rerank-random, not both")
        args.rerank_model = random_cross_encoder(workdir / "random-cross-encoder", args.seed)
    if args.rerank_model:
        env["RAG_GRPC_RERANK__MODEL_DIR"] = str(args.rerank_model.resolve())
    server = start_server(
        workdir / "data", port, workdir / "server.log", "retrieval,embedding,admin", env
    )
    try:
        with RagClient(f"127.0.0.1:{port}", timeout=600) as client:
            started = time.perf_counter()
            chunks = 0
            for i in range(0, len(docs), 8):
                chunks += client.upsert(docs[i : i + 8]).chunks
            ingest_s = time.perf_counter() - started
            print(f"upserted {chunks} chunks in {ingest_s:.0f} s")
            modes = [
                Variant("dense", {"mode": "dense"}),
                Variant("lexical", {"mode": "lexical"}),
                Variant("hybrid rrf", {"mode": "hybrid", "fusion": "rrf"}),
                Variant("hybrid relative_score", {"mode": "hybrid", "fusion": "relative_score"}),
            ]
            skipped = "no --rerank-model or --rerank-random (rag-grpc ships no cross-encoder)"
            if args.rerank_model:
                skipped = ""
                modes.append(
                    Variant(
                        "hybrid rrf + rerank", {"mode": "hybrid", "fusion": "rrf", "rerank": True}
                    )
                )
            # Warm each path (model sessions, SQLite pages) before timing.
            evaluate(client, queries[:5], args.k, modes)
            reports = evaluate(client, queries, args.k, modes)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        if "reports" in locals() and not any(r.error for r in reports):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept the server's data dir and log for a look: {workdir}", file=sys.stderr)

    k = args.k
    headers = ["mode", f"recall@{k}", f"MRR@{k}", f"nDCG@{k}", "p50 ms", "p95 ms", "duplicates"]
    rows = result_rows(reports, cost_only={"hybrid rrf + rerank"} if args.rerank_random else set())
    if skipped:
        rows.append(["hybrid rrf + rerank", "-", "-", "-", "-", "-", "-", f"skipped: {skipped}"])
    body = (
        f"{len(docs)} documents ({topics} pydoc topics, {len(docs) - topics} stdlib modules' "
        f"docstrings, {chunks} chunks), {len(queries)} inverse-cloze queries (seed {args.seed}), "
        f"k={k} documents by document, one search at a time, modes taking turns, caches off; "
        f"upsert took {ingest_s:.0f} s.\n\n"
        + table([*headers, "note"], rows)
        + "\n\nTargets (measured, not asserted):\n\n"
        + table(["target", "measured", "met"], targets(reports))
    )
    if args.rerank_model:
        body += f"\n\nRe-ranker: {args.rerank_model.name}" + (
            " (random classifier weights: cost only)." if args.rerank_random else "."
        )
    record(
        "Retrieval quality on CPython's documentation",
        command_line(),
        "none (rag-grpc's own modes, same server and data)",
        body,
        {"reports": [asdict(r) for r in reports], "documents": len(docs), "queries": len(queries)},
        save=not args.no_record,
    )


def result_rows(reports: list[ModeReport], cost_only: set[str]) -> list[list[object]]:
    """A table row per mode; quality left out where it means nothing."""
    rows: list[list[object]] = []
    for r in reports:
        if r.error:
            rows.append([r.label, "-", "-", "-", "-", "-", "-", f"failed: {r.error}"])
        elif r.label in cost_only:
            note = "random weights: latency only"
            rows.append(
                [r.label, "-", "-", "-", r.latency_p50_ms, r.latency_p95_ms, r.duplicates, note]
            )
        else:
            row = [r.recall, r.mrr, r.ndcg, r.latency_p50_ms, r.latency_p95_ms, r.duplicates]
            rows.append([r.label, *row, ""])
    return rows


def targets(reports: list[ModeReport]) -> list[list[object]]:
    """The issue's targets against the measured figures."""
    by_label = {r.label: r for r in reports if not r.error}
    dense = by_label.get("dense")
    rows: list[list[object]] = []
    for label in ("hybrid rrf", "hybrid relative_score"):
        hybrid = by_label.get(label)
        if dense is None or hybrid is None:
            continue
        for metric in ("recall", "mrr"):
            # A tolerance, so a gain of exactly 0.02 is not lost to float rounding.
            gain = getattr(hybrid, metric) - getattr(dense, metric)
            rows.append(
                [f"{label} {metric} >= dense + 0.02", f"{gain:+.3f}", _yes(gain >= 0.02 - 1e-9)]
            )
        ratio = hybrid.latency_p50_ms / max(dense.latency_p50_ms, 1e-9)
        rows.append([f"{label} p50 <= 1.5x dense p50", f"{ratio:.2f}x", _yes(ratio <= 1.5)])
    duplicates = sum(r.duplicates for r in reports)
    rows.append(["no duplicate documents (all modes)", str(duplicates), _yes(duplicates == 0)])
    return rows


def _yes(met: bool) -> str:
    return "yes" if met else "no"


if __name__ == "__main__":
    main()
