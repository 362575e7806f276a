"""What travels between rag-grpc and an LLM model on Triton, in the interface
of Triton's vLLM and TensorRT-LLM deployments: the input tensors made from a
prompt and our generation parameters, the text and the optional report
(token counts, finish reason) read from its responses, and its errors as our
error types. No connection, no state: TritonGenerator (generate/triton.py)
makes the calls."""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np

from rag_grpc.config import TritonConfig
from rag_grpc.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from rag_grpc.generate.base import GenerationParams

# The outputs a model may send besides text_output (vLLM's names).
REPORTED = ("num_input_tokens", "num_output_tokens", "finish_reason")


class TritonUnavailable(Exception):
    """Triton could not be reached (retryable before the first token)."""


def request_inputs(
    triton: TritonConfig, prompt: str, max_tokens: int, params: GenerationParams
) -> list[Any]:
    """The request's input tensors: text_input and stream, then the sampling
    parameters as one JSON tensor or as separate tensors, as
    `triton.parameters` says the model takes them."""
    from tritonclient.grpc import InferInput

    def tensor(name: str, value: np.ndarray, dtype: str) -> Any:
        item = InferInput(name, list(value.shape), dtype)
        item.set_data_from_numpy(value)
        return item

    inputs = [
        tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),
        tensor("stream", np.array([triton.streaming]), "BOOL"),
    ]
    if triton.parameters == "sampling_parameters":
        sampling: dict[str, Any] = {"max_tokens": max_tokens, **triton.extra_parameters}
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


def response_text(result: Any) -> str:
    """The text_output of one response ("" when it has none)."""
    values = result.as_numpy("text_output")
    if values is None:
        return ""
    return "".join(
        v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        for v in np.asarray(values).reshape(-1)
    )


def is_final(result: Any) -> bool:
    """Whether a ModelStreamInfer response is its request's last: Triton marks
    every response in a stream with the parameter triton_final_response. A
    decoupled model's closing flag-only response is not sent (we do not ask
    for empty final responses), so a model that ends with one, as rag_llm
    does, has no response marked final; the llm model sends its report in
    its final response. A response without the mark (a server that does not
    set it) may be the last, so it counts as final."""
    parameters = result.get_response().parameters
    if "triton_final_response" not in parameters:
        return True
    return bool(parameters["triton_final_response"].bool_param)


def read_report(result: Any, report: dict[str, Any]) -> None:
    """The optional outputs of a final response into `report`: token counts
    and the finish reason (vLLM's names), where the model sends them."""
    response = result.get_response()
    present = {output.name for output in response.outputs}
    for name in REPORTED:
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


def translate_error(exc: BaseException, triton: TritonConfig) -> Exception:
    """tritonclient / grpc errors as our error types, by the call's status
    code. Triton's retryable failures (unreachable, model not ready) become
    `TritonUnavailable`, which generate() retries, falls back from and
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
        return TritonUnavailable(f"Triton at {triton.url} is unreachable: {text}")
    if name in ("NOT_FOUND", "FAILED_PRECONDITION") or (
        not name and ("not ready" in text or "unknown model" in text.lower())
    ):
        return TritonUnavailable(f"model {triton.model} is not ready on Triton: {text}")
    return Unavailable(f"Triton failed the generation: {text}")
