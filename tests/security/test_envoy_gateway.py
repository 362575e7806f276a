"""Identity through the real Envoy gateway into a real rag-grpc server, with
mutual TLS on both hops: certificates made here, envoy/render.py's
configuration, the caller's identity seen by rag-grpc in its audit log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from rag_grpc.client import RagClient, RpcError
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from rag_grpc.security.audit import AuditLog
from tests.conftest import CORPUS, ServerThread
from tests.envoy_server import NO_LIMITS, Envoy
from tests.security.certs import issue, make_ca

# Starts Envoy in front of rag-grpc.
pytestmark = pytest.mark.slow

GATEWAY = "spiffe://rag-grpc.test/gateway"
APP = "spiffe://example.org/acme/app"
DASH = "spiffe://example.org/acme/dash"
OPS = "spiffe://example.org/ops"
NOBODY = "spiffe://example.org/nobody"
# Envoy connects to rag-grpc from this loopback address, the only one trusted
# to forward identities; test clients connect from 127.0.0.1.
GATEWAY_SOURCE = "127.0.0.2"
ISSUER = "https://issuer.example.org"
AUDIENCE = "rag-grpc"
# A client certificate whose subject tries to smuggle an operator's URI into
# the header Envoy writes.
FORGED_CN = f'x";URI={OPS};y="'
# A header a client sends itself, hoping it reaches rag-grpc.
FORGED_XFCC = f'By={GATEWAY};URI={OPS};Subject="CN=ops"'

POLICY = f"""
[[tenants]]
name = "acme"
members = [
  {{ identity = "{APP}", role = "writer" }},
  {{ identity = "{DASH}", role = "reader" }},
  {{ identity = "ci-bot", role = "reader" }},
]

[[operators]]
identity = "{OPS}"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA; Envoy's serving and client certificates, rag-grpc's, and clients'."""
    out = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    ca.write(out, "ca")
    loopback_dns, loopback_ips = ["localhost"], ["127.0.0.1"]
    # Envoy's downstream certificate: its URI is the By= of the XFCC it writes.
    issue(
        ca, "localhost", uris=[GATEWAY], usage="server", dns=loopback_dns, ips=loopback_ips
    ).write(out, "server")
    issue(ca, "gateway", uris=[GATEWAY], usage="client").write(out, "gateway")
    issue(ca, "rag-grpc", usage="server", dns=loopback_dns, ips=loopback_ips).write(out, "rag-grpc")
    for stem, uri in (("app", APP), ("dash", DASH), ("ops", OPS), ("nobody", NOBODY)):
        issue(ca, stem, uris=[uri], usage="client").write(out, stem)
    issue(ca, FORGED_CN, usage="client").write(out, "forged")
    (out / "policy.toml").write_text(POLICY)
    return out


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def jwks(pki: Path, signing_key: ec.EllipticCurvePrivateKey) -> Path:
    public = ECAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    path = pki / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    return path


def token(key: ec.EllipticCurvePrivateKey, **changes: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ci-bot", "iat": now, "exp": now + 300}
    claims.update(changes)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})


def tls_server(start_server: Callable[..., ServerThread], pki: Path, **auth: Any) -> ServerThread:
    """rag-grpc with TLS, client certificates required, and the test policy."""
    return start_server(
        server={
            "tls_cert": pki / "rag-grpc.pem",
            "tls_key": pki / "rag-grpc.key",
            "tls_client_ca": pki / "ca.pem",
        },
        auth={
            "policy_file": pki / "policy.toml",
            "trusted_proxies": [GATEWAY_SOURCE],
            "proxy_identity": GATEWAY,
            **auth,
        },
    )


