"""Sections of the serving process: the gRPC transport and its TLS
([server]), who may call ([auth]), the addresses of remote services
([remote]) and the limits a request must stay within ([limits])."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from rag_grpc.config.base import Section
from rag_grpc.config.credentials import grpc_target, secret_from_file

# A shared bearer token shorter than this is refused at start.
MIN_TOKEN_CHARS = 16


class ServerConfig(Section):
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
        return secret_from_file(data, "auth_token", "server")

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


class AuthConfig(Section):
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


class LimitsConfig(Section):
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


class RemoteConfig(Section):
    """Addresses of remote services; unset means in-process."""

    retrieval_target: str | None = None
    generation_target: str | None = None
    call_timeout_s: float = Field(30.0, gt=0)
    health_probe_interval_s: float = Field(2.0, gt=0)

    @field_validator("retrieval_target", "generation_target")
    @classmethod
    def _target_without_credentials(cls, value: str | None) -> str | None:
        return grpc_target(value, "remote target", "server.auth_token") if value else value
