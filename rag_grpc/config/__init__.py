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

Where each part lives (every name below is imported from here):

- ``settings.py``: ``Settings``, the root: all sections, the checks across
  them (services, flags), origins, the redacted printable form.
- ``serving.py``: ``[server]`` (transport, TLS, shared token), ``[auth]``,
  ``[remote]`` and ``[limits]``.
- ``retrieval.py``: ``[chunking]``, ``[embedding]``, ``[index]`` with
  ``[index.milvus]``, ``[retrieval]`` and ``[rerank]``.
- ``generation.py``: ``[generation]`` and ``[generation.triton]``.
- ``ingestion.py``: ``[ingestion]`` (job queue, write log) and ``[retention]``.
- ``observability.py``: ``[telemetry]`` and ``[logging]``.
- ``flags.py``: one ``[flags.<name>]`` table.
- ``base.py``: ``Section``, the frozen, unknown-keys-refused base of them all.
- ``credentials.py``: user:password@ in URLs (redact, split, refuse in gRPC
  targets) and secrets read from owner-only files.
- ``sources.py``: which TOML files to read, reading and merging them.
- ``loading.py``: ``load_settings`` / ``load_from``, errors and origins.

Importing this package loads pydantic only: not the native core, gRPC or
numpy (tests/test_server_process.py checks it).
"""

from rag_grpc.config.credentials import read_secret_file, redact_url, split_url_credentials
from rag_grpc.config.flags import FlagConfig
from rag_grpc.config.generation import GenerationConfig, TritonConfig
from rag_grpc.config.ingestion import IngestionConfig, RetentionConfig
from rag_grpc.config.loading import load_from, load_settings
from rag_grpc.config.observability import LoggingConfig, TelemetryConfig
from rag_grpc.config.retrieval import (
    DEFAULT_EXACT_THRESHOLD,
    ChunkingConfig,
    EmbeddingConfig,
    IndexConfig,
    MilvusConfig,
    RerankConfig,
    RetrievalConfig,
)
from rag_grpc.config.serving import (
    MIN_TOKEN_CHARS,
    AuthConfig,
    LimitsConfig,
    RemoteConfig,
    ServerConfig,
)
from rag_grpc.config.settings import Settings
from rag_grpc.config.sources import (
    DEFAULT_CONFIG_FILE,
    ConfigError,
    ConfigSources,
    config_files,
    deep_merge,
)

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_EXACT_THRESHOLD",
    "MIN_TOKEN_CHARS",
    "AuthConfig",
    "ChunkingConfig",
    "ConfigError",
    "ConfigSources",
    "EmbeddingConfig",
    "FlagConfig",
    "GenerationConfig",
    "IndexConfig",
    "IngestionConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MilvusConfig",
    "RemoteConfig",
    "RerankConfig",
    "RetentionConfig",
    "RetrievalConfig",
    "ServerConfig",
    "Settings",
    "TelemetryConfig",
    "TritonConfig",
    "config_files",
    "deep_merge",
    "load_from",
    "load_settings",
    "read_secret_file",
    "redact_url",
    "split_url_credentials",
]
