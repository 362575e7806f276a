"""Answer quality of Ask per generator, on the demo corpus (CPython's pydoc topics).

    python -m bench.answers [--generators extractive llm]
        [--model qwen2.5-coder-0.5b-instruct-q4_k_m] [--limit N] [--k 5] [--no-cite]
        [--no-record]

Questions and the rules that score each answer: bench/answer_scoring.py.

Each generator gets its own `rag-grpc serve` over one data dir seeded with the
demo corpus (rag_grpc.demo.pydoc_topics, as `--seed-demo` seeds it) through
Upsert, and every question goes once through Ask (streaming), one at a time,
with k passages, temperature 0 and the answer cache off:

- extractive: the server's default generator.
- llm: deploy/triton/serve.sh --models llm with the GGUF from
  deploy/triton/weights.py (--model), and rag-grpc --generator triton
  --triton-model llm (sampling parameters as one JSON input), with the
  model's `cite` parameter on as make serve-llm sets it (--no-cite: off).

Time to first token: from sending Ask to the first answer text, at the
client (retrieval included). tokens/s: completion tokens (the Ask summary's
usage) / the summary's generate time, summed over questions.

Per-question rows, answer texts included, go to bench/results/answers-*.json;
the table goes to bench/RESULTS.md (not with --no-record).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.answer_scoring import (
    Question,
    abstains,
    cited_numbers,
    contains_run,
    fold,
    load_questions,
    supports,
    token_f1,
    tokens,
)
from bench.common import BENCH_DIR, command_line, free_port, record, table
from bench.load import start_server
from rag_grpc.client import RagClient
from rag_grpc.demo import pydoc_topics
from rag_grpc.documents import Hit
from rag_grpc.generate.base import AskFinished, Citations, Delta, GenerationParams

ROOT = BENCH_DIR.parent


@dataclass(frozen=True)
class Outcome:
    """What one Ask gave for one question, scored."""

    id: str
    question: str
    answerable: bool
    gold: str
    answer: str
    generator: str
    finish_reason: str
    correct: bool
    f1: float
    cited: tuple[int, ...]
    supporting: tuple[int, ...]
    support_retrieved: bool
    abstained: bool
    passages: tuple[str, ...]
    first_token_s: float
    total_s: float
    generate_s: float
    completion_tokens: int
    prompt_tokens: int


def ask(client: RagClient, q: Question, k: int, params: GenerationParams) -> Outcome:
    """One streaming Ask, timed and scored."""
    started = time.perf_counter()
    first: float | None = None
    citations: list[Hit] = []
    pieces: list[str] = []
    summary: AskFinished | None = None
    for event in client.ask(q.question, k=k, params=params):
        if isinstance(event, Citations):
            citations = event.hits
        elif isinstance(event, Delta):
            if first is None and event.text.strip():
                first = time.perf_counter()
            pieces.append(event.text)
        else:
            summary = event
    done = time.perf_counter()
    assert summary is not None, "Ask ended without a summary"
    answer = "".join(pieces).strip()
    passages = {n: h.text for n, h in enumerate(citations, start=1)}
    cited = cited_numbers(answer)
    supporting: tuple[int, ...] = ()
    correct, f1, retrieved = False, 0.0, False
    if q.answerable:
        supporting = tuple(n for n in cited if n in passages and supports(passages[n], q.support))
        retrieved = any(supports(text, q.support) for text in passages.values())
        said = tokens(answer)
        references = [tokens(r) for r in (q.answer, *q.variants)]
        correct = any(contains_run(said, r) for r in references)
        f1 = max(token_f1(said, r) for r in references) if said else 0.0
    return Outcome(
        q.id,
        q.question,
        q.answerable,
        q.answer,
        answer,
        summary.generator,
        summary.finish_reason,
        correct,
        f1,
        cited,
        supporting,
        retrieved,
        abstains(answer, summary.finish_reason),
        tuple(f"{n} {h.document_id} {h.chunk_id}" for n, h in enumerate(citations, start=1)),
        (first if first is not None else done) - started,
        done - started,
        summary.timings.generate_ms / 1000,
        summary.usage.completion_tokens,
        summary.usage.prompt_tokens,
    )


@contextlib.contextmanager
def llm_triton(work: Path, model: str) -> Iterator[str]:
    """Triton serving the `llm` model with the named GGUF; yields its gRPC HOST:PORT."""
    from tests.triton_server import Triton, llm_weights

    path, sha256 = llm_weights(model)
    env = {"RAG_LLM_MODEL_PATH": str(path), "RAG_LLM_MODEL_SHA256": sha256}
    # Explicit model control: Triton is ready once the model has loaded.
    triton = Triton(work / "triton.log", models="llm", env=env).start(timeout=900)
    try:
        yield triton.url
    finally:
        triton.kill()


@contextlib.contextmanager
def rag_server(work: Path, env: dict[str, str]) -> Iterator[str]:
    """`rag-grpc serve` on the shared data dir with the demo corpus in it; yields its target."""
    port = free_port()
    server = start_server(
        work / "data",
        port,
        work / f"server-{port}.log",
        "retrieval,embedding,rag",
        # Every question once per generator, but no replays from a cache either way.
        {"RAG_GRPC_GENERATION__ANSWER_CACHE_ENTRIES": "0", **env},
    )
    try:
        with RagClient(f"127.0.0.1:{port}", timeout=600) as client:
            # Synchronous: the corpus is searchable when this returns; the second
            # server finds the documents unchanged and embeds nothing.
            client.upsert(pydoc_topics())
        yield f"127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def run_arm(
    target: str, questions: list[Question], k: int, params: GenerationParams
) -> list[Outcome]:
    """Every question once through Ask, one at a time, after one unrecorded Ask."""
    outcomes = []
    with RagClient(target, timeout=600) as client:
        for _ in client.ask("What is a docstring?", k=k, params=params):
            pass
        for q in questions:
            outcome = ask(client, q, k, params)
            print(
                f"  {q.id} {'ok ' if outcome.correct else '-- '}{outcome.total_s:5.1f} s  "
                f"{fold(outcome.answer)[:90]}",
                flush=True,
            )
            outcomes.append(outcome)
    return outcomes


def summarise(outcomes: list[Outcome]) -> dict[str, float]:
    """The figures of one generator's run."""
    answerable = [o for o in outcomes if o.answerable]
    unanswerable = [o for o in outcomes if not o.answerable]
    citations = sum(len(o.cited) for o in answerable)

    def share(rows: list[Outcome], test: str) -> float:
        return float(np.mean([getattr(o, test) for o in rows])) if rows else float("nan")

    generate_s = sum(o.generate_s for o in outcomes)
    return {
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "correct": share(answerable, "correct"),
        "f1": share(answerable, "f1"),
        "citation_precision": (
            sum(len(o.supporting) for o in answerable) / citations if citations else float("nan")
        ),
        "cited_answers": float(np.mean([bool(o.cited) for o in outcomes])),
        "support_retrieved": share(answerable, "support_retrieved"),
        "abstention": share(unanswerable, "abstained"),
        "false_abstention": share(answerable, "abstained"),
        "first_token_p50_ms": float(np.percentile([o.first_token_s for o in outcomes], 50) * 1e3),
        "ask_p50_s": float(np.percentile([o.total_s for o in outcomes], 50)),
        "tokens_per_s": (
            sum(o.completion_tokens for o in outcomes) / generate_s if generate_s else float("nan")
        ),
        "total_s": sum(o.total_s for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--generators", nargs="+", choices=["extractive", "llm"], default=["extractive", "llm"]
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct-q4_k_m")
    parser.add_argument("--limit", type=int, default=0, help="the first N questions of each kind")
    parser.add_argument("--k", type=int, default=5, help="passages per Ask")
    parser.add_argument("--max-tokens", type=int, default=256, help="the server's default")
    parser.add_argument(
        "--no-cite", action="store_true", help="let the llm model write or skip [n] freely"
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    questions = load_questions()
    if args.limit:
        questions = [q for q in questions if q.answerable][: args.limit] + [
            q for q in questions if not q.answerable
        ][: args.limit]
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
    work = Path(tempfile.mkdtemp(prefix="rag-answers-bench-"))
    results: dict[str, list[Outcome]] = {}
    names: dict[str, str] = {"extractive": "extractive"}
    try:
        for generator in args.generators:
            print(f"{generator}:", flush=True)
            with contextlib.ExitStack() as stack:
                env: dict[str, str] = {}
                if generator == "llm":
                    url = stack.enter_context(llm_triton(work, args.model))
                    env = {
                        "RAG_GRPC_GENERATION__GENERATOR": "triton",
                        "RAG_GRPC_GENERATION__TRITON__URL": url,
                        "RAG_GRPC_GENERATION__TRITON__MODEL": "llm",
                        "RAG_GRPC_GENERATION__TRITON__PARAMETERS": "sampling_parameters",
                        "RAG_GRPC_GENERATION__TRITON__TIMEOUT_S": "600",
                        # As make serve-llm: sentences held to end in ". [n]".
                        "RAG_GRPC_GENERATION__TRITON__EXTRA_PARAMETERS": json.dumps(
                            {"cite": not args.no_cite}
                        ),
                    }
                    names["llm"] = f"llm ({args.model}, Triton{'' if args.no_cite else ', cite'})"
                target = stack.enter_context(rag_server(work, env))
                results[generator] = run_arm(target, questions, args.k, params)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {g: summarise(rows) for g, rows in results.items()}
    headers = [
        "generator",
        "correct",
        "F1",
        "citation precision",
        "answers citing",
        "support retrieved",
        "abstains (unanswerable)",
        "false abstention",
        "first token p50 ms",
        "tokens/s",
        "total s",
    ]
    keys = [
        "correct",
        "f1",
        "citation_precision",
        "cited_answers",
        "support_retrieved",
        "abstention",
        "false_abstention",
        "first_token_p50_ms",
        "tokens_per_s",
        "total_s",
    ]
    rows = [[names[g], *(f[key] for key in keys)] for g, f in figures.items()]
    answerable = sum(q.answerable for q in questions)
    body = "\n\n".join(
        [
            f"{answerable} answerable and {len(questions) - answerable} unanswerable questions "
            f"(bench/answers_questions.json) through Ask, one at a time, k={args.k} passages, "
            f"max_tokens {args.max_tokens}, temperature 0, answer cache off; the demo corpus "
            "(CPython's pydoc topics). correct: the gold answer or a variant in the answer; "
            "F1: SQuAD token F1; citation precision: cited passages that hold the support; "
            "support retrieved: some passage given holds it (the ceiling). Rules in "
            "bench/answer_scoring.py.",
            table(headers, rows),
        ]
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = BENCH_DIR / "results"
    out.mkdir(exist_ok=True)
    detail = out / f"answers-{stamp}.json"
    detail.write_text(
        json.dumps(
            {
                "command": command_line(),
                "figures": figures,
                "questions": {g: [dataclasses.asdict(o) for o in r] for g, r in results.items()},
            },
            indent=2,
        )
    )
    print(f"per-question rows: {detail}")
    record(
        "Answer quality: extractive vs LLM",
        command_line(),
        ", ".join(names[g] for g in results),
        body,
        {"figures": figures, "detail": str(detail.relative_to(ROOT))},
        save=not args.no_record,
    )


if __name__ == "__main__":
    main()
