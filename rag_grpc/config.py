"""The one typed configuration object, loaded once at start and passed down.

Sources, highest priority first: explicit values (CLI flags), ``RAG_GRPC_*``
environment variables (nested fields with ``__``, e.g.
``RAG_GRPC_LIMITS__MAX_K=50``), the environment's overlay file (``--env
prod`` or ``RAG_GRPC_ENV``: ``rag-grpc.prod.toml`` beside the base file), the
TOML file named by ``--config`` or ``RAG_GRPC_CONFIG`` (with an environment
and neither: ``./rag-grpc.toml`` when it exists), then the defaults below.
Tables are merged key by key across sources; any other value is replaced.
Each leaf's source is kept (`Settings.origin`) for `rag-grpc config
--show-origin`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from rag_grpc.services.registry import SERVICE_NAMES

# The default of `index.exact_scan_threshold`, the same number as the native
# core's own default (rag_grpc.native.DEFAULT_EXACT_THRESHOLD, checked by
# tests/test_server_process.py): written here so that reading the config
# does not load the compiled extension.
DEFAULT_EXACT_THRESHOLD = 12_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    """gRPC transport settings."""

    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024**3)
    keepalive_time_s: float = Field(30.0, gt=0)
    keepalive_timeout_s: float = Field(10.0, gt=0)
    # In-flight calls get this long to finish after SIGTERM.
    grace_period_s: float = Field(10.0, ge=0)
    # Calls in progress at once (streams count until they end, health Watch
    # streams included); the next one gets RESOURCE_EXHAUSTED at once, so a
    # flood costs a refusal instead of unbounded memory. 1000 is far above
    # what 2-16 cores serve concurrently (a few hundred in flight saturate
    # them) and still bounds memory to ~1000 requests of max_message_bytes.
    max_concurrent_rpcs: int = Field(1000, ge=1)
    worker_threads: int = Field(4, ge=1, le=256)
    # When set, every rag.v1 call must carry `authorization: Bearer <token>`
    # (health and reflection stay open for probes); remote calls send it too.
    auth_token: SecretStr | None = None
    # The same token read from a file (owner-only, like backup_key_file), so
    # it stays out of config files that get copied around and out of the
    # environment of child processes. One of the two at most.
    auth_token_file: Path | None = None
    # The older spelling of auth.trusted_proxies, still honoured (the two
    # lists are joined); new configurations use auth.trusted_proxies.
    trusted_proxies: tuple[str, ...] = ()
    # TLS: this server's certificate chain and key (PEM). With tls_client_ca,
    # every client must present a certificate that CA signed (mutual TLS),
    # and the certificate names the caller (URI SAN, else subject CN).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("auth_token_file"):
            if data.get("auth_token"):
                raise ValueError("set server.auth_token or server.auth_token_file, not both")
            path = Path(data["auth_token_file"])
            data = {**data, "auth_token": read_secret_file(path, "server.auth_token_file")}
        return data

    @model_validator(mode="after")
    def _secure_settings(self) -> ServerConfig:
        if self.auth_token is not None:
            # An empty token used to switch authentication off without a word;
            # a short one can be guessed. Either is a mistake to stop at.
            length = len(self.auth_token.get_secret_value())
            if length < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"server.auth_token is {'empty' if not length else f'{length} characters'}; "
                    f"use a random secret of at least {MIN_TOKEN_CHARS} characters (e.g. "
                    "`openssl rand -hex 32`), or leave it unset"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (
                ("server.tls_cert", "server.tls_key")
                if self.tls_key is None
                else ("server.tls_key", "server.tls_cert")
            )
            raise ValueError(f"{given} is set but {missing} is not; TLS needs both")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key"
            )
        _check_proxies(self.trusted_proxies, "server.trusted_proxies")
        return self


class AuthConfig(_Section):
    """Who may call: identity sources (besides server.auth_token and mutual
    TLS), the policy of tenants and roles, and where audit and usage are kept."""

    # Tenants, their members' roles, quotas, operators and API keys (TOML);
    # reloaded on SIGHUP. Unset: single tenant, every authenticated caller
    # may do everything.
    policy_file: Path | None = None
    # Serve a non-loopback address with no authentication at all. Refused
    # otherwise: anyone who reaches the port could read and erase everything.
    insecure_no_auth: bool = False
    # Bearer JWTs: the issuer's public keys (JWKS file), and the iss and aud
    # a token must carry; the subject is the caller, jwt_tenant_claim its tenant.
    jwt_jwks_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_tenant_claim: str = "tenant"
    # Networks (or addresses) of our gateway (Envoy), whose
    # x-forwarded-client-cert is believed, and only over mutual TLS (or a
    # unix socket with trust_unix_socket): "10.0.0.0/8", "127.0.0.1", "::1".
    trusted_proxies: tuple[str, ...] = ()
    # The By= our Envoy writes into the header (its own SPIFFE ID); when set,
    # an element written by anyone else is not believed.
    proxy_identity: str | None = None
    trust_unix_socket: bool = False
    # The hash-chained audit log and the usage ledger (SQLite); default
    # <data dir>/audit.sqlite3 and <data dir>/usage.sqlite3.
    audit_db: Path | None = None
    usage_db: Path | None = None

    @model_validator(mode="after")
    def _jwt_complete(self) -> AuthConfig:
        jwt = {
            "auth.jwt_jwks_file": self.jwt_jwks_file,
            "auth.jwt_issuer": self.jwt_issuer,
            "auth.jwt_audience": self.jwt_audience,
        }
        missing = [name for name, value in jwt.items() if not value]
        if self.jwt_jwks_file is not None and missing:
            raise ValueError(f"JWT authentication needs {' and '.join(missing)} as well")
        if self.jwt_jwks_file is None and len(missing) < len(jwt):
            raise ValueError(
                "auth.jwt_issuer and auth.jwt_audience are used only with auth.jwt_jwks_file"
            )
        if not self.jwt_tenant_claim:
            raise ValueError("auth.jwt_tenant_claim must name a claim")
        _check_proxies(self.trusted_proxies, "auth.trusted_proxies")
        return self


# A shared bearer token shorter than this is refused at start.
MIN_TOKEN_CHARS = 16


def _check_proxies(entries: tuple[str, ...], what: str) -> None:
    """Each entry must be an IP address or network, so a typo fails at start."""
    import ipaddress

    for entry in entries:
        try:
            ipaddress.ip_network(entry.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(
                f"{what}: {entry!r} is not an IP address or network (like 10.0.0.0/8, "
                f"127.0.0.1 or ::1): {exc}"
            ) from None


class MilvusConfig(_Section):
    """Milvus as the vector index (index.backend = "milvus", docs/milvus.md):
    one collection holds every namespace's vectors and filterable metadata,
    the namespace as its partition key; SQLite keeps documents, chunks and
    their vectors, so the collection can always be rebuilt from it."""

    # http://host:19530 (https:// for TLS). No user:password@ here: use token.
    uri: str = "http://127.0.0.1:19530"
    # "user:password" or an API key; or the same from an owner-only file.
    token: SecretStr | None = None
    token_file: Path | None = None
    db_name: str = ""
    # The collection is <prefix>_d<dimension>: a model of another dimension
    # gets its own.
    collection_prefix: str = Field("rag", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    # Strong: a search sees every write Milvus acknowledged before it
    # (read-your-writes); Bounded/Eventually: seconds stale, much cheaper;
    # Session: this process's own writes only (docs/milvus.md has figures).
    consistency_level: Literal["Strong", "Session", "Bounded", "Eventually"] = "Strong"
    index_type: str = "HNSW"
    # Index build parameters; empty means HNSW with index.m and ef_construction.
    index_params: dict[str, int | float | str] = Field(default_factory=dict)
    # Partitions the namespace key hashes into (fixed at creation).
    partitions: int = Field(64, ge=1, le=1024)
    # This process writes its applied writes to Milvus. Exactly one process
    # per collection may (the designated applier); the other replicas follow
    # the log into their own SQLite and only search Milvus.
    writer: bool = True
    # Per call to Milvus; the start fails after it when Milvus cannot be reached.
    timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("token_file"):
            if data.get("token"):
                raise ValueError("set index.milvus.token or index.milvus.token_file, not both")
            path = Path(data["token_file"])
            data = {**data, "token": read_secret_file(path, "index.milvus.token_file")}
        return data

    @field_validator("uri")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        if split_url_credentials(value)[1] is not None:
            raise ValueError("index.milvus.uri must not carry user:password@; set token instead")
        return value


class IndexConfig(_Section):
    """Vector index parameters (HNSW)."""

    # "native": our in-process HNSW core, one copy per replica in its RAM;
    # "milvus": a Milvus server or cluster ([index.milvus]), beyond one
    # machine's RAM.
    backend: Literal["native", "milvus"] = "native"
    milvus: MilvusConfig = MilvusConfig()
    m: int = Field(16, ge=4, le=128)
    ef_construction: int = Field(200, ge=10, le=4096)
    ef_search: int = Field(64, ge=1, le=4096)
    initial_capacity: int = Field(1024, ge=16)
    # Filtered searches whose allowed set has at most this many chunks scan
    # those vectors exactly instead of walking the graph (switch-over point
    # measured by bench/ann.py, see bench/RESULTS.md).
    exact_scan_threshold: int = Field(DEFAULT_EXACT_THRESHOLD, ge=0)
    # Search results cached per namespace generation (0 turns it off); a
    # write bumps the generation, so the cache never serves stale results.
    result_cache_entries: int = Field(10_000, ge=0)
    # ... and in bytes of the texts and metadata they hold.
    result_cache_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # Compaction: a namespace whose index holds more deleted slots than this
    # fraction of its slots is rebuilt (deleted vectors reclaimed) and the
    # database vacuumed after the write that crossed it. 0 turns it off.
    compact_deleted_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # Below this many slots an index is never compacted automatically.
    compact_min_slots: int = Field(1024, ge=0)
    # Indexes written since their last save are saved this often (0: only at
    # shutdown and on compaction): a restart then catches up fewer rows, and
    # the float32 vectors of new chunks move from RAM to the mapped file.
    save_interval_s: float = Field(300.0, ge=0)


class EmbeddingConfig(_Section):
    """The ONNX encoder and its tokenizer.

    By default the encoder is our own export of the source model in
    ``model_dir`` (safetensors + tokenizer, `rag-grpc model prepare`), made on
    first use and cached under ``export_dir`` (default ``<data dir>/models``).
    Setting ``onnx_path`` serves a user's own ONNX encoder instead, with the
    tokenizer, pooling and normalisation given here.
    """

    model_dir: Path = Path("models/all-MiniLM-L6-v2")
    # fp32, fp16 (GPU) or int8 (CPU); auto picks fp16 when ONNX Runtime offers
    # CUDA or TensorRT and int8 otherwise (2.2x fp32 passages on a 2-core CPU,
    # see bench/RESULTS.md).
    variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    export_dir: Path | None = None
    # A user-provided encoder: an ONNX graph taking input_ids / attention_mask
    # (and token_type_ids when it declares them) plus a Hugging Face
    # tokenizer.json.
    onnx_path: Path | None = None
    tokenizer_path: Path | None = None
    model_id: str | None = None
    # "none": the graph already outputs one vector per text; "mean" / "cls":
    # it outputs token states [batch, tokens, dim] and we pool them.
    pooling: Literal["mean", "cls", "none"] = "mean"
    normalize: bool = True
    max_sequence_length: int = Field(256, ge=8, le=8192)
    # ONNX Runtime providers to use, in order; empty means the best available
    # of TensorRT, CUDA, CPU.
    providers: tuple[str, ...] = ()
    batch_size: int = Field(32, ge=1, le=4096)
    intra_op_threads: int = Field(0, ge=0, le=256)
    # ONNX Runtime's threads spin briefly after each op instead of sleeping:
    # lower latency for a lone dense query (2.3 vs 4 ms p50 per short query
    # on 2 cores), at the cost of CPU the gRPC side could use under load and
    # the core a hybrid search's lexical arm runs on meanwhile: with it on,
    # hybrid took 7.98 ms p50 in process against 6.09 ms with it off (dense
    # 3.71 vs 4.58, bench/RESULTS.md). Off, as hybrid is the default mode.
    intra_op_spinning: bool = False
    # Micro-batching of concurrent requests: a batch closes at this many texts
    # or this long after its first text arrived (0: take what is queued).
    # Measured on 2 cores with 32 clients of short queries (bench/RESULTS.md):
    # 32 texts without a wait gave 1.5-1.65x the rate of batches of one;
    # waiting 1-2 ms for more gave no more and cost a lone caller its latency.
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_delay_ms: float = Field(0.0, ge=0, le=1000)
    # Texts waiting for the model beyond this get RESOURCE_EXHAUSTED.
    max_queue_texts: int = Field(8192, ge=1)
    # Embedding cache size (0 turns it off).
    cache_bytes: int = Field(64 * 1024 * 1024, ge=0)

    @model_validator(mode="after")
    def _user_model_complete(self) -> EmbeddingConfig:
        if self.onnx_path is not None and self.tokenizer_path is None:
            raise ValueError("embedding.onnx_path needs embedding.tokenizer_path as well")
        if self.tokenizer_path is not None and self.onnx_path is None:
            raise ValueError("embedding.tokenizer_path is only used with embedding.onnx_path")
        return self


class RetrievalConfig(_Section):
    """How Search finds candidates when the request leaves it to the server:
    dense (HNSW), lexical (BM25 over SQLite FTS5) or hybrid (both, fused)."""

    # Hybrid with relative-score fusion: best recall@10 and MRR@10 on
    # bench/quality.py (0.925 / 0.739 against dense 0.850 / 0.612 and RRF
    # 0.898 / 0.704, bench/RESULTS.md).
    default_mode: Literal["dense", "lexical", "hybrid"] = "hybrid"
    fusion: Literal["rrf", "relative_score"] = "relative_score"
    # Reciprocal rank fusion's k (as Milvus' RRFRanker).
    rrf_k: int = Field(60, ge=1, le=1000)
    dense_weight: float = Field(1.0, ge=0.0, le=1.0)
    lexical_weight: float = Field(1.0, ge=0.0, le=1.0)
    # Chunks each ranking of a hybrid search reads before fusion (at least k).
    hybrid_candidates: int = Field(50, ge=1, le=10_000)
    # Re-rank with the cross-encoder ([rerank]) when a request does not say.
    rerank_by_default: bool = False

    @model_validator(mode="after")
    def _some_weight(self) -> RetrievalConfig:
        if self.dense_weight == 0 and self.lexical_weight == 0:
            raise ValueError("retrieval.dense_weight and lexical_weight cannot both be 0")
        return self


class RerankConfig(_Section):
    """An optional cross-encoder that re-scores the best candidates of a
    search (off unless a model is configured; none ships with rag-grpc).

    ``model_dir``: a Hugging Face BERT-family sequence-classification model
    (config.json, model.safetensors, tokenizer.json), exported to ONNX by our
    own exporter on first use and cached like the embedder's. Or
    ``onnx_path`` + ``tokenizer_path``: a user's ONNX cross-encoder taking
    input_ids / attention_mask (/ token_type_ids) and giving one logit per
    pair. ``sha256``: optional expected hashes by file name, checked at start.
    """

    model_dir: Path | None = None
    onnx_path: Path | None = None
    tokenizer_path: Path | None = None
    sha256: dict[str, str] = Field(default_factory=dict)
    model_id: str | None = None
    variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    # Empty: the best available of TensorRT, CUDA, CPU (as the embedder).
    providers: tuple[str, ...] = ()
    max_sequence_length: int = Field(512, ge=8, le=8192)
    batch_size: int = Field(16, ge=1, le=1024)
    intra_op_threads: int = Field(0, ge=0, le=256)
    # Candidates re-scored when a request gives no rerank_top_n, and the most
    # a request may ask for (each costs one model pass over query + chunk).
    top_n: int = Field(50, ge=1, le=10_000)
    max_top_n: int = Field(200, ge=1, le=10_000)

    @model_validator(mode="after")
    def _one_model(self) -> RerankConfig:
        if self.onnx_path is not None and self.model_dir is not None:
            raise ValueError("set rerank.model_dir or rerank.onnx_path, not both")
        if (self.onnx_path is None) != (self.tokenizer_path is None):
            raise ValueError("rerank.onnx_path and rerank.tokenizer_path go together")
        if self.top_n > self.max_top_n:
            raise ValueError("rerank.top_n cannot exceed rerank.max_top_n")
        return self

    @property
    def configured(self) -> bool:
        return self.model_dir is not None or self.onnx_path is not None


class ChunkingConfig(_Section):
    """Token-aware chunking of documents."""

    chunk_tokens: int = Field(200, ge=16, le=8192)
    overlap_tokens: int = Field(40, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"chunking.overlap_tokens ({self.overlap_tokens}) must be smaller than "
                f"chunking.chunk_tokens ({self.chunk_tokens})"
            )
        return self


class LimitsConfig(_Section):
    """Request limits; requests past them get INVALID_ARGUMENT."""

    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1, le=10_000)
    # Search breadth per query (HNSW ef); larger costs time linearly.
    max_ef: int = Field(4096, ge=1, le=65_536)
    # Namespaces this store may hold (each has its own index in memory).
    max_namespaces: int = Field(1000, ge=1)
    # RAM all vector indexes may hold together; a write that would pass it
    # gets RESOURCE_EXHAUSTED (never the OOM killer). None: 70 % of this
    # machine's physical memory; 0: no limit.
    max_index_bytes: int | None = Field(None, ge=0)
    max_document_bytes: int = Field(1024 * 1024, ge=1)
    max_documents_per_upsert: int = Field(1000, ge=1)
    max_ids_per_request: int = Field(10_000, ge=1)
    # A delete by filter matching more documents than this is refused (narrow
    # the filter, or delete in several calls).
    max_delete_matches: int = Field(10_000, ge=1)
    # Metadata per document: keys, and bytes of one string value (metadata
    # counts toward max_document_bytes as well).
    max_metadata_keys: int = Field(64, ge=1)
    max_metadata_value_bytes: int = Field(4096, ge=1)
    # Values in all any_of conditions of one filter together.
    max_filter_values: int = Field(4096, ge=1)
    # Generate: passages and their bytes in one request's context.
    max_generate_passages: int = Field(100, ge=1)
    max_generate_context_bytes: int = Field(1024 * 1024, ge=1)
    max_batch_queries: int = Field(256, ge=1)
    max_query_bytes: int = Field(16 * 1024, ge=1)
    max_embed_texts: int = Field(256, ge=1)
    max_text_bytes: int = Field(64 * 1024, ge=1)
    max_job_documents: int = Field(10_000, ge=1)
    max_pending_jobs: int = Field(64, ge=1)
    default_ask_k: int = Field(5, ge=1)
    max_ask_k: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _defaults_within_max(self) -> LimitsConfig:
        if self.default_k > self.max_k:
            raise ValueError(f"limits.default_k ({self.default_k}) exceeds limits.max_k")
        if self.default_ask_k > self.max_ask_k:
            raise ValueError(f"limits.default_ask_k ({self.default_ask_k}) exceeds max_ask_k")
        return self


class TritonConfig(_Section):
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
        return _grpc_target(value, "generation.triton.url", "TLS (ssl, certificate_chain)")


class GenerationConfig(_Section):
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


class IngestionConfig(_Section):
    """Where ingestion jobs queue: the SQLite database in the data dir, or
    NATS JetStream shared by several workers and retrieval replicas."""

    queue: Literal["sqlite", "nats"] = "sqlite"
    # One URL, or the nodes of a cluster separated by commas.
    nats_url: str = "nats://127.0.0.1:4222"
    # Names of the JetStream streams and bucket: <prefix>_JOBS, <prefix>_WRITES
    # and <prefix>_STATUS (subjects <prefix>.jobs, <prefix>.writes, lower case).
    nats_prefix: str = Field("RAG", pattern=r"^[A-Z][A-Z0-9_]{0,31}$")
    # JetStream replicas of the streams (3 on a three-node NATS cluster).
    nats_replicas: int = Field(1, ge=1, le=5)
    # This process takes documents from the queue (chunks and embeds them).
    worker: bool = True
    # This process applies the write log to its store and index (a replica).
    apply: bool = True
    # Documents fetched and embedded together by a worker.
    batch_documents: int = Field(32, ge=1, le=1024)
    # A document not acknowledged in this time goes to another worker, at
    # most max_deliver times; then it fails with its error.
    ack_wait_s: float = Field(60.0, gt=0)
    max_deliver: int = Field(5, ge=1, le=100)
    # Documents queued and not yet processed, past which Submit is refused.
    max_pending_documents: int = Field(200_000, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    # How long Upsert/Delete wait for this replica to apply their write.
    apply_timeout_s: float = Field(30.0, gt=0)
    # A WatchJob stream ends after this long even if the job goes on (the
    # client watches again), so forgotten watchers cannot pile up.
    watch_max_s: float = Field(3600.0, gt=0)
    # Retention of the <P>_WRITES log: NATS drops the oldest entries past
    # either limit (0: no limit). A replica whose position falls out of this
    # window stops applying and is restored from a peer's backup, so keep it
    # longer than a replica may be down. Set them alike on every process: the
    # last one to start applies its own to the stream.
    log_max_age_s: float = Field(7 * 86400.0, ge=0)
    log_max_bytes: int = Field(10 * 2**30, ge=0)


class RemoteConfig(_Section):
    """Addresses of remote services; unset means in-process."""

    retrieval_target: str | None = None
    generation_target: str | None = None
    call_timeout_s: float = Field(30.0, gt=0)
    health_probe_interval_s: float = Field(2.0, gt=0)

    @field_validator("retrieval_target", "generation_target")
    @classmethod
    def _target_without_credentials(cls, value: str | None) -> str | None:
        return _grpc_target(value, "remote target", "server.auth_token") if value else value


class RetentionConfig(_Section):
    """Time to live of documents, per namespace; a background sweeper deletes
    documents not written for longer (no entry: kept for ever)."""

    ttl_s: dict[str, float] = Field(default_factory=dict)
    sweep_interval_s: float = Field(60.0, gt=0)

    @field_validator("ttl_s")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for namespace, ttl in value.items():
            if ttl <= 0:
                raise ValueError(f"retention.ttl_s[{namespace!r}] must be positive, got {ttl}")
        return value


class TelemetryConfig(_Section):
    """OpenTelemetry traces and metrics."""

    # OTLP/gRPC collector for traces and metrics, e.g. "127.0.0.1:4317".
    otlp_endpoint: str | None = None
    otlp_insecure: bool = True
    # Prometheus scrape endpoint (/metrics); None: off, 0: any free port.
    prometheus_port: int | None = Field(None, ge=0, le=65535)
    prometheus_host: str = "127.0.0.1"
    trace_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    export_interval_s: float = Field(5.0, gt=0)
    # A search "succeeds" when its best hit scores at least this (cosine).
    relevance_threshold: float = Field(0.3, ge=-1.0, le=1.0)


class LoggingConfig(_Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    # The one-line log of each call: failed calls and traced calls (a sampled
    # span) are always logged at INFO; this share of the other successful
    # calls too, the rest at DEBUG. A line per call cost 14 % of Search
    # throughput (measured); set 1.0 for a full access log.
    call_log_sample_ratio: float = Field(0.01, ge=0.0, le=1.0)


class FlagConfig(_Section):
    """One feature flag, a ``[flags.<name>]`` table (names in rag_grpc/flags.py).

    On for a request when enabled, its key is not in ``deny``, and the key is
    in ``allow`` or falls in the first ``percentage`` of the stable hash
    buckets (sha256 of flag name and key, so each flag splits keys on its own
    and a key keeps its bucket across restarts and replicas)."""

    # Off: off for everyone, allow list included (the kill switch).
    enabled: bool = True
    # Share of keys the flag is on for, 0-100 (fractions allowed: 0.5).
    percentage: float = Field(100.0, ge=0.0, le=100.0)
    # What is hashed and listed: the request's tenant ("" on a single-tenant
    # server) or its namespace as stored ("acme~docs" under a policy).
    key: Literal["tenant", "namespace"] = "namespace"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _lists_apart(self) -> FlagConfig:
        both = sorted(set(self.allow) & set(self.deny))
        if both:
            raise ValueError(f"{', '.join(both)} both allowed and denied; keep one")
        return self


class Settings(BaseSettings):
    """The whole configuration of a rag-grpc process."""

    model_config = SettingsConfigDict(
        env_prefix="RAG_GRPC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    data_dir: Path = Path("data")
    # NoDecode: "retrieval,rag" from the environment is split by the validator below.
    services: Annotated[tuple[str, ...], NoDecode] = SERVICE_NAMES
    server: ServerConfig = ServerConfig()
    index: IndexConfig = IndexConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    rerank: RerankConfig = RerankConfig()
    chunking: ChunkingConfig = ChunkingConfig()
    limits: LimitsConfig = LimitsConfig()
    generation: GenerationConfig = GenerationConfig()
    remote: RemoteConfig = RemoteConfig()
    ingestion: IngestionConfig = IngestionConfig()
    logging: LoggingConfig = LoggingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    retention: RetentionConfig = RetentionConfig()
    auth: AuthConfig = AuthConfig()
    # 32 random bytes that encrypt backup archives (AES-256-GCM); the
    # environment variable RAG_GRPC_BACKUP_KEY_FILE sets it too.
    backup_key_file: Path | None = None
    # Feature flags by name, reloaded on SIGHUP (rag_grpc/flags.py).
    flags: dict[str, FlagConfig] = Field(default_factory=dict)

    # The TOML files this class reads, lowest priority first, as (name, data);
    # set on the per-load subclass, so the choice stays out of global state.
    config_layers: ClassVar[tuple[tuple[str, dict[str, Any]], ...]] = ()
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)
    _sources: ConfigSources | None = PrivateAttr(default=None)

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, value: dict[str, FlagConfig]) -> dict[str, FlagConfig]:
        from rag_grpc.flags import KNOWN_FLAGS

        unknown = sorted(set(value) - set(KNOWN_FLAGS))
        if unknown:
            # A misspelt flag would otherwise stay on for everyone unnoticed.
            raise ValueError(
                f"unknown flag(s) {', '.join(unknown)}; known: {', '.join(KNOWN_FLAGS)}"
            )
        return value

    @field_validator("services", mode="before")
    @classmethod
    def _split_services(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("services")
    @classmethod
    def _known_services(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in SERVICE_NAMES]
        if unknown or not value:
            raise ValueError(
                f"unknown service(s) {unknown or '(none given)'}; "
                f"choose from {', '.join(SERVICE_NAMES)}"
            )
        return tuple(dict.fromkeys(value))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        layers = getattr(settings_cls, "config_layers", ())
        if layers:
            sources.append(_TomlLayers(settings_cls, layers))
        return tuple(sources)

    @property
    def sources(self) -> ConfigSources | None:
        """The files and explicit values this configuration was loaded from
        (None when built directly), to load it again on reload."""
        return self._sources

    def origin(self, path: tuple[str, ...]) -> str:
        """Where the value at path (("limits", "max_k")) came from: "default",
        a file's name, an environment variable's name or "command line"."""
        for end in range(len(path), 0, -1):
            found = self._origins.get(path[:end])
            if found is not None:
                return found
        if path == ("server", "auth_token") and self.server.auth_token is not None:
            return f"{self.origin(('server', 'auth_token_file'))} (server.auth_token_file)"
        return "default"

    @property
    def audit_path(self) -> Path:
        """The audit log's file."""
        return self.auth.audit_db or self.data_dir / "audit.sqlite3"

    @property
    def usage_path(self) -> Path:
        """The usage ledger's file."""
        return self.auth.usage_db or self.data_dir / "usage.sqlite3"

    @property
    def trusted_proxies(self) -> tuple[str, ...]:
        """auth.trusted_proxies and the older server.trusted_proxies together."""
        return tuple(dict.fromkeys((*self.auth.trusted_proxies, *self.server.trusted_proxies)))

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets shown as
        '**********' and credentials in URLs as ***@."""
        data = self.model_dump(mode="json")
        for path in _URL_FIELDS:
            *parents, name = path
            section = data
            for parent in parents:
                section = section[parent]
            if section.get(name):
                section[name] = redact_url(section[name])
        return data


# Settings fields holding a URL or target that may carry user:password@.
_URL_FIELDS = (
    ("ingestion", "nats_url"),
    ("telemetry", "otlp_endpoint"),
    ("generation", "triton", "url"),
    ("index", "milvus", "uri"),
    ("remote", "retrieval_target"),
    ("remote", "generation_target"),
)


def redact_url(url: str) -> str:
    """A URL (or comma-separated URLs) with any user:password@ replaced by
    ***@, so credentials never reach a log line, a printed config or a
    client's error message."""
    return ",".join(_CREDENTIALS_RE.sub(r"\1***@", part) for part in url.split(","))


