"""Ask and Generate through Triton: rag-grpc's own overhead on top of Triton.

    python -m bench.ask [--requests 200] [--token-delay-ms 0]

Starts Triton (deploy/triton/serve.sh, the demo model) and `rag-grpc serve
--generator triton`, then, one request at a time:

1. Generate through rag-grpc vs the same prompts sent straight to Triton with
   tritonclient (stream_infer), side by side: the difference is rag-grpc's
   overhead (prompt building, token counting, the extra gRPC hop).
2. Ask end to end: latency, time to first token, retrieval time, beside
   Triton's own mean request duration from its statistics for the same
   requests; overhead = Ask latency - retrieval - Triton's time.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import BENCH_DIR, command_line, record, table
from bench.load import start_server
from rag_grpc.client import AskSummary, RagClient
from rag_grpc.documents import Document
from rag_grpc.generate.base import Passage
from rag_grpc.generate.triton import PromptBuilder
from rag_grpc.pb import common_pb2, generation_pb2, generation_service_pb2_grpc

ROOT = BENCH_DIR.parent
TOKENIZER = ROOT / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"


async def triton_stats(url: str, model: str) -> tuple[int, int]:
    """(successful requests, their total nanoseconds) from Triton's statistics."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    try:
        stats = await client.get_inference_statistics(model, as_json=True)
    finally:
        await client.close()
    success = stats["model_stats"][0]["inference_stats"]["success"]
    return int(success.get("count", 0)), int(success.get("ns", 0))


async def direct_triton(url: str, prompts: list[str], max_tokens: int) -> list[float]:
    """Seconds per prompt, streamed straight from Triton with tritonclient."""
    from tritonclient.grpc import InferInput
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    latencies = []
    try:
        for prompt in prompts:
            text = InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
            stream = InferInput("stream", [1], "BOOL")
            stream.set_data_from_numpy(np.array([True]))
            limit = InferInput("max_tokens", [1], "INT32")
            limit.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))

            async def requests(inputs=(text, stream, limit)):  # type: ignore[no-untyped-def]
                yield {"model_name": "rag_llm", "inputs": list(inputs)}

            started = time.perf_counter()
            pieces = []
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                pieces.append(result.as_numpy("text_output"))
            latencies.append(time.perf_counter() - started)
    finally:
        await client.close()
    return latencies