@pytest.fixture
def gateway(tmp_path: Path, pki: Path) -> Iterator[Callable[..., Envoy]]:
    """Envoy in front of a rag-grpc target, mutual TLS on both hops."""
    started: list[Envoy] = []

    def start(upstream: str, *extra: str) -> Envoy:
        workdir = tmp_path / f"envoy{len(started)}"
        workdir.mkdir()
        upstream_tls: tuple[str, ...] = ("--upstream-ca", str(pki / "ca.pem"))
        upstream_tls += ("--upstream-cert", str(pki / "gateway.pem"))
        upstream_tls += ("--upstream-key", str(pki / "gateway.key"))
        proxy = Envoy(
            workdir,
            pki,
            upstream,
            *upstream_tls,
            "--source-address",
            GATEWAY_SOURCE,
            *NO_LIMITS,
            *extra,
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def through(proxy: Envoy, pki: Path, who: str, **kwargs: Any) -> RagClient:
    return RagClient(
        f"localhost:{proxy.port}",
        timeout=10,
        ca=pki / "ca.pem",
        cert=pki / f"{who}.pem",
        key=pki / f"{who}.key",
        **kwargs,
    )


def snapshot(channel: grpc.Channel, xfcc: str | None = None) -> str:
    """An operator-only call; its status code."""
    metadata = (("x-forwarded-client-cert", xfcc),) if xfcc else ()
    stub = admin_service_pb2_grpc.AdminServiceStub(channel)
    request = admin_pb2.SnapshotRequest(unencrypted=True)
    try:
        for _ in stub.Snapshot(request, metadata=metadata, timeout=20):
            pass
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def credentials(pki: Path, who: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / f"{who}.key").read_bytes(),
        (pki / f"{who}.pem").read_bytes(),
    )


def audited(server: ServerThread) -> list[dict[str, Any]]:
    """What rag-grpc recorded, oldest first."""
    log = AuditLog(server.settings.audit_path)
    try:
        return list(log.export())
    finally:
        log.close()


def last_denial(server: ServerThread) -> dict[str, Any]:
    denials = [event for event in audited(server) if event["outcome"] == "denied"]
    assert denials, audited(server)
    return denials[-1]


def test_the_client_certificate_names_the_caller_through_envoy(
    start_server: Callable[..., ServerThread],
    gateway: Callable[..., Envoy],
    pki: Path,
) -> None:
    server = tls_server(start_server, pki)
    proxy = gateway(server.target)
    with through(proxy, pki, "app") as app:
        app.upsert(CORPUS)
        assert app.search("lava", k=1)[0].document_id == "volcano"
    with through(proxy, pki, "dash") as dash:
        assert dash.search("lava", k=1)[0].document_id == "volcano"
        with pytest.raises(RpcError) as info:
            dash.upsert(CORPUS[:1])
        assert info.value.code == "PERMISSION_DENIED"
    assert last_denial(server)["principal"] == DASH
    with through(proxy, pki, "nobody") as nobody, pytest.raises(RpcError) as info:
        nobody.search("lava")
    assert info.value.code == "PERMISSION_DENIED"
    assert last_denial(server)["principal"] == NOBODY
    # The operator's certificate makes it an operator through the gateway, so
    # the refusals below are about identities, not about the route.
    with grpc.secure_channel(f"localhost:{proxy.port}", credentials(pki, "ops")) as channel:
        assert snapshot(channel) == "OK"
    with grpc.secure_channel(f"localhost:{proxy.port}", credentials(pki, "app")) as channel:
        assert snapshot(channel) == "PERMISSION_DENIED"
    assert last_denial(server)["principal"] == APP


def test_a_forwarded_identity_from_a_peer_not_trusted_is_ignored(
    start_server: Callable[..., ServerThread], pki: Path
) -> None:
    server = tls_server(start_server, pki)
    # Straight to rag-grpc from 127.0.0.1 (only 127.0.0.2 is the gateway),
    # over mutual TLS with a good certificate, claiming to be the operator.
    direct = f"127.0.0.1:{server.port}"
    with grpc.secure_channel(direct, credentials(pki, "app")) as channel:
        assert snapshot(channel, FORGED_XFCC) == "PERMISSION_DENIED"
    event = last_denial(server)
    assert event["principal"] == APP
    # Without a client certificate there is no connection at all.
    anonymous = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(direct, anonymous) as channel:
        assert snapshot(channel, FORGED_XFCC) == "UNAVAILABLE"