def split_url_credentials(url: str) -> tuple[str, str | None]:
    """The URL without its user:password@, and that user:password (None
    when it has none), for clients that take credentials separately."""
    match = _CREDENTIALS_RE.match(url)
    if match is None:
        return url, None
    scheme = match.group(1) or ""
    return scheme + url[match.end() :], url[len(scheme) : match.end() - 1]


# The user info runs to the last @ before the path: a password may itself
# contain an unescaped @ (greedy match), never a / (that starts the path).
_CREDENTIALS_RE = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.-]*://)?[^/\s]+@")


def read_secret_file(path: Path, what: str) -> str:
    """A token from a file readable by its owner only (trailing newline
    dropped); ValueError with what to do when it is missing, open to others
    or empty."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None
    if mode & 0o077:
        raise ValueError(
            f"{what} {path} is readable or writable by other users (mode "
            f"{mode & 0o777:04o}); restrict it with `chmod 600 {path}`"
        )
    token = text.strip()
    if not token:
        raise ValueError(f"{what} {path} is empty")
    return token


def _grpc_target(value: str, what: str, instead: str) -> str:
    """Refuse user:password@ in a gRPC target: gRPC has no credentials in
    its targets (it fails to resolve such a name) and would echo the whole
    target, password included, in its errors to our callers and logs."""
    if split_url_credentials(value)[1] is not None:
        raise ValueError(
            f"{what} {redact_url(value)!r} must not contain user:password@ (gRPC targets "
            f"carry no credentials); use HOST:PORT and {instead} instead"
        )
    return value


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad field."""


