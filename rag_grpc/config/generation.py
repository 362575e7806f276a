"""Sections of answer generation: the generator and its prompt
([generation]) and NVIDIA Triton as its backend ([generation.triton])."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from rag_grpc.config.base import Section
from rag_grpc.config.credentials import grpc_target


class TritonConfig(Section):
    """NVIDIA Triton Inference Server as the generator (generation.generator = "triton").

    Speaks the interface of Triton's LLM deployments (vLLM, TensorRT-LLM):
    input ``text_input`` (BYTES), ``stream`` (BOOL), sampling parameters;
    output ``text_output``.
    """

    url: str = "127.0.0.1:8001"
    model: str = "rag_llm"
    model_version: str = ""
    # Streaming uses ModelStreamInfer (decoupled models); off uses ModelInfer.
    streaming: bool = True
    # How sampling parameters travel: as tensors (max_tokens INT32,
    # temperature / top_p FP32: TensorRT-LLM) or as one JSON string input
    # named sampling_parameters (vLLM).
    parameters: Literal["tensors", "sampling_parameters"] = "tensors"
    # Added to the sampling_parameters JSON, e.g. {"ignore_eos": true}.
    extra_parameters: dict[str, Any] = Field(default_factory=dict)
    # TLS to Triton: CA bundle, and a client certificate for mTLS.
    ssl: bool = False
    root_certificates: Path | None = None
    private_key: Path | None = None
    certificate_chain: Path | None = None
    # Upper bound of one generation; the caller's deadline bounds it too.
    timeout_s: float = Field(120.0, gt=0)
    # Retries of calls that fail with UNAVAILABLE before the first token.
    retries: int = Field(2, ge=0, le=10)
    retry_backoff_s: float = Field(0.05, ge=0)
    # The circuit opens after this many consecutive failures and lets one
    # probe call through after breaker_reset_s.
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(5.0, gt=0)
    # How often Triton's server and model readiness is checked for health.
    probe_interval_s: float = Field(2.0, gt=0)
    # After a delta is sent, text arriving within this many milliseconds goes
    # out as one message (like vLLM's stream interval). The first delta and
    # the end of the answer are never held back; a model slower than this
    # (any real LLM: 10-50 ms a token) is forwarded token by token. 0 sends
    # each piece as soon as the client has taken the last one.
    stream_interval_ms: float = Field(5.0, ge=0, le=1000)

    @field_validator("url")
    @classmethod
    def _url_without_credentials(cls, value: str) -> str:
        return grpc_target(value, "generation.triton.url", "TLS (ssl, certificate_chain)")


class GenerationConfig(Section):
    """Answer generation."""

    generator: Literal["extractive", "triton"] = "extractive"
    default_max_tokens: int = Field(256, ge=1, le=4096)
    # How many sentences the extractive generator assembles an answer from.
    extractive_sentences: int = Field(3, ge=1, le=20)
    triton: TritonConfig = TritonConfig()
    # With Triton down (or its circuit open), answer extractively instead of
    # failing with UNAVAILABLE.
    fallback_to_extractive: bool = False
    # Tokenizer that counts prompt and completion tokens and cuts the context
    # to its budget (default: the embedding model's).
    tokenizer_path: Path | None = None
    context_token_budget: int = Field(1500, ge=16, le=1_000_000)
    # Finished answers kept by (question, parameters, passages, index
    # generation); a write to the namespace retires them. 0 turns it off.
    answer_cache_entries: int = Field(1024, ge=0)
    # The prompt: {context} is the numbered passages, {question} the question.
    # The instruction comes after the passages and the question: small chat
    # models (SmolLM2-135M, Qwen2.5-0.5B) follow it there, where before the
    # passages they continued the numbered list instead ("[4] ..."). It asks
    # for no "I don't know": told to abstain, Qwen2.5-0.5B did so on half the
    # questions its passages answered (bench/answers.py).
    prompt_template: str = (
        "Context passages:\n{context}\n\nQuestion: {question}\n\n"
        "Answer the question in one or two sentences using only the context passages "
        "above, and cite the passages you used as [1], [2] and so on."
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_fields(cls, value: str) -> str:
        for field in ("{context}", "{question}"):
            if field not in value:
                raise ValueError(f"generation.prompt_template must contain {field}")
        return value
