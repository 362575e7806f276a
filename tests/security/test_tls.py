"""TLS credentials and the peer's identity over real handshakes: a grpc.aio
server on a free port with server_credentials, called with channel_credentials."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.security.tls import (
    TlsConfigError,
    channel_credentials,
    has_client_certificate,
    peer_identity,
    server_credentials,
)
from rag_grpc.security.xfcc import TrustedProxies, forwarded_identity
from tests.security.certs import Issued, issue, make_ca

WHOAMI = "/test.Identity/Whoami"


class IdentityServer:
    """A grpc.aio server on its own loop thread, serving health and a Whoami
    method that answers with what the security modules make of the caller."""

    def __init__(self, credentials: grpc.ServerCredentials) -> None:
        self.credentials = credentials
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def start(self) -> IdentityServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        # No serializers: the method receives and returns raw bytes.
        whoami = grpc.unary_unary_rpc_method_handler(self._whoami)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Identity", {"Whoami": whoami})]
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", self.credentials)
        await self.server.start()

    async def _whoami(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        auth = context.auth_context()
        mtls = peer_identity(auth)
        metadata = dict(context.invocation_metadata() or ())
        forwarded = forwarded_identity(
            metadata.get("x-forwarded-client-cert"),
            context.peer(),
            TrustedProxies(["127.0.0.1", "::1"]),
            peer_authenticated=has_client_certificate(auth),
        )
        answer = {
            "mtls": mtls and [mtls.principal, mtls.source],
            "xfcc": forwarded and [forwarded.principal, forwarded.source],
            "grpc_sans": [v.decode() for v in auth.get("x509_subject_alternative_name", [])],
        }
        return json.dumps(answer).encode()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def start_server() -> Iterator[Callable[[grpc.ServerCredentials], IdentityServer]]:
    started: list[IdentityServer] = []

    def start(credentials: grpc.ServerCredentials) -> IdentityServer:
        server = IdentityServer(credentials).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass(frozen=True)
class Pki:
    """A CA and a server certificate for 127.0.0.1, written into dir."""

    dir: Path
    ca: Issued
    ca_pem: Path
    server_pem: Path
    server_key: Path

    def client(self, issued: Issued, stem: str) -> grpc.ChannelCredentials:
        """Channel credentials presenting issued (written as <stem>.pem/.key)."""
        cert, key = issued.write(self.dir, stem)
        return channel_credentials(self.ca_pem, cert, key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca()
    server = issue(ca, "rag-grpc", dns=["localhost"], ips=["127.0.0.1"], usage="server")
    ca_pem, _ = ca.write(tmp_path, "ca")
    return Pki(tmp_path, ca, ca_pem, *server.write(tmp_path, "server"))


def whoami(
    server: IdentityServer,
    credentials: grpc.ChannelCredentials,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    with grpc.secure_channel(server.target, credentials) as channel:
        reply = channel.unary_unary(WHOAMI, None, None)(b"", timeout=10, metadata=metadata)
    answer: dict[str, Any] = json.loads(reply)
    return answer


def health_code(server: IdentityServer, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(server.target, credentials) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def mtls_server(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> IdentityServer:
    return start_server(server_credentials(pki.server_pem, pki.server_key, pki.ca_pem))


def test_the_first_san_uri_wins_over_dns_names_and_the_cn(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> None:
    server = mtls_server(pki, start_server)
    # The DNS names come first in the certificate, so grpc's untyped flattened
    # SAN list starts with a DNS name: taking its first entry would be wrong.
    client = issue(
        pki.ca,
        "app-cn",
        dns=["app.internal"],
        uris=["spiffe://example.org/acme/app", "spiffe://example.org/other"],
        usage="client",
    )
    answer = whoami(server, pki.client(client, "app"))
    assert answer["mtls"] == ["spiffe://example.org/acme/app", "mtls"]
    assert answer["grpc_sans"][0] == "app.internal"


def test_the_cn_is_the_principal_when_there_is_no_uri(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> None:
    server = mtls_server(pki, start_server)
    client = issue(pki.ca, "batch-job", dns=["batch.internal"], usage="client")
    assert whoami(server, pki.client(client, "batch"))["mtls"] == [
        "batch-job",
        "mtls",
    ]
    nobody = issue(pki.ca, None, dns=["only-dns.internal"], usage="client")
    assert whoami(server, pki.client(nobody, "nobody"))["mtls"] is None


def test_a_client_without_a_certificate_is_refused_by_the_handshake(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> None:
    server = mtls_server(pki, start_server)
    assert health_code(server, channel_credentials(pki.ca_pem, None, None)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    client = issue(pki.ca, "ok", usage="client")
    assert health_code(server, pki.client(client, "ok")) == grpc.StatusCode.OK


def test_a_client_certificate_from_another_ca_is_refused(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> None:
    server = mtls_server(pki, start_server)
    stranger = issue(make_ca("another CA"), "x", uris=["spiffe://example.org/ops"], usage="client")
    assert health_code(server, pki.client(stranger, "stranger")) == (grpc.StatusCode.UNAVAILABLE)


def test_without_a_client_ca_there_is_no_peer_identity(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> None:
    server = start_server(server_credentials(pki.server_pem, pki.server_key, None))
    answer = whoami(server, channel_credentials(pki.ca_pem, None, None))
    assert answer["mtls"] is None
    # The same server does not ask for client certificates, so one offered
    # anyway is not seen and grants nothing.
    client = issue(pki.ca, "app", uris=["spiffe://example.org/app"], usage="client")
    assert whoami(server, pki.client(client, "app"))["mtls"] is None


def test_xfcc_is_believed_only_over_a_mutual_tls_hop_from_a_trusted_address(
    pki: Pki, start_server: Callable[[grpc.ServerCredentials], IdentityServer]
) -> None:
    # The proxy's hop is real: its peer string comes from grpc and its
    # authentication from the handshake, as the interceptor will see them.
    header = (("x-forwarded-client-cert", "By=spiffe://example.org/envoy;URI=spiffe://e/user"),)
    proxy = issue(pki.ca, "envoy", uris=["spiffe://example.org/envoy"], usage="client")
    mutual = mtls_server(pki, start_server)
    assert whoami(mutual, pki.client(proxy, "proxy"), header)["xfcc"] == [
        "spiffe://e/user",
        "xfcc",
    ]
    one_way = start_server(server_credentials(pki.server_pem, pki.server_key, None))
    assert whoami(one_way, channel_credentials(pki.ca_pem, None, None), header)["xfcc"] is None


# Configuration errors: each names the file and what to do.


def test_missing_and_unreadable_files_are_named(pki: Pki) -> None:
    missing = pki.dir / "nope.pem"
    with pytest.raises(TlsConfigError, match=r"server certificate file .*nope\.pem does not exist"):
        server_credentials(missing, pki.server_key, None)
    with pytest.raises(TlsConfigError, match=r"client CA file .*nope\.pem does not exist"):
        server_credentials(pki.server_pem, pki.server_key, missing)
    # A directory cannot be read even by root (chmod 000 could be).
    with pytest.raises(TlsConfigError, match=r"cannot read server key file .*: Is a directory"):
        server_credentials(pki.server_pem, pki.dir, None)


def test_files_that_are_not_pem_are_named(pki: Pki) -> None:
    der = pki.dir / "server.der"
    der.write_bytes(b"\x30\x82\x01\x0a binary")
    with pytest.raises(TlsConfigError, match=r"server\.der is not a PEM certificate.*DER"):
        server_credentials(der, pki.server_key, None)
    # Certificate and key swapped: the hint says so.
    with pytest.raises(TlsConfigError, match=r"server\.key is not a PEM certificate.*swapped"):
        server_credentials(pki.server_key, pki.server_pem, None)
    garbage = pki.dir / "garbage.key"
    garbage.write_text("not a key\n")
    with pytest.raises(TlsConfigError, match=r"server key .*garbage\.key is not a PEM private key"):
        server_credentials(pki.server_pem, garbage, None)


def test_an_encrypted_key_is_refused_with_the_fix(pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    locked = pki.dir / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsConfigError, match=r"locked\.key is encrypted.*openssl pkey"):
        server_credentials(pki.server_pem, locked, None)


def test_a_key_that_does_not_match_the_certificate(pki: Pki) -> None:
    other = issue(pki.ca, "other", usage="server")
    _, other_key = other.write(pki.dir, "other")
    with pytest.raises(
        TlsConfigError, match=r"server key .*other\.key does not match certificate .*server\.pem"
    ):
        server_credentials(pki.server_pem, other_key, None)


def test_expired_certificates_are_refused_with_their_date(pki: Pki) -> None:
    old = issue(pki.ca, "old", ips=["127.0.0.1"], usage="server", expired=True)
    cert, key = old.write(pki.dir, "old")
    with pytest.raises(
        TlsConfigError, match=r"server certificate .*old\.pem \(CN=old\) expired on"
    ):
        server_credentials(cert, key, None)
    with pytest.raises(TlsConfigError, match=r"client certificate .*old\.pem .*expired on"):
        channel_credentials(pki.ca_pem, cert, key)
    old_ca, _ = make_ca("old CA", expired=True).write(pki.dir, "old-ca")
    with pytest.raises(TlsConfigError, match=r"client CA .*old-ca\.pem \(CN=old CA\) expired"):
        server_credentials(pki.server_pem, pki.server_key, old_ca)


def test_a_client_ca_that_is_not_a_ca(pki: Pki) -> None:
    leaf = issue(pki.ca, "leaf", usage="client")
    leaf_pem, _ = leaf.write(pki.dir, "leaf")
    with pytest.raises(TlsConfigError, match=r"client CA .*leaf\.pem \(CN=leaf\) is not a CA"):
        server_credentials(pki.server_pem, pki.server_key, leaf_pem)
    # A bundle is checked certificate by certificate.
    bundle = pki.dir / "bundle.pem"
    bundle.write_bytes(pki.ca_pem.read_bytes() + leaf_pem.read_bytes())
    with pytest.raises(TlsConfigError, match=r"bundle\.pem \(certificate 2 in the file\)"):
        server_credentials(pki.server_pem, pki.server_key, bundle)


def test_a_certificate_for_the_wrong_purpose(pki: Pki) -> None:
    client_only = issue(pki.ca, "c", usage="client")
    cert, key = client_only.write(pki.dir, "client-only")
    with pytest.raises(TlsConfigError, match=r"client-only\.pem \(CN=c\) is not for serverAuth"):
        server_credentials(cert, key, None)
    with pytest.raises(TlsConfigError, match=r"server\.pem .* is not for clientAuth"):
        channel_credentials(pki.ca_pem, pki.server_pem, pki.server_key)


def test_a_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match=r"certificate .*server\.pem without a key"):
        channel_credentials(pki.ca_pem, pki.server_pem, None)
    with pytest.raises(TlsConfigError, match=r"key .*server\.key without a certificate"):
        channel_credentials(pki.ca_pem, None, pki.server_key)