@dataclass(frozen=True)
class ConfigSources:
    """Where a Settings was loaded from: its TOML files, lowest priority
    first, and the explicit values given on top (CLI flags)."""

    files: tuple[Path, ...]
    overrides: Mapping[str, Any]


# An environment names a file: letters, digits, - and _ only.
_ENV_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_CONFIG_FILE = Path("rag-grpc.toml")


def config_files(config_file: Path | None = None, env: str | None = None) -> tuple[Path, ...]:
    """The TOML files to read, lowest priority first: the base file
    (config_file, else $RAG_GRPC_CONFIG) and, for an environment (env, else
    $RAG_GRPC_ENV), its overlay beside it: base rag-grpc.toml, env prod ->
    rag-grpc.prod.toml. With an environment and no base named,
    ./rag-grpc.toml is the base when it exists. ConfigError when a named
    file or the overlay is missing."""
    if config_file is None and os.environ.get("RAG_GRPC_CONFIG"):
        config_file = Path(os.environ["RAG_GRPC_CONFIG"])
    env = env or os.environ.get("RAG_GRPC_ENV") or None
    files: list[Path] = []
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        files.append(config_file)
    if env is None:
        return tuple(files)
    if not _ENV_NAME_RE.match(env):
        raise ConfigError(
            f"environment name {env!r} must be letters, digits, '-' or '_' (like prod)"
        )
    base = config_file or DEFAULT_CONFIG_FILE
    if config_file is None and base.is_file():
        files.append(base)
    overlay = base.with_name(f"{base.stem}.{env}{base.suffix or '.toml'}")
    if not overlay.is_file():
        raise ConfigError(f"environment {env!r} needs its overlay file {overlay}, which is missing")
    files.append(overlay)
    return tuple(files)


