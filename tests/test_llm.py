"""A real LLM through Triton: llama.cpp in Triton's Python backend
(deploy/triton/models/llm) running SmolLM2-135M-Instruct, the small pinned
GGUF (deploy/triton/weights.py), behind `rag-grpc serve --generator triton`.

What a user of Ask relies on: the model's own tokens stream as they are made,
its [n] citations map to retrieved chunks, its token counts reach the
summary, max_tokens and stop strings hold, a cancelled or expired Ask frees
the model, a full queue says RESOURCE_EXHAUSTED, weights that fail their hash
never load, and Triton dying mid-answer trips the breaker and the fallback.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rag_grpc.pb import rag_pb2, rag_service_pb2_grpc
from tests.conftest import CORPUS, ServerThread, wait_for
from tests.triton_server import Triton, llm_weights

# Every test here runs Triton with the real model.
pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct-q4_1"
QUESTION = "What comes out of a volcano when it erupts?"


@pytest.fixture(scope="module")
def weights() -> tuple[Path, str]:
    """The SmolLM2 GGUF, fetched once per machine and checked against its pin."""
    return llm_weights(MODEL)


def llm_env(weights: tuple[Path, str], **extra: str) -> dict[str, str]:
    path, sha256 = weights
    return {
        "RAG_LLM_MODEL_PATH": str(path),
        "RAG_LLM_MODEL_SHA256": sha256,
        "RAG_LLM_CTX": "2048",
        "RAG_LLM_INSTANCES": "1",
        "RAG_LLM_MAX_QUEUE": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, weights: tuple[Path, str]) -> Iterator[Triton]:
    log = tmp_path_factory.mktemp("triton-llm") / "triton.log"
    # The first start on a machine compiles llama.cpp (deploy/triton/build-llama-cpp.sh).
    server = Triton(log, models="llm", env=llm_env(weights)).start(timeout=1800)
    yield server
    server.kill()


def llm_settings(url: str, fallback: bool = False, **triton: Any) -> dict[str, Any]:
    return {
        "generation": {
            "generator": "triton",
            "answer_cache_entries": 0,
            "fallback_to_extractive": fallback,
            "triton": {
                "url": url,
                "model": "llm",
                "parameters": "sampling_parameters",
                "probe_interval_s": 0.3,
                "stream_interval_ms": 0,
                **triton,
            },
        }
    }


@pytest.fixture
def rag(
    start_server: Callable[..., ServerThread], triton: Triton
) -> Callable[..., rag_service_pb2_grpc.RagServiceStub]:
    def start(**triton_overrides: Any) -> rag_service_pb2_grpc.RagServiceStub:
        from rag_grpc.client import RagClient

        server = start_server(**llm_settings(triton.url, **triton_overrides))
        client = RagClient(server.target, timeout=60)
        client.upsert(CORPUS)
        return rag_service_pb2_grpc.RagServiceStub(client.channel)

    return start


def ask(question: str = QUESTION, max_tokens: int = 0, stop: tuple[str, ...] = ()) -> Any:
    request = rag_pb2.AskRequest(question=question, k=3)
    request.parameters.max_tokens = max_tokens
    request.parameters.stop.extend(stop)
    return request


def collect(responses: Any) -> tuple[Any, list[str], list[float], Any]:
    citations, deltas, arrivals, summary = None, [], [], None
    for response in responses:
        kind = response.WhichOneof("event")
        if kind == "citations":
            citations = response.citations
        elif kind == "delta":
            deltas.append(response.delta)
            arrivals.append(time.monotonic())
        else:
            summary = response.summary
    return citations, deltas, arrivals, summary


def test_the_models_own_tokens_stream_and_its_citations_map_to_chunks(rag: Any) -> None:
    stub = rag()
    citations, deltas, arrivals, summary = collect(stub.Ask(ask(), timeout=120))
    assert summary is not None and summary.generator == "triton"
    assert len(deltas) >= 5
    assert arrivals[-1] > arrivals[0]  # incremental, not one block at the end
    answer = "".join(deltas)
    assert "lava" in answer.lower() or "ash" in answer.lower() or "gas" in answer.lower()
    # Every [n] the model wrote maps to a retrieved chunk, and it cites the volcano one.
    assert summary.cited, f"the model cited nothing: {answer!r}"
    cited = {citations.citations[n - 1].chunk_id for n in summary.cited}
    assert "volcano#0" in cited
    # The counts are the model's own (its tokenizer, its chat template).
    assert summary.usage.prompt_tokens > 100
    assert 5 <= summary.usage.completion_tokens <= 256
    assert summary.finish_reason == "stop"


def test_max_tokens_and_stop_strings_hold(rag: Any) -> None:
    stub = rag()
    _, deltas, _, summary = collect(stub.Ask(ask(max_tokens=6), timeout=120))
    assert summary.usage.completion_tokens == 6 and summary.finish_reason == "length"
    full = "".join(collect(stub.Ask(ask(), timeout=120))[1])
    word = full.split()[2]  # greedy decoding: the same answer, cut before its third word
    _, deltas, _, summary = collect(stub.Ask(ask(stop=(word,)), timeout=120))
    assert word not in "".join(deltas)
    assert full.startswith("".join(deltas).rstrip())
    assert summary.finish_reason == "stop"


def test_with_cite_every_sentence_ends_in_a_passage_number(rag: Any) -> None:
    """The `cite` sampling parameter holds decoding to sentences ending in
    ". [n]", n one of the passages given: the model cannot leave it out."""
    stub = rag(extra_parameters={"cite": True})
    citations, deltas, _, summary = collect(stub.Ask(ask(), timeout=120))
    answer = "".join(deltas)
    sentences = re.findall(r"[^\[\]]+?\. \[(\d+)\]", answer)
    assert sentences and answer.endswith("]"), answer
    assert all(1 <= int(n) <= len(citations.citations) for n in sentences)
    assert set(summary.cited) == {int(n) for n in sentences}
    assert summary.finish_reason == "stop"


LONG: dict[str, Any] = {"extra_parameters": {"ignore_eos": True}}


def long_ask(stub: Any, timeout: float) -> Any:
    return stub.Ask(ask("Describe volcanoes in great detail.", max_tokens=1500), timeout=timeout)


def test_cancelling_mid_stream_frees_the_model(rag: Any, triton: Triton) -> None:
    stub = rag(**LONG)
    cancelled = triton.metric("llm_cancelled_total", "llm")
    call = long_ask(stub, timeout=120)
    deltas = 0
    for response in call:
        deltas += response.WhichOneof("event") == "delta"
        if deltas == 5:
            break
    assert triton.metric("llm_active_requests", "llm") == 1
    call.cancel()
    wait_for(lambda: triton.metric("llm_active_requests", "llm") == 0)
    assert triton.metric("llm_cancelled_total", "llm") == cancelled + 1


def test_a_deadline_shorter_than_the_answer_is_deadline_exceeded(rag: Any, triton: Triton) -> None:
    stub = rag(**LONG)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        collect(long_ask(stub, timeout=3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 8
    wait_for(lambda: triton.metric("llm_active_requests", "llm") == 0)


def test_past_the_queue_bound_ask_is_resource_exhausted(rag: Any, triton: Triton) -> None:
    """One context and a queue of one: a third concurrent Ask is refused at
    once, and the two admitted ones are unaffected."""
    stub = rag(**LONG)
    rejected = triton.metric("llm_rejected_total", "llm")
    first = long_ask(stub, timeout=120)
    next(iter(first))  # its citations: the request is on its way to Triton
    wait_for(lambda: triton.metric("llm_active_requests", "llm") == 1)
    second = long_ask(stub, timeout=120)
    wait_for(lambda: triton.metric("llm_queued_requests", "llm") == 1)
    with pytest.raises(grpc.RpcError) as info:
        collect(long_ask(stub, timeout=60))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RAG_LLM_MAX_QUEUE" in (info.value.details() or "")
    assert triton.metric("llm_rejected_total", "llm") == rejected + 1
    first.cancel()
    # The queued one moves up to the free context and generates.
    deltas = 0
    for response in second:
        deltas += response.WhichOneof("event") == "delta"
        if deltas == 3:
            break
    second.cancel()
    wait_for(lambda: triton.metric("llm_active_requests", "llm") == 0)
    assert triton.metric("llm_queued_requests", "llm") == 0


def test_a_prompt_longer_than_the_context_is_invalid_argument(
    start_server: Callable[..., ServerThread], weights: tuple[Path, str], tmp_path: Path
) -> None:
    """The model's refusal travels inside the stream as words only; it still
    reaches the caller as INVALID_ARGUMENT, and the model serves on."""
    small = Triton(tmp_path / "triton.log", models="llm", env=llm_env(weights, RAG_LLM_CTX="256"))
    small.start(timeout=600)
    try:
        from rag_grpc.client import RagClient

        server = start_server(tmp_path / "data", **llm_settings(small.url))
        client = RagClient(server.target, timeout=60)
        client.upsert(CORPUS)
        stub = rag_service_pb2_grpc.RagServiceStub(client.channel)
        long_question = "What comes out of a volcano " + "and its crater " * 60 + "?"
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Ask(ask(long_question), timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "RAG_LLM_CTX" in (info.value.details() or "")
        # Not a Triton failure: the circuit stays closed and a short prompt is answered.
        _, deltas, _, summary = collect(stub.Ask(ask("Volcano?", max_tokens=4), timeout=60))
        assert summary.generator == "triton" and deltas
    finally:
        small.kill()


def test_weights_failing_their_hash_never_load(weights: tuple[Path, str], tmp_path: Path) -> None:
    wrong = "0" * 64
    log = tmp_path / "triton.log"
    triton = Triton(log, models="llm", env=llm_env(weights, RAG_LLM_MODEL_SHA256=wrong))
    with pytest.raises(AssertionError):
        triton.start(timeout=120)  # Triton exits: its only model failed to load
    triton.kill()
    text = log.read_text()
    assert f"refusing {weights[0]}" in text
    assert weights[1] in text and wrong in text


def test_triton_killed_mid_answer_trips_the_breaker_and_the_fallback_answers(
    start_server: Callable[..., ServerThread], weights: tuple[Path, str], tmp_path: Path
) -> None:
    own = Triton(tmp_path / "triton.log", models="llm", env=llm_env(weights)).start(timeout=600)
    try:
        strict = start_server(
            tmp_path / "strict", **llm_settings(own.url, breaker_failures=1, **LONG)
        )
        lenient = start_server(tmp_path / "lenient", **llm_settings(own.url, fallback=True))
        from rag_grpc.client import RagClient

        clients = [RagClient(s.target, timeout=60) for s in (strict, lenient)]
        for client in clients:
            client.upsert(CORPUS)
        stubs = [rag_service_pb2_grpc.RagServiceStub(c.channel) for c in clients]
        call = long_ask(stubs[0], timeout=120)
        deltas = 0
        with pytest.raises(grpc.RpcError) as info:
            for response in call:
                deltas += response.WhichOneof("event") == "delta"
                if deltas == 3:
                    own.kill()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "mid-answer" in (info.value.details() or "")
        # The breaker is open now: the next Ask fails at once, without waiting on Triton.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as again:
            collect(stubs[0].Ask(ask(), timeout=60))
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
        # With the fallback, the same question is answered extractively.
        _, deltas_list, _, summary = collect(stubs[1].Ask(ask(), timeout=60))
        assert summary.generator == "extractive" and summary.cited and deltas_list
    finally:
        own.kill()
