"""Generation through NVIDIA Triton Inference Server with ``tritonclient``
(gRPC, asyncio): streaming through ModelStreamInfer for decoupled models,
ModelInfer otherwise, in the interface of Triton's LLM deployments (vLLM,
TensorRT-LLM): ``text_input`` / ``stream`` / sampling parameters in,
``text_output`` out.

Resilience: one long-lived channel; the caller's deadline bounds every call
and a cancelled caller cancels the Triton stream; UNAVAILABLE before the
first token is retried with backoff; a circuit breaker stops calling a
failing Triton for a while; readiness of the server and model is probed for
health. With ``fallback`` set, an unreachable Triton hands the answer to the
extractive generator instead of failing.

Beside this module: generate/prompt.py (the prompt and its token budget),
generate/breaker.py (the circuit breaker), generate/triton_io.py (the
tensors and errors of the model interface).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from rag_grpc import deadlines
from rag_grpc.config import GenerationConfig, TritonConfig
from rag_grpc.errors import Unavailable
from rag_grpc.generate.base import (
    Delta,
    Finished,
    GenerationEvent,
    GenerationParams,
    Generator,
    Passage,
    Usage,
    require_context,
    validate_generation,
)
from rag_grpc.generate.breaker import CircuitBreaker
from rag_grpc.generate.prompt import PromptBuilder
from rag_grpc.generate.triton_io import (
    TritonUnavailable,
    is_final,
    read_report,
    request_inputs,
    response_text,
    translate_error,
)
from rag_grpc.telemetry import OFF, Recorder, inject

log = logging.getLogger(__name__)

_CITATION = re.compile(r"\[(\d+)\]")


class TritonGenerator:
    """Generator backed by a model on Triton."""

    name = "triton"

    def __init__(
        self,
        config: GenerationConfig,
        tokenizer_path: Path,
        fallback: Generator | None = None,
        telemetry: Recorder = OFF,
    ) -> None:
        self.config = config
        self.triton: TritonConfig = config.triton
        # Where each call's client span starts (the server's Telemetry, or OFF).
        self.telemetry = telemetry
        self.prompts = PromptBuilder(
            config.tokenizer_path or tokenizer_path,
            config.prompt_template,
            config.context_token_budget,
        )
        self.fallback = fallback
        self.breaker = CircuitBreaker(self.triton.breaker_failures, self.triton.breaker_reset_s)
        self.ready = False
        self.usage_totals = Usage()
        self.generations = 0
        self.failures = 0
        self._client: Any = None

    # -- connection and health ----------------------------------------------

    def client(self) -> Any:
        """The one long-lived tritonclient channel (made on the event loop)."""
        if self._client is None:
            from tritonclient.grpc.aio import InferenceServerClient

            t = self.triton

            def read(path: Path | None) -> bytes | None:
                return path.read_bytes() if path is not None else None

            self._client = InferenceServerClient(
                t.url,
                ssl=t.ssl,
                root_certificates=read(t.root_certificates),
                private_key=read(t.private_key),
                certificate_chain=read(t.certificate_chain),
            )
        return self._client

    async def probe(self) -> bool:
        """Whether Triton and the model are ready now (also updates `ready`)."""
        try:
            client = self.client()
            timeout = self.triton.probe_interval_s
            ready = bool(
                await client.is_server_ready(client_timeout=timeout)
                and await client.is_model_ready(
                    self.triton.model, self.triton.model_version, client_timeout=timeout
                )
            )
        except Exception as exc:  # tritonclient raises InferenceServerException
            log.debug("triton probe failed: %s", exc)
            ready = False
        if ready != self.ready:
            log.info(
                "triton model %s at %s is %s",
                self.triton.model,
                self.triton.url,
                "ready" if ready else "not ready",
            )
        self.ready = ready
        return ready

    def stats(self) -> dict[str, Any]:
        """Totals since start, for AdminService.Stats."""
        return {
            "endpoint": f"{self.triton.url} model {self.triton.model}",
            "ready": self.ready,
            "circuit": self.breaker.state,
            "generations": self.generations,
            "failures": self.failures,
            "prompt_tokens": self.usage_totals.prompt_tokens,
            "completion_tokens": self.usage_totals.completion_tokens,
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- generation ---------------------------------------------------------

    async def generate(
        self, prompt: str, passages: Sequence[Passage], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        validate_generation(prompt, params)
        require_context(passages)
        full_prompt, used, prompt_tokens = self.prompts.build(prompt, passages)
        max_tokens = params.max_tokens or self.config.default_max_tokens
        # Only a half-open circuit lets a call through as its one probe;
        # retries happen only while it is closed (a failure re-opens it).
        probing = self.breaker.state == "half-open"
        if not self.breaker.allow():
            async for event in self._fall_back(
                prompt, passages, params, "Triton's circuit is open after repeated failures"
            ):
                yield event
            return
        pieces: list[str] = []
        report: dict[str, Any] = {}
        attempt = 0
        decided = False
        try:
            while True:
                try:
                    async for text in self._call(full_prompt, max_tokens, params, report):
                        pieces.append(text)
                        yield Delta(text)
                    decided = True
                    self.breaker.success()
                    break
                except TritonUnavailable as exc:
                    decided = True
                    self.breaker.failure()
                    self.failures += 1
                    if pieces:
                        raise Unavailable(f"Triton failed mid-answer: {exc}") from None
                    if attempt < self.triton.retries and self.breaker.allow():
                        delay = self.triton.retry_backoff_s * 2**attempt
                        if deadlines.remaining(self.triton.timeout_s) > delay:
                            attempt += 1
                            await asyncio.sleep(delay)
                            continue
                    async for event in self._fall_back(prompt, passages, params, str(exc)):
                        yield event
                    return
        finally:
            if probing and not decided:
                self.breaker.abandon_probe()
        self.generations += 1
        completion = "".join(pieces)
        # A model that counts its own tokens (vLLM's num_input_tokens /
        # num_output_tokens, our llm model) is believed over our tokenizer,
        # which is the embedding model's unless generation.tokenizer_path is set.
        prompt_tokens = int(report.get("num_input_tokens", prompt_tokens))
        completion_tokens = int(report.get("num_output_tokens", 0)) or self.prompts.count(
            completion
        )
        self.usage_totals = Usage(
            self.usage_totals.prompt_tokens + prompt_tokens,
            self.usage_totals.completion_tokens + completion_tokens,
        )
        cited = []
        for match in _CITATION.finditer(completion):
            number = int(match.group(1))
            if 1 <= number <= used and number not in cited:
                cited.append(number)
        finish = report.get("finish_reason") or (
            "length" if completion_tokens >= max_tokens else "stop"
        )
        yield Finished(Usage(prompt_tokens, completion_tokens), self.name, finish, tuple(cited))

    async def _fall_back(
        self, prompt: str, passages: Sequence[Passage], params: GenerationParams, why: str
    ) -> AsyncIterator[GenerationEvent]:
        if self.fallback is None:
            raise Unavailable(
                f"generation is unavailable: {why} (Triton at {self.triton.url}, model "
                f"{self.triton.model}); retry later"
            )
        log.warning("triton unavailable (%s); answering with %s", why, self.fallback.name)
        async for event in self.fallback.generate(prompt, passages, params):
            yield event

    async def _call(
        self, prompt: str, max_tokens: int, params: GenerationParams, report: dict[str, Any]
    ) -> AsyncIterator[str]:
        """Text pieces from Triton in a client span whose context travels in
        the call's metadata; errors become our error types. What the model
        reports besides text (token counts, finish reason), which it sends
        in its final response, goes into `report`."""
        from opentelemetry import trace

        rpc = "ModelStreamInfer" if self.triton.streaming else "ModelInfer"
        span = self.telemetry.tracing().start_span(
            f"triton {rpc}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "inference.GRPCInferenceService",
                "rpc.method": rpc,
                "server.address": self.triton.url,
                "triton.model": self.triton.model,
            },
        )
        try:
            async for piece in self._call_in_span(prompt, max_tokens, params, span, report):
                yield piece
        except BaseException as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    async def _call_in_span(
        self,
        prompt: str,
        max_tokens: int,
        params: GenerationParams,
        span: Any,
        report: dict[str, Any],
    ) -> AsyncIterator[str]:
        deadlines.check("generation")
        timeout = deadlines.remaining(self.triton.timeout_s)
        client = self.client()
        inputs = request_inputs(self.triton, prompt, max_tokens, params)
        request_id = uuid.uuid4().hex
        headers = inject(span)
        if not self.triton.streaming:
            try:
                result = await client.infer(
                    self.triton.model,
                    inputs,
                    model_version=self.triton.model_version,
                    request_id=request_id,
                    client_timeout=timeout,
                    headers=headers,
                )
            except Exception as exc:
                raise translate_error(exc, self.triton) from None
            read_report(result, report)  # ModelInfer's one response
            yield response_text(result)
            return

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.triton.model,
                "model_version": self.triton.model_version,
                "inputs": inputs,
                "request_id": request_id,
            }

        try:
            stream = client.stream_infer(requests(), stream_timeout=timeout, headers=headers)
        except Exception as exc:
            raise translate_error(exc, self.triton) from None
        # A reader task takes Triton's responses as they come; the caller gets
        # everything that arrived since its last delta in one piece. After a
        # delta, the next one waits up to stream_interval_ms (or for the end),
        # so a fast model costs a few messages, not one per token: each
        # message costs ~0.1 ms of CPU here and on the client.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        wake: list[asyncio.Future[None]] = []

        def put(item: str | BaseException | None) -> None:
            queue.put_nowait(item)
            if item is None or isinstance(item, BaseException):
                for waiter in wake:
                    if not waiter.done():
                        waiter.set_result(None)

        async def read() -> None:
            try:
                async for result, error in stream:
                    if error is not None:
                        raise translate_error(error, self.triton)
                    if is_final(result):
                        read_report(result, report)
                    text = response_text(result)
                    if text:
                        put(text)
                put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                put(exc if isinstance(exc, Exception) else Unavailable(str(exc)))

        interval = self.triton.stream_interval_ms / 1000
        reader = asyncio.create_task(read(), name="triton-stream")
        finished = False
        try:
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                pieces: list[str] = []
                for item in items:
                    if item is None:
                        finished = True
                    elif isinstance(item, BaseException):
                        error = item
                        if not isinstance(error, (TritonUnavailable, Unavailable)):
                            error = translate_error(error, self.triton)
                        raise error
                    else:
                        pieces.append(item)
                if pieces:
                    yield "".join(pieces)
                if interval and not finished and reader.done() is False:
                    waiter: asyncio.Future[None] = loop.create_future()
                    wake[:] = [waiter]
                    timer = loop.call_later(interval, _resolve, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
        finally:
            if not finished:
                # The caller went away, the deadline passed or Triton failed:
                # cancel the stream so Triton stops generating for nobody.
                stream.cancel()
            reader.cancel()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
