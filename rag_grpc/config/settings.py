"""The root of the configuration: every section together, the checks across
sections (known services, known flags), where each value came from, and the
configuration as printable data with its secrets hidden."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, PrivateAttr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# The section types are imported at run time (not under TYPE_CHECKING):
# pydantic resolves the string annotations of Settings in this module.
from rag_grpc.config.credentials import redact_url
from rag_grpc.config.flags import FlagConfig
from rag_grpc.config.generation import GenerationConfig
from rag_grpc.config.ingestion import IngestionConfig, RetentionConfig
from rag_grpc.config.observability import LoggingConfig, TelemetryConfig
from rag_grpc.config.retrieval import (
    ChunkingConfig,
    EmbeddingConfig,
    IndexConfig,
    RerankConfig,
    RetrievalConfig,
)
from rag_grpc.config.serving import AuthConfig, LimitsConfig, RemoteConfig, ServerConfig
from rag_grpc.config.sources import ConfigSources, TomlLayers
from rag_grpc.services.registry import SERVICE_NAMES


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
            sources.append(TomlLayers(settings_cls, layers))
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