def through_rag_grpc(
    target: str, cases: list[tuple[str, list[Passage]]], max_tokens: int
) -> list[float]:
    latencies = []
    with grpc.insecure_channel(target) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        for question, passages in cases:
            request = generation_pb2.GenerateRequest(
                prompt=question,
                context=[
                    common_pb2.ContextPassage(
                        document_id=p.document_id, chunk_id=p.chunk_id, text=p.text
                    )
                    for p in passages
                ],
                parameters=common_pb2.GenerationParameters(max_tokens=max_tokens),
            )
            started = time.perf_counter()
            for _ in stub.Generate(request, timeout=30):
                pass
            latencies.append(time.perf_counter() - started)
    return latencies


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from pydoc_data.topics import topics

    from tests.conftest import free_port
    from tests.test_triton import Triton

    work = Path(tempfile.mkdtemp(prefix="rag-ask-bench-"))
    triton = Triton(work / "triton.log", token_delay_ms=args.token_delay_ms).start(timeout=600)
    triton_url = triton.url
    port = free_port()
    server = start_server(
        work / "data",
        port,
        work / "server.log",
        "retrieval,embedding,generation,rag,ingestion,admin",
        {
            "RAG_GRPC_GENERATION__GENERATOR": "triton",
            "RAG_GRPC_GENERATION__TRITON__URL": triton_url,
            "RAG_GRPC_EMBEDDING__CACHE_BYTES": "0",
        },
    )
    try:
        target = f"127.0.0.1:{port}"
        names = sorted(topics)
        docs = [Document(name, topics[name][:4000], {}) for name in names[:40]]
        questions = [f"What does the {name} statement or topic do?" for name in names[:40]]
        with RagClient(target, timeout=120) as client:
            client.upsert(docs)
            asks = []
            before = asyncio.run(triton_stats(triton_url, "rag_llm"))
            for i in range(args.requests):
                started = time.perf_counter()
                first = None
                summary = None
                passages: list[Passage] = []
                for event in client.ask(questions[i % len(questions)], k=3):
                    if isinstance(event, list):
                        passages = [
                            Passage(c.hit.document_id, c.hit.chunk_id, c.hit.text) for c in event
                        ]
                    elif isinstance(event, str) and first is None:
                        first = time.perf_counter()
                    elif isinstance(event, AskSummary):
                        summary = event
                done = time.perf_counter()
                assert summary is not None and first is not None
                asks.append(
                    (
                        done - started,
                        first - started,
                        summary.timings["retrieve_ms"] / 1000,
                        passages,
                    )
                )
            after = asyncio.run(triton_stats(triton_url, "rag_llm"))
        triton_mean = (after[1] - before[1]) / max(1, after[0] - before[0]) / 1e9
        cases = [(questions[i % len(questions)], asks[i][3]) for i in range(args.requests)]
        builder = PromptBuilder(TOKENIZER, load_template(), 1500)
        prompts = [builder.build(q, p)[0] for q, p in cases]
        # Side by side, alternating halves so drift hits both alike.
        half = len(cases) // 2
        ours = through_rag_grpc(target, cases[:half], args.max_tokens)
        direct = asyncio.run(direct_triton(triton_url, prompts[:half], args.max_tokens))
        ours += through_rag_grpc(target, cases[half:], args.max_tokens)
        direct += asyncio.run(direct_triton(triton_url, prompts[half:], args.max_tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        triton.kill()
        shutil.rmtree(work, ignore_errors=True)
    totals = [a[0] for a in asks]
    ttft = [a[1] for a in asks]
    retrieval = [a[2] for a in asks]
    own = [a[0] - a[2] - triton_mean for a in asks]
    generate_rows = [
        ["Generate through rag-grpc", ms(ours, 50), ms(ours, 99)],
        ["same prompts straight to Triton (tritonclient)", ms(direct, 50), ms(direct, 99)],
        [
            "difference = rag-grpc overhead",
            ms(ours, 50) - ms(direct, 50),
            ms(ours, 99) - ms(direct, 99),
        ],
    ]
    ask_rows = [
        ["Ask total", ms(totals, 50), ms(totals, 99)],
        ["Ask time to first token", ms(ttft, 50), ms(ttft, 99)],
        ["retrieval (embed + search) inside Ask", ms(retrieval, 50), ms(retrieval, 99)],
        ["Triton's own mean request time (its statistics)", triton_mean * 1000, triton_mean * 1000],
        ["Ask - retrieval - Triton = rag-grpc overhead", ms(own, 50), ms(own, 99)],
    ]
    body = "\n\n".join(
        [
            f"{args.requests} requests one at a time; Triton 2.51 (CPU, Python backend, the "
            f"demo model rag_llm, {args.token_delay_ms:g} ms per word), max_tokens "
            f"{args.max_tokens}, k=3 passages of CPython's pydoc topics; rag-grpc and Triton on "
            "the same 2 cores.",
            "Generate (ms):\n\n" + table(["path", "p50", "p99"], generate_rows),
            "Ask (ms):\n\n" + table(["measure", "p50", "p99"], ask_rows),
        ]
    )
    record(
        "Ask and Generate through Triton",
        command_line(),
        "Triton Inference Server 2.51 (nvidia-pytriton 0.7.0) called directly with tritonclient",
        body,
        {"generate": generate_rows, "ask": ask_rows},
        save=not args.no_record,
    )


def load_template() -> str:
    from rag_grpc.config import load_settings

    return load_settings(None).generation.prompt_template


if __name__ == "__main__":
    main()