def test_a_forged_header_or_subject_through_envoy_injects_no_identity(
    start_server: Callable[..., ServerThread],
    gateway: Callable[..., Envoy],
    pki: Path,
) -> None:
    server = tls_server(start_server, pki)
    proxy = gateway(server.target)
    # A client's own x-forwarded-client-cert is dropped by Envoy (SANITIZE_SET).
    with grpc.secure_channel(f"localhost:{proxy.port}", credentials(pki, "app")) as channel:
        assert snapshot(channel, FORGED_XFCC) == "PERMISSION_DENIED"
    assert last_denial(server)["principal"] == APP
    # A subject full of quotes and separators stays one quoted Subject value
    # in Envoy's header: no URI comes out of it.
    with grpc.secure_channel(f"localhost:{proxy.port}", credentials(pki, "forged")) as channel:
        code = snapshot(channel, FORGED_XFCC)
    assert code == "PERMISSION_DENIED"
    assert last_denial(server)["principal"] == FORGED_CN
    assert all(event["principal"] != OPS for event in audited(server))


def test_a_client_on_a_trusted_address_cannot_pose_as_the_gateway(
    start_server: Callable[..., ServerThread], pki: Path
) -> None:
    # A deployment that trusts the whole loopback (or a shared subnet): the
    # header still counts only from the hop whose certificate is the gateway's.
    server = tls_server(start_server, pki, trusted_proxies=["127.0.0.0/8"])
    with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials(pki, "app")) as channel:
        assert snapshot(channel, FORGED_XFCC) == "PERMISSION_DENIED"
    assert all(event["principal"] != OPS for event in audited(server))


def test_jwts_are_checked_at_the_gateway_and_name_the_caller_upstream(
    start_server: Callable[..., ServerThread],
    gateway: Callable[..., Envoy],
    pki: Path,
    jwks: Path,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    server = tls_server(
        start_server, pki, jwt_jwks_file=jwks, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )
    proxy = gateway(
        server.target,
        *("--jwt-jwks", str(jwks), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE),
        "--optional-client-certificates",
    )
    direct = RagClient(server.target, ca=pki / "ca.pem", cert=pki / "app.pem", key=pki / "app.key")
    with direct:
        direct.upsert(CORPUS)

    def caller(bearer: str | None) -> RagClient:
        # No client certificate: the token is the only credential.
        return RagClient(f"localhost:{proxy.port}", timeout=10, ca=pki / "ca.pem", token=bearer)

    with caller(token(signing_key)) as valid:
        assert valid.search("lava", k=1)[0].document_id == "volcano"
        with pytest.raises(RpcError) as info:
            valid.upsert(CORPUS[:1])
        assert info.value.code == "PERMISSION_DENIED"
    # rag-grpc verified the forwarded token and knows the caller by its subject.
    assert last_denial(server)["principal"] == "ci-bot"
    allowed = proxy.stat("http.rag_gateway.jwt_authn.allowed")
    assert allowed == 2
    # Envoy answers 401 (UNAUTHENTICATED), except 403 (PERMISSION_DENIED) for
    # a good token meant for another audience.
    refused = {
        "expired": (token(signing_key, exp=int(time.time()) - 120), "UNAUTHENTICATED"),
        "other issuer": (token(signing_key, iss="https://other.example.org"), "UNAUTHENTICATED"),
        "another key": (token(ec.generate_private_key(ec.SECP256R1())), "UNAUTHENTICATED"),
        "none": (None, "UNAUTHENTICATED"),
        "other audience": (token(signing_key, aud="someone-else"), "PERMISSION_DENIED"),
    }
    before = len(audited(server))
    for reason, (bad, code) in refused.items():
        with caller(bad) as client, pytest.raises(RpcError) as info:
            client.search("lava")
        assert info.value.code == code, reason
    # Refused at Envoy: rag-grpc never saw these calls.
    assert proxy.stat("http.rag_gateway.jwt_authn.denied") == len(refused)
    assert proxy.stat("http.rag_gateway.jwt_authn.allowed") == allowed
    assert len(audited(server)) == before
