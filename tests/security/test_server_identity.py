"""Who the real server believes a caller is: a client certificate over mutual
TLS, a JWT signed by the test, the gateway's header only over an
authenticated hop; the start-up rule for public binds; and a policy
reloaded on SIGHUP without a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from rag_grpc.client import RagClient, RpcError
from rag_grpc.config import ConfigError
from rag_grpc.documents import Document
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from rag_grpc.security.audit import AuditLog
from rag_grpc.server import RagServer
from tests.conftest import CORPUS, ServerProcess, ServerThread, make_settings
from tests.security.certs import issue, make_ca
from tests.security.tenants import member, write_policy

APP = "spiffe://example.org/acme/app"
DASH = "spiffe://example.org/acme/dash"
STRANGER = "spiffe://example.org/nobody"
OPS = "spiffe://example.org/ops"
ISSUER = "https://issuer.example.org"
AUDIENCE = "rag-grpc"

POLICY = f"""
[[tenants]]
name = "acme"
[[tenants.members]]
identity = "{APP}"
role = "writer"
[[tenants.members]]
identity = "{DASH}"
role = "reader"
[[tenants.members]]
identity = "acme-batch"
role = "writer"
[[tenants.members]]
identity = "ci-bot"
role = "writer"

[[tenants]]
name = "globex"
[[tenants.members]]
identity = "reporter"
role = "reader"

