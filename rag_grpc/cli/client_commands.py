"""The commands that query a server: search, eval, ask, get, delete, embed
and stats (ingest and backup, which move data, are in transfer.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_grpc.cli.connection import client_command, connect, parse_filter
from rag_grpc.cli.output import UsageError, hit_json, json_line, print_table, shown
from rag_grpc.documents import Hit

if TYPE_CHECKING:
    from rag_grpc.client import SearchOptions


def add_search(sub: Any) -> None:
    """The search command."""
    search = client_command(sub, "search", "search for chunks")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=0, help="hits to return (server default 10)")
    search.add_argument(
        "--filter",
        help="metadata filter as proto JSON, e.g. "
        '\'{"field": {"key": "lang", "equals": {"stringValue": "en"}}}\'',
    )
    search.add_argument(
        "--by-document",
        action="store_true",
        help="k distinct documents, each with its best chunk(s), instead of k chunks",
    )
    search.add_argument(
        "--chunks-per-document",
        type=int,
        default=0,
        metavar="N",
        help="with --by-document: up to N chunks per document (default 1, at most 16)",
    )
    search.add_argument(
        "--mode",
        choices=["dense", "lexical", "hybrid"],
        help="dense (embeddings), lexical (BM25) or hybrid (both, fused); default: the "
        "server's retrieval.default_mode",
    )
    search.add_argument(
        "--fusion",
        choices=["rrf", "relative_score"],
        help="with --mode hybrid: how the two rankings merge (default: the server's)",
    )
    search.add_argument(
        "--rrf-k", type=int, default=0, metavar="K", help="reciprocal rank fusion's k (1-1000)"
    )
    search.add_argument(
        "--rerank",
        action="store_true",
        default=None,
        help="re-score the best candidates with the server's cross-encoder",
    )
    search.add_argument("--json", action="store_true", help="print one JSON array of hits")
    search.set_defaults(func=_search)


def add_eval(sub: Any) -> None:
    """The eval command."""
    evaluate = client_command(
        sub, "eval", "retrieval quality of a queries file: recall, MRR and nDCG at k per mode"
    )
    evaluate.add_argument(
        "queries",
        type=Path,
        help='JSON Lines: {"query": "...", "relevant": ["doc-id", ...] or {"doc-id": grade}}',
    )
    evaluate.add_argument("-k", "--k", type=int, default=10, help="documents per query (10)")
    evaluate.add_argument(
        "--mode",
        action="append",
        help="dense, lexical or hybrid; repeat or comma-separate (default: all three)",
    )
    evaluate.add_argument(
        "--fusion", choices=["rrf", "relative_score"], help="hybrid's fusion (server default)"
    )
    evaluate.add_argument(
        "--rerank", action="store_true", default=None, help="re-rank every mode's candidates"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object per mode")
    evaluate.set_defaults(func=_eval)


def add_ask(sub: Any) -> None:
    """The ask command."""
    ask = client_command(sub, "ask", "ask a question; streams the answer, then the citations")
    ask.add_argument("question")
    ask.add_argument("-k", type=int, default=0, help="passages to retrieve (default 5)")
    ask.add_argument("--filter", help="metadata filter as proto JSON")
    ask.add_argument("--max-tokens", type=int, default=0)
    ask.add_argument("--json", action="store_true", help="one JSON object per streamed message")
    ask.set_defaults(func=_ask)


def add_documents(sub: Any) -> None:
    """The get and delete commands."""
    get = client_command(sub, "get", "print stored documents by id")
    get.add_argument("ids", nargs="+")
    get.add_argument("--json", action="store_true", help="print one JSON array of documents")
    get.set_defaults(func=_get)

    delete = client_command(sub, "delete", "delete documents by id and/or metadata filter")
    delete.add_argument("ids", nargs="*")
    delete.add_argument("--filter", help="metadata filter as proto JSON (as for search)")
    delete.add_argument(
        "--forget",
        action="store_true",
        help="right to erasure: also scrub the content from the files, indexes and caches "
        "so no later backup holds it, and write an audit record",
    )
    delete.set_defaults(func=_delete)


def add_embed(sub: Any) -> None:
    """The embed command."""
    embed = client_command(sub, "embed", "embed texts; prints one JSON array of floats per line")
    embed.add_argument("texts", nargs="*", help="texts to embed")
    embed.add_argument("--file", type=Path, help="embed each line of this file instead")
    embed.set_defaults(func=_embed)


def add_stats(sub: Any) -> None:
    """The stats command."""
    stats = client_command(sub, "stats", "sizes, models and version of a server")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_stats)


def _search(args: argparse.Namespace) -> int:
    options = search_options(args)
    options["by_document"] = args.by_document
    options["chunks_per_document"] = args.chunks_per_document
    with connect(args) as client:
        hits = client.search(
            args.query,
            k=args.k,
            namespace=args.namespace,
            filter=parse_filter(args.filter),
            **options,
        )
    if args.json:
        print(json_line([hit_json(h) for h in hits]))
        return 0
    for rank, hit in enumerate(hits, start=1):
        snippet = shown(" ".join(hit.text.split())[:160])
        print(f"{rank:2d}. {hit.score:.3f}  {shown(hit.chunk_id)}\n    {snippet}")
    if not hits:
        print("no hits")
    return 0


def search_options(args: argparse.Namespace) -> SearchOptions:
    """Mode, fusion and re-ranking as given; the rest left to the server."""
    options: SearchOptions = {}
    if args.mode:
        options["mode"] = args.mode
    if args.fusion:
        options["fusion"] = args.fusion
    if args.rrf_k:
        options["rrf_k"] = args.rrf_k
    if args.rerank is not None:
        options["rerank"] = args.rerank
    return options


def _eval(args: argparse.Namespace) -> int:
    from rag_grpc.evaluation import MODES, QueriesError, evaluate, load_queries, variants

    modes = [m.strip() for given in args.mode or [",".join(MODES)] for m in given.split(",")]
    modes = list(dict.fromkeys(m for m in modes if m))
    try:
        chosen = variants(modes, fusion=args.fusion or "", rerank=args.rerank)
    except ValueError as exc:
        raise UsageError(f"--mode/--fusion: {exc}") from None
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    try:
        queries = load_queries(args.queries)
    except QueriesError as exc:
        raise UsageError(str(exc)) from None
    with connect(args) as client:
        reports = evaluate(client, queries, args.k, chosen, args.namespace)
    if args.json:
        from dataclasses import asdict

        for report in reports:
            print(json_line(asdict(report)))
    else:
        k = args.k
        print(f"{len(queries)} queries, k={k}, namespace {shown(args.namespace or 'default')}")
        header = ["mode", f"recall@{k}", f"MRR@{k}", f"nDCG@{k}", "p50 ms", "p95 ms", "dup"]
        rows = [
            [
                r.label,
                f"{r.recall:.3f}",
                f"{r.mrr:.3f}",
                f"{r.ndcg:.3f}",
                f"{r.latency_p50_ms:.1f}",
                f"{r.latency_p95_ms:.1f}",
                str(r.duplicates),
            ]
            for r in reports
        ]
        print_table(header, rows)
    failed = [r for r in reports if r.error]
    for r in failed:
        print(f"rag-grpc: {r.label}: {shown(r.error or '')}", file=sys.stderr)
    return 1 if failed else 0


def _ask(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rag_grpc.generate.base import AskFinished, Citations, Delta, GenerationParams

    hits: list[Hit] = []
    with connect(args) as client:
        events = client.ask(
            args.question,
            namespace=args.namespace,
            k=args.k,
            filter=parse_filter(args.filter),
            params=GenerationParams(max_tokens=args.max_tokens),
        )
        for event in events:
            if isinstance(event, Citations):
                hits = event.hits
                if args.json:
                    cites = [
                        {"index": index, **hit_json(hit)} for index, hit in enumerate(hits, start=1)
                    ]
                    print(json_line({"citations": cites}), flush=True)
            elif isinstance(event, Delta):
                if args.json:
                    print(json_line({"delta": event.text}), flush=True)
                else:
                    print(shown(event.text, keep_lines=True), end="", flush=True)
            elif isinstance(event, AskFinished):
                if args.json:
                    usage = event.usage
                    counts = {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    }
                    summary = {
                        "usage": counts,
                        "timings": asdict(event.timings),
                        "generator": event.generator,
                        "finish_reason": event.finish_reason,
                        "cited": list(event.cited),
                    }
                    print(json_line(summary))
                else:
                    print(f"\n\n(answer by the {shown(event.generator)} generator)")
                    for index, hit in enumerate(hits, start=1):
                        if index in event.cited or not event.cited:
                            print(f"[{index}] {shown(hit.chunk_id)} (score {hit.score:.3f})")
    return 0


def _get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        found, missing = client.get(args.ids, namespace=args.namespace)
    if args.json:
        print(json_line([{"id": d.id, "text": d.text, "metadata": d.metadata} for d in found]))
    else:
        for doc in found:
            text = shown(doc.text, keep_lines=True)
            print(f"== {shown(doc.id)} {json_line(doc.metadata)}\n{text}\n")
    for doc_id in missing:
        print(f"rag-grpc: not found: {shown(doc_id)}", file=sys.stderr)
    return 1 if missing else 0


def _delete(args: argparse.Namespace) -> int:
    if not args.ids and not args.filter:
        raise UsageError("give document ids, --filter, or both")
    flt = parse_filter(args.filter) if args.filter else None
    with connect(args) as client:
        result = client.delete(args.ids, namespace=args.namespace, filter=flt, forget=args.forget)
    print(f"{'forgot' if args.forget else 'deleted'} {result.documents} document(s)")
    for doc_id in result.not_found_ids:
        print(f"rag-grpc: not found: {shown(doc_id)}", file=sys.stderr)
    return 1 if result.not_found_ids else 0


def _embed(args: argparse.Namespace) -> int:
    if args.file is not None and args.texts:
        raise UsageError("give texts or --file, not both")
    if args.file is not None:
        try:
            texts = args.file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {args.file} as UTF-8 text: {exc}") from None
    else:
        texts = list(args.texts)
    if not texts:
        raise UsageError("nothing to embed: give texts or --file")
    with connect(args) as client:
        vectors = client.embed(texts)
    for vector in vectors:
        print(json.dumps([round(float(x), 7) for x in vector]))
    return 0


def _stats(args: argparse.Namespace) -> int:
    with connect(args) as client:
        stats = client.stats()
    if args.json:
        from dataclasses import asdict

        shown_stats = asdict(stats)
        # The JSON keeps the wire's name for a namespace's generation.
        shown_stats["namespaces"] = [
            {
                "name": ns.name,
                "documents": ns.documents,
                "chunks": ns.chunks,
                "vectors": ns.vectors,
                "index_generation": ns.generation,
            }
            for ns in stats.namespaces
        ]
        print(json_line(shown_stats))
        return 0
    models = shown(", ".join(stats.models))
    print(f"rag-grpc {shown(stats.version)}; generator {shown(stats.generator)}; models {models}")
    for ns in stats.namespaces:
        print(
            f"  {shown(ns.name)}: {ns.documents} documents, {ns.chunks} chunks, "
            f"{ns.vectors} vectors"
        )
    return 0
