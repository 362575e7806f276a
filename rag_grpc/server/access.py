"""Who may call this process: identity sources, policy, audit log and usage
ledger, checked before anything expensive is built. A server bound beyond
loopback with no identity source refuses to start unless told to run open."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from rag_grpc.config import ConfigError, Settings
from rag_grpc.security.access import AccessControl
from rag_grpc.security.api_keys import ApiKeyConfigError, ApiKeys
from rag_grpc.security.audit import AuditLog
from rag_grpc.security.authn import Authenticator
from rag_grpc.security.jwt_auth import JwtConfigError, JwtSettings, JwtVerifier
from rag_grpc.security.policy import Policy, PolicyError, PolicyHolder
from rag_grpc.security.usage import UsageLedger
from rag_grpc.security.xfcc import TrustedProxies

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Access:
    """The access control of one process and the files it writes to."""

    control: AccessControl
    audit: AuditLog
    usage: UsageLedger | None


def build_access(settings: Settings, local_retrieval: bool) -> Access:
    """Identity sources, policy, audit log and usage ledger; ConfigError
    names what is wrong. local_retrieval: whether this process keeps a store
    (under NATS it then counts usage through the write log)."""
    s, auth = settings, settings.auth
    try:
        policy = PolicyHolder(auth.policy_file) if auth.policy_file else None
        jwt = None
        if auth.jwt_jwks_file is not None:
            assert auth.jwt_issuer and auth.jwt_audience  # checked by the config
            jwt = JwtVerifier(
                JwtSettings(
                    jwks_file=auth.jwt_jwks_file,
                    issuer=auth.jwt_issuer,
                    audience=auth.jwt_audience,
                    tenant_claim=auth.jwt_tenant_claim,
                )
            )
        if policy is not None:
            ApiKeys(policy.current.api_keys)  # a bad entry fails the start, not a call
    except (PolicyError, JwtConfigError, ApiKeyConfigError) as exc:
        raise ConfigError(str(exc)) from None
    token = s.server.auth_token.get_secret_value() if s.server.auth_token else None
    authenticator = Authenticator(
        token=token,
        jwt=jwt,
        api_keys=_api_keys_of(policy),
        trusted_proxies=TrustedProxies(s.trusted_proxies, trust_unix_socket=auth.trust_unix_socket),
        proxy_identity=auth.proxy_identity,
        client_certificates=s.server.tls_client_ca is not None,
    )
    sources = authenticator.sources
    if not sources and policy is None and not _is_loopback(s.host):
        if not auth.insecure_no_auth:
            raise ConfigError(
                f"refusing to serve {s.host} without authentication: anyone who can "
                "reach the port could read, overwrite and erase every document. "
                "Configure an identity source (auth.policy_file with API keys, "
                "server.tls_client_ca for mutual TLS, auth.jwt_jwks_file, or "
                "server.auth_token), bind 127.0.0.1, or set auth.insecure_no_auth "
                "(--insecure-no-auth) to run open on purpose"
            )
        log.warning(
            "SERVING %s WITHOUT AUTHENTICATION (auth.insecure_no_auth): anyone who "
            "can reach port %d may read, overwrite and erase every document",
            s.host,
            s.port,
        )
    s.data_dir.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(s.audit_path)
    usage = None
    if policy is not None:
        # A process that follows the NATS write log counts usage through
        # it, so that every replica reports the same totals.
        usage = UsageLedger(
            s.usage_path, replicated=s.ingestion.queue == "nats" and local_retrieval
        )
    control = AccessControl(
        authenticator,
        policy=policy,
        require_identity=bool(sources),
        audit=audit,
        usage=usage,
    )
    return Access(control, audit, usage)


def _is_loopback(host: str) -> bool:
    """Whether binding host serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def _api_keys_of(policy: PolicyHolder | None) -> Callable[[], ApiKeys | None]:
    """The API keys of the policy in force, rebuilt only when it is reloaded."""
    built: dict[int, tuple[Policy, ApiKeys | None]] = {}

    def current() -> ApiKeys | None:
        if policy is None:
            return None
        now = policy.current
        cached = built.get(id(now))
        if cached is None or cached[0] is not now:
            built.clear()
            cached = (now, ApiKeys(now.api_keys) if now.api_keys else None)
            built[id(now)] = cached
        return cached[1]

    return current