def load_settings(
    config_file: Path | None = None, *, env: str | None = None, **overrides: Any
) -> Settings:
    """Load and validate the configuration (base file, the environment's
    overlay, environment variables, overrides); raise ConfigError with a
    readable message."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_from(ConfigSources(config_files(config_file, env), given))


def load_from(sources: ConfigSources) -> Settings:
    """Load a configuration from these sources again (a reload reads the
    files afresh); ConfigError when it is invalid."""
    from pydantic import ValidationError

    layers = tuple((str(path), _read_toml(path)) for path in sources.files)
    settings_cls: type[Settings] = Settings
    if layers:
        settings_cls = type("FileSettings", (Settings,), {"config_layers": layers})
    try:
        settings = settings_cls(**sources.overrides)
        environment = EnvSettingsSource(settings_cls)()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    origins: dict[tuple[str, ...], str] = {}
    for name, data in layers:
        origins.update(dict.fromkeys(_leaves(data), name))
    names = {variable.upper() for variable in os.environ}
    for path in _leaves(environment):
        origins[path] = _variable_name(path, names)
    origins.update(dict.fromkeys(_leaves(sources.overrides), "command line"))
    settings._origins = origins
    settings._sources = sources
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """base with overlay on top: tables merged key by key, any other value
    (arrays included) replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, path)
        else:
            yield path


def _variable_name(path: tuple[str, ...], names: set[str]) -> str:
    # A section may come whole from one variable (RAG_GRPC_LIMITS='{...}'):
    # the longest name that is set is the one that gave this value.
    for end in range(len(path), 0, -1):
        name = "RAG_GRPC_" + "__".join(path[:end]).upper()
        if name in names:
            return name
    return "RAG_GRPC_" + "__".join(path).upper()


class _TomlLayers(PydanticBaseSettingsSource):
    """The configuration files, merged in order (tables key by key)."""

    def __init__(
        self, settings_cls: type[BaseSettings], layers: tuple[tuple[str, dict[str, Any]], ...]
    ) -> None:
        super().__init__(settings_cls)
        self.layers = layers

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ gives the whole merged mapping

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for _, data in self.layers:
            merged = deep_merge(merged, data)
        return merged
