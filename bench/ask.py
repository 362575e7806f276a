"""Ask and Generate through Triton: rag-grpc's own overhead on top of Triton.

    python -m bench.ask [--requests 200] [--token-delay-ms 0]

Starts Triton (deploy/triton/serve.sh, the demo model) and `rag-grpc serve
--generator triton`, then, one request at a time:

1. Generate through rag-grpc vs the same prompts sent straight to Triton with
   tritonclient (stream_infer), side by side: the difference is rag-grpc's
   overhead (prompt building, token counting, the extra gRPC hop).
2. Ask end to end: latency, time to first token, retrieval time, beside
   Triton's own time for the same request from its statistics; overhead =
   Ask latency - retrieval - Triton's time, per request.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import BENCH_DIR, command_line, free_port, record, table
from bench.load import start_server
from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from rag_grpc.generate.base import AskFinished, Citations, Delta, GenerationParams, Passage
from rag_grpc.generate.prompt import PromptBuilder
from rag_grpc.pb import common_pb2, generation_pb2, generation_service_pb2_grpc

ROOT = BENCH_DIR.parent
TOKENIZER = ROOT / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"


class TritonTime:
    """Triton's own time for the one request just made, from its statistics.

    Requests go one at a time, so the change in the model's cumulative
    success time around a request is that request's time inside Triton
    (from receiving it to releasing it, its gRPC frontend excluded).
    """

    def __init__(self, url: str, model: str) -> None:
        from tritonclient.grpc import InferenceServerClient

        self.client = InferenceServerClient(url)
        self.model = model
        self.last = self._read()

    def _read(self) -> tuple[int, int]:
        stats = self.client.get_inference_statistics(self.model, as_json=True)
        success = stats["model_stats"][0]["inference_stats"]["success"]
        return int(success.get("count", 0)), int(success.get("ns", 0))

    def take(self) -> float:
        """Seconds Triton spent on the request made since the last call."""
        # Triton counts a decoupled request when it releases it, which can be
        # a moment after the client has the last response.
        deadline = time.monotonic() + 5
        now = self._read()
        while now[0] == self.last[0] and time.monotonic() < deadline:
            time.sleep(0.001)
            now = self._read()
        count, ns = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        assert count == 1, f"expected one Triton request, saw {count}"
        return ns / 1e9


class DirectTriton:
    """The same prompts streamed straight from Triton with tritonclient's asyncio client."""

    def __init__(self, url: str, max_tokens: int) -> None:
        # The client's loop runs all the time in its own thread: an asyncio
        # gRPC channel whose loop sits idle between calls can stall.
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self._run(self._client(url))
        self.max_tokens = max_tokens

    def _run(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    @staticmethod
    async def _client(url: str):  # type: ignore[no-untyped-def]
        from tritonclient.grpc.aio import InferenceServerClient

        return InferenceServerClient(url)

    def __call__(self, prompt: str) -> float:
        """Seconds to stream the whole answer, timed inside the client's loop."""
        return float(self._run(self._one(prompt)))

    async def _one(self, prompt: str) -> float:
        from tritonclient.grpc import InferInput

        text = InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        stream = InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        limit = InferInput("max_tokens", [1], "INT32")
        limit.set_data_from_numpy(np.array([self.max_tokens], dtype=np.int32))

        async def requests():  # type: ignore[no-untyped-def]
            yield {"model_name": "rag_llm", "inputs": [text, stream, limit]}

        started = time.perf_counter()
        pieces = []
        async for result, error in self.client.stream_infer(requests()):
            assert error is None, error
            pieces.append(result.as_numpy("text_output"))
        return time.perf_counter() - started

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def generate_request(
    question: str, passages: list[Passage], max_tokens: int
) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=question,
        context=[
            common_pb2.ContextPassage(document_id=p.document_id, chunk_id=p.chunk_id, text=p.text)
            for p in passages
        ],
        parameters=common_pb2.GenerationParameters(max_tokens=max_tokens),
    )


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from pydoc_data.topics import topics

    from tests.triton_server import Triton

    work = Path(tempfile.mkdtemp(prefix="rag-ask-bench-"))
    triton = Triton(work / "triton.log", token_delay_ms=args.token_delay_ms).start(timeout=600)
    port = free_port()
    server = start_server(
        work / "data",
        port,
        work / "server.log",
        "retrieval,embedding,generation,rag,ingestion,admin",
        {
            "RAG_GRPC_GENERATION__GENERATOR": "triton",
            "RAG_GRPC_GENERATION__TRITON__URL": triton.url,
            "RAG_GRPC_EMBEDDING__CACHE_BYTES": "0",
            # Every Ask goes to Triton: the rounds repeat questions.
            "RAG_GRPC_GENERATION__ANSWER_CACHE_ENTRIES": "0",
        },
    )
    names = sorted(topics)
    docs = [Document(name, topics[name][:4000], {}) for name in names[:40]]
    questions = [f"What does the {name} statement or topic do?" for name in names[:40]]
    params = GenerationParams(max_tokens=args.max_tokens)
    builder = PromptBuilder(TOKENIZER, load_template(), 1500)
    # Per request: (total, first token, retrieval, Triton) for Ask;
    # (total, Triton) for Generate through rag-grpc and for direct tritonclient.
    asks: list[tuple[float, float, float, float]] = []
    ours: list[tuple[float, float]] = []
    direct: list[tuple[float, float]] = []
    hops: list[float] = []
    target = f"127.0.0.1:{port}"
    try:
        with (
            RagClient(target, timeout=120) as client,
            grpc.insecure_channel(target) as channel,
        ):
            client.upsert(docs)
            generation = generation_service_pb2_grpc.GenerationServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            triton_time = TritonTime(triton.url, "rag_llm")
            straight = DirectTriton(triton.url, args.max_tokens)
            # The three paths take turns on each question, so drift hits all alike.
            for i in range(args.warmup + args.requests):
                question = questions[i % len(questions)]
                started = time.perf_counter()
                first = None
                summary = None
                passages: list[Passage] = []
                for event in client.ask(question, k=3, params=params):
                    if isinstance(event, Citations):
                        passages = [Passage(h.document_id, h.chunk_id, h.text) for h in event.hits]
                    elif isinstance(event, Delta) and first is None:
                        first = time.perf_counter()
                    elif isinstance(event, AskFinished):
                        summary = event
                done = time.perf_counter()
                assert summary is not None and first is not None
                retrieval = summary.timings.retrieve_ms / 1000
                ask = (done - started, first - started, retrieval, triton_time.take())

                request = generate_request(question, passages, args.max_tokens)
                started = time.perf_counter()
                for _ in generation.Generate(request, timeout=30):
                    pass
                generate = (time.perf_counter() - started, triton_time.take())

                prompt = builder.build(question, passages)[0]
                plain = (straight(prompt), triton_time.take())

                started = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                hop = time.perf_counter() - started
                if i >= args.warmup:
                    asks.append(ask)
                    ours.append(generate)
                    direct.append(plain)
                    hops.append(hop)
            straight.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        triton.kill()
        shutil.rmtree(work, ignore_errors=True)

    def column(rows: Sequence[tuple[float, ...]], i: int) -> list[float]:
        return [r[i] for r in rows]

    generate_own = [total - inside for total, inside in ours]
    direct_own = [total - inside for total, inside in direct]
    ask_own = [total - retrieval - inside for total, _, retrieval, inside in asks]

    def row(name: str, values: list[float]) -> list[object]:
        return [name, ms(values, 50), ms(values, 99)]

    generate_rows = [
        row("Generate through rag-grpc", column(ours, 0)),
        row("  Triton's own time for those requests", column(ours, 1)),
        row("  rag-grpc overhead (total - Triton, per request)", generate_own),
        row("same prompts straight to Triton (tritonclient)", column(direct, 0)),
        row("  Triton's own time for those requests", column(direct, 1)),
        row("  tritonclient + Triton frontend (total - Triton)", direct_own),
    ]
    ask_rows = [
        row("Ask total", column(asks, 0)),
        row("Ask time to first token", column(asks, 1)),
        row("retrieval (embed + search) inside Ask", column(asks, 2)),
        row("Triton's own time for those requests", column(asks, 3)),
        row("Ask - retrieval - Triton = rag-grpc overhead", ask_own),
        row("for scale: one empty unary call to rag-grpc (Health/Check)", hops),
    ]
    body = "\n\n".join(
        [
            f"{args.requests} rounds one request at a time (after {args.warmup} unrecorded), "
            "each round an Ask, a Generate through rag-grpc with the passages that Ask "
            "retrieved, and the same prompt straight to Triton; Triton 2.51 (CPU, Python "
            f"backend, the demo model rag_llm, {args.token_delay_ms:g} ms per word), "
            f"max_tokens {args.max_tokens}, k=3 passages of CPython's pydoc topics; "
            "Triton's time per request is the change in its statistics around that "
            "request; rag-grpc and Triton on the same 2 cores.",
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
