"""Generation through a real Triton Inference Server (deploy/triton/serve.sh,
the demo model repository): streaming, citations, cancellation, deadlines,
Triton going away and coming back, readiness in health.

Why one file of ~450 lines: every test is one behaviour of rag-grpc with
its generator on Triton, end to end, and they share this module's Triton,
the settings that point rag-grpc at it, and the long-Ask and health
helpers; split, the halves would import them from each other."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient, RpcError
from rag_grpc.generate.base import AskFinished, Citations, Delta
from rag_grpc.pb import (
    common_pb2,
    generation_pb2,
    generation_service_pb2_grpc,
    rag_pb2,
    rag_service_pb2_grpc,
)
from tests.conftest import (
    CORPUS,
    ServerProcess,
    ServerThread,
    ask_summary,
    health_status,
    wait_for,
)
from tests.triton_server import TOKEN_DELAY_MS, Triton

# Every test here starts Triton (the prompt and the breaker alone: tests/generate/).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    server = Triton(tmp_path_factory.mktemp("triton") / "triton.log").start()
    yield server
    server.kill()


def triton_settings(url: str, **generation: Any) -> dict[str, Any]:
    triton = {"url": url, "probe_interval_s": 0.3, **generation.pop("triton", {})}
    # These tests ask the same questions to see Triton's failures: no replays.
    generation.setdefault("answer_cache_entries", 0)
    return {"generation": {"generator": "triton", "triton": triton, **generation}}


@pytest.fixture
def rag(
    start_server: Callable[..., ServerThread], triton: Triton
) -> Callable[..., tuple[ServerThread, RagClient]]:
    def start(**generation: Any) -> tuple[ServerThread, RagClient]:
        server = start_server(**triton_settings(triton.url, **generation))
        client = RagClient(server.target, timeout=60)
        client.upsert(CORPUS)
        return server, client

    return start


def test_answers_stream_incrementally_and_cite_retrieved_chunks(rag: Callable[..., Any]) -> None:
    _, client = rag()
    arrivals: list[float] = []
    pieces: list[str] = []
    citations: list[Any] = []
    summary: AskFinished | None = None
    for event in client.ask("What comes out of a volcano when it erupts?", k=3):
        if isinstance(event, Citations):
            citations = event.hits
        elif isinstance(event, Delta):
            arrivals.append(time.monotonic())
            pieces.append(event.text)
        else:
            summary = event
    assert summary is not None and summary.generator == "triton"
    # Word by word as Triton produces them: the first arrived long before the last.
    assert len(pieces) > 10
    assert arrivals[-1] - arrivals[0] > 5 * TOKEN_DELAY_MS / 1000
    answer = "".join(pieces)
    assert "volcano" in answer.lower() and "[1]" in answer
    # Every [n] maps back to a retrieved chunk, and the volcano chunk is cited.
    cited = {citations[n - 1].chunk_id for n in summary.cited}
    assert "volcano#0" in cited and summary.cited[0] == 1
    assert summary.usage.prompt_tokens > 50 and summary.usage.completion_tokens > 10
    assert summary.timings.first_token_ms < summary.timings.generate_ms
    # Usage and the backend's state add up in Stats.
    from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc

    stub = admin_service_pb2_grpc.AdminServiceStub(client.channel)
    generation = stub.Stats(admin_pb2.StatsRequest(), timeout=10).generation
    assert (generation.name, generation.ready, generation.circuit) == ("triton", True, "closed")
    assert generation.generations == 1 and generation.failures == 0
    assert generation.prompt_tokens == summary.usage.prompt_tokens
    assert generation.completion_tokens == summary.usage.completion_tokens


def test_stream_interval_merges_fast_tokens_without_changing_the_answer(
    rag: Callable[..., Any],
) -> None:
    """Text arriving within stream_interval_ms of the last delta goes out as
    one message; the first delta is not held back and the answer is the same."""

    def deltas(interval_ms: float) -> tuple[list[str], float, float]:
        _, client = rag(triton={"stream_interval_ms": interval_ms})
        started = time.monotonic()
        pieces: list[str] = []
        first = 0.0
        for event in client.ask("What comes out of a volcano when it erupts?", k=3):
            if isinstance(event, Delta):
                first = first or time.monotonic() - started
                pieces.append(event.text)
        return pieces, first, time.monotonic() - started

    word_by_word, _, _ = deltas(0)
    merged, first, total = deltas(5 * TOKEN_DELAY_MS)
    assert "".join(merged) == "".join(word_by_word)
    # One message per word at 0; about one per five words at 5 words' time.
    assert len(word_by_word) > 10
    assert 1 < len(merged) <= len(word_by_word) // 3
    assert first < total / 3


def test_serve_flags_select_triton(
    server_process: Callable[..., ServerProcess], triton: Triton, tmp_path: Path
) -> None:
    proc = server_process(
        tmp_path / "data",
        "--generator",
        "triton",
        "--triton-url",
        triton.url,
        "--triton-model",
        "rag_llm",
    )
    with RagClient(proc.target, timeout=60) as client:
        client.upsert(CORPUS)
        summary = ask_summary(client.ask("What is espresso?"))
        assert summary.generator == "triton" and summary.cited
        assert client.stats().generator == "triton"


def test_generate_without_streaming_uses_model_infer(
    rag: Callable[..., Any], triton: Triton
) -> None:
    server, _ = rag(triton={"model": "rag_llm_sync", "streaming": False})
    served_before = triton.metric("nv_inference_request_success", "rag_llm_sync")
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(
            prompt="What is chess?",
            context=[
                common_pb2.ContextPassage(
                    document_id="chess", chunk_id="chess#0", text=CORPUS[2].text
                )
            ],
            parameters=common_pb2.GenerationParameters(max_tokens=40),
        )
        responses = list(stub.Generate(request, timeout=30))
    texts = [r.delta for r in responses if r.WhichOneof("event") == "delta"]
    assert len(texts) == 1 and "Chess" in texts[0] and "[1]" in texts[0]  # one response
    summary = responses[-1].summary
    assert summary.generator == "triton" and list(summary.cited_passages) == [1]
    assert summary.usage.prompt_tokens > 20 and summary.usage.completion_tokens > 5
    # Triton's own count: this one request went to the non-streaming model.
    wait_for(
        lambda: triton.metric("nv_inference_request_success", "rag_llm_sync") == served_before + 1
    )


def long_ask(client: RagClient, timeout: float) -> Any:
    stub = rag_service_pb2_grpc.RagServiceStub(client.channel)
    request = rag_pb2.AskRequest(question="What is a volcano?", k=3)
    request.parameters.max_tokens = 4000  # with ignore_eos: 80 s of words
    return stub.Ask(request, timeout=timeout)


def test_cancelling_ask_cancels_the_triton_request(rag: Callable[..., Any], triton: Triton) -> None:
    _, client = rag(
        triton={"parameters": "sampling_parameters", "extra_parameters": {"ignore_eos": True}}
    )
    cancelled_before = triton.metric("rag_llm_cancelled_total")
    call = long_ask(client, timeout=120)
    deltas = 0
    for response in call:
        deltas += response.WhichOneof("event") == "delta"
        if deltas == 5:
            break
    assert triton.metric("rag_llm_active_requests") == 1
    call.cancel()
    wait_for(lambda: triton.metric("rag_llm_active_requests") == 0, timeout=10)
    assert triton.metric("rag_llm_cancelled_total") == cancelled_before + 1


def test_a_deadline_shorter_than_generation_is_deadline_exceeded(
    rag: Callable[..., Any], triton: Triton
) -> None:
    _, client = rag(
        triton={"parameters": "sampling_parameters", "extra_parameters": {"ignore_eos": True}}
    )
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in long_ask(client, timeout=1.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    # Triton stopped generating for the expired call too.
    wait_for(lambda: triton.metric("rag_llm_active_requests") == 0, timeout=10)


def test_health_follows_model_readiness(
    start_server: Callable[..., ServerThread], triton: Triton
) -> None:
    server = start_server(**triton_settings(triton.url, triton={"model": "no_such_model"}))
    for service in ("rag.v1.RagService", "rag.v1.GenerationService"):
        assert health_status(server.target, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (
        health_status(server.target, "rag.v1.RetrievalService")
        == health_pb2.HealthCheckResponse.SERVING
    )
    with RagClient(server.target) as client:
        client.upsert(CORPUS)
        events: list[Any] = []
        with pytest.raises(RpcError) as info:
            for event in client.ask("What is a volcano?"):
                events.append(event)
    assert info.value.code == "UNAVAILABLE" and "no_such_model" in info.value.message
    # Retrieval results still reach the caller before the error.
    assert (
        events and isinstance(events[0], Citations) and events[0].hits[0].document_id == "volcano"
    )


def test_triton_killed_mid_run_then_back_without_restarting_rag_grpc(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    own = Triton(tmp_path / "triton.log").start()
    back = Triton(tmp_path / "triton.log", grpc_port=own.grpc_port)
    try:
        strict = start_server(
            tmp_path / "strict", **triton_settings(own.url, triton={"breaker_reset_s": 0.5})
        )
        lenient = start_server(
            tmp_path / "lenient", **triton_settings(own.url, fallback_to_extractive=True)
        )
        clients = [RagClient(s.target, timeout=30) for s in (strict, lenient)]
        for client in clients:
            client.upsert(CORPUS)
            assert ask_summary(client.ask("What is a volcano?")).generator == "triton"
        rag_service = "rag.v1.RagService"
        own.kill()
        started = time.monotonic()
        with pytest.raises(RpcError) as info:
            list(clients[0].ask("What is a volcano?"))
        assert info.value.code == "UNAVAILABLE" and time.monotonic() - started < 3
        wait_for(lambda: health_status(strict.target, rag_service) != 1)
        # With the fallback flag, answers keep coming (extractive) and health stays up.
        summary = ask_summary(clients[1].ask("What is a volcano?"))
        assert summary.generator == "extractive" and summary.cited
        assert health_status(lenient.target, rag_service) == health_pb2.HealthCheckResponse.SERVING
        # Triton returns on the same port: rag-grpc recovers by itself.
        back.start()
        wait_for(lambda: health_status(strict.target, rag_service) == 1, timeout=20)
        time.sleep(0.6)  # past the breaker's reset time
        assert ask_summary(clients[0].ask("What is a volcano?")).generator == "triton"
    finally:
        own.kill()
        back.kill()


def generation_stats(client: RagClient) -> Any:
    from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc

    stub = admin_service_pb2_grpc.AdminServiceStub(client.channel)
    return stub.Stats(admin_pb2.StatsRequest(), timeout=10).generation


def test_the_circuit_opens_after_repeated_failures_and_closes_when_triton_is_back(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    own = Triton(tmp_path / "triton.log").start()
    back = Triton(tmp_path / "triton.log", grpc_port=own.grpc_port)
    retries, backoff_s = 2, 0.2
    try:
        server = start_server(
            **triton_settings(
                own.url,
                triton={
                    # One Ask makes 1 + retries attempts: exactly enough to open.
                    "breaker_failures": retries + 1,
                    "breaker_reset_s": 1.0,
                    "retries": retries,
                    "retry_backoff_s": backoff_s,
                },
            )
        )
        client = RagClient(server.target, timeout=30)
        client.upsert(CORPUS)
        assert ask_summary(client.ask("What is a volcano?")).generator == "triton"
        assert generation_stats(client).circuit == "closed"

        own.kill()
        started = time.monotonic()
        with pytest.raises(RpcError) as info:
            list(client.ask("What is a volcano?"))
        elapsed = time.monotonic() - started
        assert info.value.code == "UNAVAILABLE"
        stats = generation_stats(client)
        # Every attempt failed and counted, and the waits between them were
        # the backoff doubling from retry_backoff_s (0.2 s, then 0.4 s).
        assert stats.failures == retries + 1
        assert elapsed >= backoff_s * (2**retries - 1)
        assert stats.circuit == "open"

        # Open: the next call fails at once without trying Triton.
        with pytest.raises(RpcError) as info:
            list(client.ask("What is a volcano?"))
        assert info.value.code == "UNAVAILABLE" and "circuit is open" in info.value.message
        assert generation_stats(client).failures == retries + 1  # no attempt made

        # Triton back; past breaker_reset_s one probe call goes through and closes it.
        back.start()
        wait_for(lambda: generation_stats(client).ready, timeout=30)
        wait_for(lambda: generation_stats(client).circuit == "half-open")
        # A probe call that its caller abandons decides nothing: the next
        # call is let through as the probe.
        call = long_ask(client, timeout=30)
        for response in call:
            if response.WhichOneof("event") == "delta":
                break
        call.cancel()
        assert ask_summary(client.ask("What is a volcano?")).generator == "triton"
        stats = generation_stats(client)
        assert stats.circuit == "closed" and stats.failures == retries + 1
        client.close()
    finally:
        own.kill()
        back.kill()


def test_triton_killed_mid_stream_fails_that_ask_clearly_and_the_server_serves_on(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    own = Triton(tmp_path / "triton.log").start()
    back = Triton(tmp_path / "triton.log", grpc_port=own.grpc_port)
    try:
        server = start_server(
            **triton_settings(
                own.url,
                triton={
                    "parameters": "sampling_parameters",
                    "extra_parameters": {"ignore_eos": True},
                },
            )
        )
        client = RagClient(server.target, timeout=60)
        client.upsert(CORPUS)
        call = long_ask(client, timeout=60)
        events: list[str] = []
        with pytest.raises(grpc.RpcError) as info:
            for response in call:
                events.append(response.WhichOneof("event"))
                if events.count("delta") == 5:
                    own.kill()  # while Triton is still sending words
        assert events.count("delta") >= 5 and "summary" not in events
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "mid-answer" in (info.value.details() or "")
        # The server stays up: retrieval answers at once, and generation
        # returns by itself once Triton does.
        assert health_status(server.target, "rag.v1.RetrievalService") == 1
        assert client.search("lava", k=1)[0].document_id == "volcano"
        back.start()
        wait_for(lambda: health_status(server.target, "rag.v1.RagService") == 1, timeout=30)
        assert ask_summary(client.ask("What is a volcano?")).generator == "triton"
        client.close()
    finally:
        own.kill()
        back.kill()


def test_sigterm_lets_a_streaming_ask_finish_and_refuses_new_calls(
    server_process: Callable[..., ServerProcess],
    triton: Triton,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drain with a stream really in flight: 100 words at 20 ms each
    take about 2 s, within the 5 s grace period the test servers get."""
    monkeypatch.setenv("RAG_GRPC_GENERATION__TRITON__PARAMETERS", "sampling_parameters")
    monkeypatch.setenv("RAG_GRPC_GENERATION__TRITON__EXTRA_PARAMETERS", '{"ignore_eos": true}')
    monkeypatch.setenv("RAG_GRPC_GENERATION__ANSWER_CACHE_ENTRIES", "0")
    proc = server_process(tmp_path / "data", "--generator", "triton", "--triton-url", triton.url)
    max_words = 100
    with RagClient(proc.target, timeout=60) as client:
        client.upsert(CORPUS)
        stub = rag_service_pb2_grpc.RagServiceStub(client.channel)
        request = rag_pb2.AskRequest(question="What is a volcano?", k=3)
        request.parameters.max_tokens = max_words
        call = stub.Ask(request, timeout=60)
        # The stream is read in its own thread, so that new calls can be
        # tried while it runs; the log tells which came first.
        order: list[str] = []
        reader = threading.Thread(
            target=lambda: order.extend(r.WhichOneof("event") for r in call), daemon=True
        )
        reader.start()
        wait_for(lambda: order.count("delta") >= 3)
        proc.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                with grpc.insecure_channel(proc.target) as channel:
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                return False
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE

        wait_for(refused)
        refused_after = len(order)
        reader.join(30)
    assert not reader.is_alive() and order[-1] == "summary"
    # Words kept coming after new calls were refused, up to the whole answer.
    assert "delta" in order[refused_after:]
    assert proc.stop(timeout=30) == 0
    assert "draining in-flight calls" in proc.log.read_text()
