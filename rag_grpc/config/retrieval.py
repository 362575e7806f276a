"""Sections of the search path: how documents are chunked ([chunking]) and
embedded ([embedding]), the vector index and its Milvus backend ([index],
[index.milvus]), how candidates are found and fused ([retrieval]) and
re-scored ([rerank])."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from rag_grpc.config.base import Section
from rag_grpc.config.credentials import secret_from_file, split_url_credentials

# The default of `index.exact_scan_threshold`, the same number as the native
# core's own default (rag_grpc.native.DEFAULT_EXACT_THRESHOLD, checked by
# tests/test_server_process.py): written here so that reading the config
# does not load the compiled extension.
DEFAULT_EXACT_THRESHOLD = 12_000


class MilvusConfig(Section):
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
        return secret_from_file(data, "token", "index.milvus")

    @field_validator("uri")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        if split_url_credentials(value)[1] is not None:
            raise ValueError("index.milvus.uri must not carry user:password@; set token instead")
        return value


class IndexConfig(Section):
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


class EmbeddingConfig(Section):
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


class RetrievalConfig(Section):
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


class RerankConfig(Section):
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


class ChunkingConfig(Section):
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
