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
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tokenizers import Tokenizer

from rag_grpc import deadlines
from rag_grpc.config import GenerationConfig, TritonConfig
from rag_grpc.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
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
from rag_grpc.lru import BoundedLRU
from rag_grpc.telemetry import OFF, Recorder, inject

log = logging.getLogger(__name__)

_CITATION = re.compile(r"\[(\d+)\]")


class CircuitBreaker:
    """Closed until `failures` calls fail in a row; then open for `reset_s`,
    after which one probe call is let through (half-open) to decide."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self.reset_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._consecutive += 1
        self._probing = False
        if self._consecutive >= self.failures or self._opened_at is not None:
            self._opened_at = time.monotonic()

    def abandon_probe(self) -> None:
        """The probe call ended without saying whether Triton works (its
        caller cancelled, its deadline passed): the next call probes instead.
        Without this, an abandoned probe would keep the circuit from ever
        closing."""
        self._probing = False


class PromptBuilder:
    """The prompt template filled with numbered passages cut to a token budget.

    Tokenising the passages is most of the cost of a prompt (~0.4 ms per
    1,000 characters here), and retrieved chunks repeat across questions, so
    each passage's encoding is kept in a small LRU cache; the prompt's token
    count is the sum of its parts' counts.
    """

    def __init__(
        self, tokenizer_path: Path, template: str, budget: int, cache_entries: int = 4096
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.template = template
        self.budget = budget
        # Keyed by the passage text; an encoding costs about 40 bytes a token.
        self._cache: BoundedLRU[str, Any] = BoundedLRU(
            cache_entries,
            cache_entries * 4096,
            lambda text, encoding: len(text) + 40 * len(encoding.ids),
        )

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _encodings(self, texts: list[str]) -> list[Any]:
        found = {text: self._cache.get(text) for text in dict.fromkeys(texts)}
        missing = [text for text, encoding in found.items() if encoding is None]
        if missing:
            for text, encoding in zip(
                missing,
                self.tokenizer.encode_batch(missing, add_special_tokens=False),
                strict=True,
            ):
                found[text] = encoding
                self._cache.put(text, encoding)
        return [found[text] for text in texts]

    def build(self, question: str, passages: Sequence[Passage]) -> tuple[str, int, int]:
        """(prompt, passages included, prompt tokens): whole passages while
        they fit, then the first part of the next one, cut at a token boundary."""
        left = self.budget
        lines: list[str] = []
        tokens = 0
        texts = [" ".join(p.text.split()) for p in passages]
        for number, (text, encoding) in enumerate(
            zip(texts, self._encodings(texts), strict=True), start=1
        ):
            if left <= 0:
                break
            used = len(encoding.ids)
            if used > left:
                text = text[: encoding.offsets[left - 1][1]]
                used = left
            left -= used
            tokens += used + self.count(f"[{number}]")
            lines.append(f"[{number}] {text}")
        frame = self.template.format(context="", question=question.strip())
        prompt = self.template.format(context="\n".join(lines), question=question.strip())
        return prompt, len(lines), tokens + self.count(frame)


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
                except _TritonUnavailable as exc:
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

    def _inputs(self, prompt: str, max_tokens: int, params: GenerationParams) -> list[Any]:
        from tritonclient.grpc import InferInput

        def tensor(name: str, value: np.ndarray, dtype: str) -> Any:
            item = InferInput(name, list(value.shape), dtype)
            item.set_data_from_numpy(value)
            return item

        inputs = [
            tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),
            tensor("stream", np.array([self.triton.streaming]), "BOOL"),
        ]
        if self.triton.parameters == "sampling_parameters":
            sampling: dict[str, Any] = {"max_tokens": max_tokens, **self.triton.extra_parameters}
            if params.temperature:
                sampling["temperature"] = params.temperature
            if params.top_p:
                sampling["top_p"] = params.top_p
            if params.stop:
                sampling["stop"] = list(params.stop)
            raw = json.dumps(sampling).encode("utf-8")
            inputs.append(tensor("sampling_parameters", np.array([raw], dtype=np.object_), "BYTES"))
        else:
            inputs.append(tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"))
            if params.temperature:
                temperature = np.array([params.temperature], dtype=np.float32)
                inputs.append(tensor("temperature", temperature, "FP32"))
            if params.top_p:
                inputs.append(tensor("top_p", np.array([params.top_p], dtype=np.float32), "FP32"))
        return inputs

    async def _call(
        self, prompt: str, max_tokens: int, params: GenerationParams, report: dict[str, Any]
    ) -> AsyncIterator[str]:
        """Text pieces from Triton in a client span whose context travels in
        the call's metadata; errors become our error types. What the model
        reports besides text (token counts, finish reason) goes into `report`."""
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
        inputs = self._inputs(prompt, max_tokens, params)
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
                raise _translate(exc, self.triton) from None
            _read_report(result, report)
            yield _text(result)
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
            raise _translate(exc, self.triton) from None
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
                        raise _translate(error, self.triton)
                    _read_report(result, report)
                    text = _text(result)
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
                        if not isinstance(error, (_TritonUnavailable, Unavailable)):
                            error = _translate(error, self.triton)
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


class _TritonUnavailable(Exception):
    """Triton could not be reached (retryable before the first token)."""


def _text(result: Any) -> str:
    values = result.as_numpy("text_output")
    if values is None:
        return ""
    return "".join(
        v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        for v in np.asarray(values).reshape(-1)
    )


_REPORTED = ("num_input_tokens", "num_output_tokens", "finish_reason")


def _read_report(result: Any, report: dict[str, Any]) -> None:
    """The optional outputs a model may send besides text_output (vLLM's
    names): token counts and the finish reason, usually in the last response."""
    response = result.get_response()
    present = {output.name for output in response.outputs}
    for name in _REPORTED:
        if name not in present:
            continue
        values = np.asarray(result.as_numpy(name)).reshape(-1)
        if values.size:
            value = values[0]
            report[name] = value.decode("utf-8") if isinstance(value, bytes) else int(value)


def _status_name(exc: BaseException) -> str:
    """The gRPC status code's name of a failed call ("UNAVAILABLE"), or ""
    for an error Triton sent inside a stream, which carries only a message."""
    status_fn = getattr(exc, "status", None)  # tritonclient's InferenceServerException
    status = status_fn() if callable(status_fn) else None
    if status is None:
        code_fn = getattr(exc, "code", None)  # a grpc.RpcError
        status = code_fn() if callable(code_fn) else None
    if isinstance(status, grpc.StatusCode):
        return status.name
    return str(status or "").rpartition(".")[2]  # "StatusCode.UNAVAILABLE"


def _translate(exc: BaseException, triton: TritonConfig) -> Exception:
    """tritonclient / grpc errors as our error types, by the call's status
    code. Triton's retryable failures (unreachable, model not ready) become
    `_TritonUnavailable`, which generate() retries, falls back from and
    counts against the breaker; overload and refusals are the caller's to
    handle and never trip the breaker.

    An error inside a ModelStreamInfer stream has no status code (the
    response carries only `error_message`), so there the model's words are
    all there is: the llm model starts an overload message with
    "RESOURCE_EXHAUSTED:" and a refused request with "INVALID_ARGUMENT:",
    and Triton's own queue says "Exceeds maximum queue size"; anything else
    in a stream is a failed generation."""
    message_fn = getattr(exc, "message", None)
    text = str(message_fn() if callable(message_fn) else exc)
    name = _status_name(exc)
    if name == "RESOURCE_EXHAUSTED" or (
        not name and ("RESOURCE_EXHAUSTED:" in text or "Exceeds maximum queue size" in text)
    ):
        return ResourceExhausted(f"Triton's model {triton.model} is busy: {text}")
    if name == "INVALID_ARGUMENT" or (not name and "INVALID_ARGUMENT:" in text):
        return InvalidArgument(f"Triton's model {triton.model} refused the request: {text}")
    if name == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"generation did not finish before the deadline: {text}")
    if name == "CANCELLED":
        return Cancelled(f"the generation was cancelled: {text}")
    if name == "UNAVAILABLE":
        return _TritonUnavailable(f"Triton at {triton.url} is unreachable: {text}")
    if name in ("NOT_FOUND", "FAILED_PRECONDITION") or (
        not name and ("not ready" in text or "unknown model" in text.lower())
    ):
        return _TritonUnavailable(f"model {triton.model} is not ready on Triton: {text}")
    return Unavailable(f"Triton failed the generation: {text}")