[[operators]]
identity = "{OPS}"
"""


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    out.mkdir()
    ca = make_ca()
    ca.write(out, "ca")
    issue(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"], usage="server").write(
        out, "server"
    )
    for stem, uri in (("app", APP), ("dash", DASH), ("stranger", STRANGER), ("ops", OPS)):
        issue(ca, stem, uris=[uri], usage="client").write(out, stem)
    issue(ca, "acme-batch", usage="client").write(out, "batch")  # named by its CN alone
    (out / "policy.toml").write_text(POLICY)
    return out


def mtls_server(start_server: Callable[..., ServerThread], pki: Path, **auth: Any) -> ServerThread:
    return start_server(
        server={
            "tls_cert": pki / "server.pem",
            "tls_key": pki / "server.key",
            "tls_client_ca": pki / "ca.pem",
        },
        auth={"policy_file": pki / "policy.toml", **auth},
    )


def as_certificate(server: ServerThread, pki: Path, stem: str) -> RagClient:
    return RagClient(
        f"localhost:{server.port}",
        timeout=10,
        ca=pki / "ca.pem",
        cert=pki / f"{stem}.pem",
        key=pki / f"{stem}.key",
    )


def code_of(call: Callable[[], object]) -> str:
    try:
        call()
    except RpcError as exc:
        return exc.code
    return "OK"


def test_mutual_tls_names_the_caller_by_its_certificate(
    start_server: Callable[..., ServerThread], pki: Path
) -> None:
    server = mtls_server(start_server, pki)
    with as_certificate(server, pki, "app") as app:
        assert app.upsert(CORPUS).documents == 5
    with as_certificate(server, pki, "dash") as dash:
        assert dash.search("lava", k=1)[0].document_id == "volcano"
        assert code_of(lambda: dash.upsert(CORPUS[:1])) == "PERMISSION_DENIED"
    with as_certificate(server, pki, "batch") as batch:  # subject CN, no SAN
        assert batch.get(["chess"])[0]
    with as_certificate(server, pki, "stranger") as stranger:
        assert code_of(lambda: stranger.search("lava")) == "PERMISSION_DENIED"
    with as_certificate(server, pki, "ops") as ops:
        assert {n.name for n in ops.stats().namespaces} >= {"default"}
        assert code_of(lambda: ops.search("lava")) == "PERMISSION_DENIED"
    # No certificate, or no TLS at all: no connection.
    with RagClient(f"localhost:{server.port}", timeout=5, ca=pki / "ca.pem") as anonymous:
        assert code_of(lambda: anonymous.search("lava")) == "UNAVAILABLE"
    with RagClient(server.target, timeout=5) as plaintext:
        assert code_of(lambda: plaintext.search("lava")) == "UNAVAILABLE"
    # Every refusal of a known caller is on record with its certificate identity.
    assert server.server.audit is not None
    denied = [r for r in server.server.audit.export() if r["outcome"] == "denied"]
    assert [(r["principal"], r["action"]) for r in denied] == [
        (DASH, "Upsert"),
        (STRANGER, "Search"),
        (OPS, "Search"),
    ]


def _token(key: ec.EllipticCurvePrivateKey, **changes: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "ci-bot",
        "iat": now,
        "exp": now + 300,
    }
    claims.update(changes)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})


def test_jwts_signed_by_the_test_name_the_caller(
    start_server: Callable[..., ServerThread], pki: Path
) -> None:
    signing = ec.generate_private_key(ec.SECP256R1())
    public = ECAlgorithm.to_jwk(signing.public_key(), as_dict=True)
    jwks = pki / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    server = start_server(
        auth={
            "policy_file": pki / "policy.toml",
            "jwt_jwks_file": jwks,
            "jwt_issuer": ISSUER,
            "jwt_audience": AUDIENCE,
        }
    )

    def bearer(token: str) -> RagClient:
        return RagClient(server.target, timeout=10, token=token)

    valid = _token(signing)
    with bearer(valid) as client:
        assert client.upsert(CORPUS).documents == 5
    with bearer(_token(signing, sub="reporter", tenant="globex")) as reporter:
        assert code_of(lambda: reporter.search("lava")) == "NOT_FOUND"  # globex has no documents
    refused = {
        "expired": _token(signing, exp=int(time.time()) - 120),
        "audience": _token(signing, aud="someone-else"),
        "issuer": _token(signing, iss="https://elsewhere.example.org"),
        "signature": _token(ec.generate_private_key(ec.SECP256R1())),
    }
    for reason, token in refused.items():
        with bearer(token) as client, pytest.raises(RpcError) as info:
            client.search("lava")
        assert info.value.code == "UNAUTHENTICATED", reason
        assert token not in info.value.message and token.split(".")[2] not in info.value.message
    # A tenant claim cannot move a member into another tenant.
    with bearer(_token(signing, tenant="globex")) as moved:
        assert code_of(lambda: moved.search("lava")) == "PERMISSION_DENIED"
    with bearer("not-a-credential-of-any-kind") as garbage:
        assert code_of(lambda: garbage.search("lava")) == "UNAUTHENTICATED"


def test_the_gateway_header_is_ignored_over_plaintext(
    start_server: Callable[..., ServerThread], pki: Path
) -> None:
    # Trusted address, but no mutual TLS on the hop: anyone there could send it.
    server = start_server(
        auth={"policy_file": pki / "policy.toml", "trusted_proxies": ["127.0.0.0/8"]}
    )
    forged = (("x-forwarded-client-cert", f'By=spiffe://gw;URI={OPS};Subject="CN=ops"'),)
    with grpc.insecure_channel(server.target) as channel:
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Stats(admin_pb2.StatsRequest(), metadata=forged, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_public_bind_needs_an_identity_source_or_an_explicit_opt_out(
    start_server: Callable[..., ServerThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "refused", host="0.0.0.0")
    with pytest.raises(ConfigError) as info:
        asyncio.run(RagServer(settings).start())
    assert "refusing to serve 0.0.0.0 without authentication" in str(info.value)
    assert "insecure_no_auth" in str(info.value)
    with caplog.at_level("WARNING", logger="rag_grpc.server"):
        open_server = start_server(
            tmp_path / "open", host="0.0.0.0", auth={"insecure_no_auth": True}
        )
    assert any("WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)
    with RagClient(open_server.target) as client:
        assert client.stats().version
    token = "a-shared-token-for-the-tests"
    guarded = start_server(tmp_path / "token", host="0.0.0.0", server={"auth_token": token})
    with RagClient(guarded.target) as anonymous:
        assert code_of(anonymous.stats) == "UNAUTHENTICATED"
    with RagClient(guarded.target, token=token) as client:
        assert client.stats().version
    # A short shared secret is refused before anything starts.
    with pytest.raises(ConfigError) as info:
        make_settings(tmp_path / "short", server={"auth_token": "2short"})
    assert "at least 16 characters" in str(info.value) and "2short" not in str(info.value)


@pytest.mark.slow
def test_sighup_reloads_a_role_without_a_restart(tmp_path: Path) -> None:
    viewer = member("acme", "reader", "viewer")
    policy = write_policy(tmp_path / "policy.toml", [viewer])
    config = tmp_path / "rag.toml"
    config.write_text(f'[auth]\npolicy_file = "{policy}"\n')
    proc = ServerProcess(tmp_path / "data", "--config", str(config))
    try:
        with RagClient(proc.target, timeout=30, token=viewer.key) as client:
            write = lambda: client.upsert([Document("note", "tides follow the moon", {})])  # noqa: E731
            assert code_of(write) == "PERMISSION_DENIED"
            write_policy(policy, [dataclasses.replace(viewer, role="writer")])
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while code_of(write) != "OK":
                assert time.monotonic() < deadline, "the new role never took effect"
                time.sleep(0.1)
            # A broken file keeps the policy in force and says why.
            policy.write_text("[[tenants]]\nname = 'acme'\nmembers = 'oops'\n")
            proc.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert code_of(write) == "OK"
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "policy reload failed, the previous policy stays in force" in log
    outcomes = [
        (r["action"], r["outcome"])
        for r in AuditLog(tmp_path / "data" / "audit.sqlite3").export()
        if r["action"] == "policy.reload"
    ]
    assert outcomes == [
        ("policy.reload", "ok"),
        ("policy.reload", "error: kept the previous policy"),
    ]
