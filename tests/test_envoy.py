"""The Envoy gateway (envoy/render.py, envoy/certs.sh) with the real `envoy`
binary in front of real rag-grpc servers: mTLS, rate limits, canary,
blue-green, admin statistics.

One file: every test is about the one configuration envoy/render.py writes,
and they share the module's certificates (certs.sh, run once) and the `envoy`
fixture that starts it (`Envoy` in tests/envoy_server.py, which
tests/cluster.py builds on)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import ROOT, ServerThread, tool
from tests.envoy_server import CERTS_SH, NO_LIMITS, RENDER, Envoy

# Starts Envoy (and rag-grpc behind it).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("certs")
    for name in ("ours", "other"):
        subprocess.run([str(CERTS_SH), str(base / name)], check=True, capture_output=True)
    return {"ours": base / "ours", "other": base / "other"}


@pytest.fixture
def envoy(tmp_path: Path, certs: dict[str, Path]) -> Iterator[Callable[..., Envoy]]:
    started: list[Envoy] = []

    def start(upstream: str, *extra: str) -> Envoy:
        workdir = tmp_path / f"envoy{len(started)}"
        workdir.mkdir()
        proxy = Envoy(workdir, certs["ours"], upstream, *extra)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def marked(start_server: Callable[..., ServerThread], tmp_path: Path, name: str) -> ServerThread:
    """A rag-grpc server with a namespace named after it, so answers say who served them."""
    server = start_server(tmp_path / name)
    with RagClient(server.target) as client:
        client.upsert([Document(f"{name}-doc", f"served by {name}", {})], namespace=name)
    return server


def served_by(client: RagClient) -> str:
    names = {ns.name for ns in client.stats().namespaces} - {"default"}
    assert len(names) == 1, names
    return names.pop()


def test_rendered_configs_validate_and_bad_arguments_are_refused(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    for extra in (
        [],
        ["--canary", "127.0.0.1:2", "--canary-weight", "25", "--otlp", "127.0.0.1:3"],
    ):
        out = tmp_path / f"e{len(extra)}.yaml"
        subprocess.run(
            [
                sys.executable,
                str(RENDER),
                "--upstream",
                "127.0.0.1:1",
                "--certs",
                str(certs["ours"]),
                "--out",
                str(out),
                *extra,
            ],
            check=True,
            capture_output=True,
        )
        check = subprocess.run(
            [tool("envoy"), "--mode", "validate", "-c", str(out)], capture_output=True, text=True
        )
        assert check.returncode == 0 and "OK" in check.stdout + check.stderr
        assert out.with_name(out.name.split(".")[0] + ".cds.json").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            str(RENDER),
            "--upstream",
            "nope",
            "--certs",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    missing = subprocess.run(
        [
            sys.executable,
            str(RENDER),
            "--upstream",
            "127.0.0.1:1",
            "--certs",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "certs.sh" in missing.stderr


def render(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RENDER), *args], capture_output=True, text=True, cwd=tmp_path
    )


def test_upstream_mutual_tls_and_jwt_options_render_and_validate(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    ours = certs["ours"]
    jwks = tmp_path / "jwks.json"
    key = {"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256"}
    # A real P-256 public key (Envoy refuses a JWKS without one).
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    public = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**public, **key}]}))
    out = tmp_path / "gw.yaml"
    upstream_tls = ["--upstream-ca", str(ours / "ca.pem")]
    upstream_tls += ["--upstream-cert", str(ours / "gateway.pem")]
    upstream_tls += ["--upstream-key", str(ours / "gateway.key")]
    base = ["--upstream", "localhost:50051", "--certs", str(ours), "--out", str(out)]
    made = render(
        tmp_path,
        *base,
        *upstream_tls,
        *("--canary", "127.0.0.1:50052", "--source-address", "127.0.0.2"),
        *("--jwt-jwks", str(jwks), "--jwt-issuer", "https://issuer"),
        *("--jwt-audience", "rag", "--jwt-audience", "rag-admin", "--jwt-allow-missing"),
    )
    assert made.returncode == 0, made.stderr
    check = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(out)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    config = json.loads(out.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm = hcm["typed_config"]
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True, "subject": True}
    (jwt_filter,) = [f for f in hcm["http_filters"] if f["name"].endswith("jwt_authn")]
    provider = jwt_filter["typed_config"]["providers"]["rag"]
    assert provider["audiences"] == ["rag", "rag-admin"] and provider["forward"] is True
    assert provider["local_jwks"] == {"filename": str(jwks.resolve())}
    rules = jwt_filter["typed_config"]["rules"]
    assert [r["match"]["prefix"] for r in rules if "requires" not in r] == [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.",
    ]
    stable, canary = json.loads(cds_of(out).read_text())["resources"]
    for cluster, (san_type, name) in (
        (stable, ("DNS", "localhost")),
        (canary, ("IP_ADDRESS", "127.0.0.1")),
    ):
        context = cluster["transport_socket"]["typed_config"]
        validation = context["common_tls_context"]["validation_context"]
        assert validation["match_typed_subject_alt_names"] == [
            {"san_type": san_type, "matcher": {"exact": name}}
        ]
        assert validation["trusted_ca"]["filename"] == str((ours / "ca.pem").resolve())
        assert cluster["upstream_bind_config"]["source_address"]["address"] == "127.0.0.2"
    assert stable["transport_socket"]["typed_config"]["sni"] == "localhost"
    assert "sni" not in canary["transport_socket"]["typed_config"]

    # A blue-green rewrite must not drop back to plaintext by omission.
    plain = render(tmp_path, *base, "--clusters-only")
    assert plain.returncode == 2 and "--upstream-ca" in plain.stderr
    assert "transport_socket" in json.loads(cds_of(out).read_text())["resources"][0]
    named = render(
        tmp_path,
        *base,
        *upstream_tls,
        "--clusters-only",
        "--upstream-san",
        "URI:spiffe://rag-grpc.test/rag-grpc",
    )
    assert named.returncode == 0, named.stderr
    (cluster,) = json.loads(cds_of(out).read_text())["resources"]
    validation = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert validation["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://rag-grpc.test/rag-grpc"}}
    ]

    for bad, message in (
        (upstream_tls[:2], "go together"),
        (["--upstream-san", "DNS:x"], "--upstream-san needs"),
        (["--jwt-jwks", str(jwks)], "--jwt-issuer"),
        (["--jwt-audience", "rag"], "need --jwt-jwks"),
        (["--source-address", "localhost"], "IP address"),
        (["--optional-client-certificates"], "needs --jwt-jwks"),
        ([*upstream_tls, "--upstream-san", "ftp:x"], "DNS:NAME"),
    ):
        refused = render(tmp_path, *base, *bad)
        assert refused.returncode == 2 and message in refused.stderr, (bad, refused.stderr)


def cds_of(out: Path) -> Path:
    return out.with_name(out.name.split(".")[0] + ".cds.json")


def first_route(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The route Envoy picks for a plain gRPC call to path (first match wins)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for route in hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]:
        match = route["match"]
        if "headers" in match:
            continue
        if match.get("path") == path or path.startswith(match.get("prefix", "\0")):
            return dict(route)
    raise AssertionError(f"no route for {path}")


def test_snapshot_streams_through_the_gateway_without_retries_or_a_cap(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    from rag_grpc.backup import restore

    server = marked(start_server, tmp_path, "blue")
    proxy = envoy(server.target)
    config = json.loads(proxy.config.read_text())
    snapshot = first_route(config, "/rag.v1.AdminService/Snapshot")["route"]
    assert "retry_policy" not in snapshot and snapshot["timeout"] == "0s"
    assert snapshot["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    # Stats, under the same service prefix, keeps its retries.
    assert "retry_policy" in first_route(config, "/rag.v1.AdminService/Stats")["route"]
    with proxy.client(certs["ours"], timeout=60) as client:
        archive = b"".join(c.data for c in client.snapshot(unencrypted=True))
    restore(archive, tmp_path / "restored", None)
    copy = start_server(tmp_path / "restored")
    with RagClient(copy.target) as direct:
        assert served_by(direct) == "blue"
    assert proxy.stat("cluster.stable.grpc.rag.v1.AdminService.Snapshot.success") == 1
    assert proxy.stat("cluster.stable.upstream_rq_retry") == 0


def test_mutual_tls_admits_our_clients_only(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    server = marked(start_server, tmp_path, "blue")
    proxy = envoy(server.target)
    with proxy.client(certs["ours"]) as client:
        assert served_by(client) == "blue"
        hits = client.search("served", namespace="blue")
        assert hits and hits[0].document_id == "blue-doc"
    # No client certificate: the handshake fails.
    anonymous = RagClient(f"localhost:{proxy.port}", timeout=5, ca=certs["ours"] / "ca.pem")
    with anonymous, pytest.raises(RpcError) as info:
        anonymous.stats()
    assert info.value.code == "UNAVAILABLE"
    # A certificate from another CA: refused too.
    stranger = RagClient(
        f"localhost:{proxy.port}",
        timeout=5,
        ca=certs["ours"] / "ca.pem",
        cert=certs["other"] / "client.pem",
        key=certs["other"] / "client.key",
    )
    with stranger, pytest.raises(RpcError) as info:
        stranger.stats()
    assert info.value.code == "UNAVAILABLE"
    assert proxy.stat(f"listener.127.0.0.1_{proxy.port}.ssl.fail_verify_error") >= 1


def test_rate_limits_per_route_and_per_client(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    server = marked(start_server, tmp_path, "blue")
    proxy = envoy(
        server.target,
        *(
            "--rate-limit",
            "1",
            "--burst",
            "1000",
            "--client-rate-limit",
            "1",
            "--client-burst",
            "5",
        ),
    )
    codes: dict[str, list[str]] = {"client": [], "client2": []}
    for who in codes:
        with proxy.client(certs["ours"], who) as client:
            for _ in range(12):
                try:
                    client.stats()
                    codes[who].append("OK")
                except RpcError as exc:
                    codes[who].append(exc.code)
    # Each identity has its own bucket of 5; past it, RESOURCE_EXHAUSTED.
    for who, seen in codes.items():
        assert seen[:5] == ["OK"] * 5, (who, seen)
        assert seen.count("RESOURCE_EXHAUSTED") >= 6, (who, seen)
    # Health checks are exempt.
    with grpc.secure_channel(f"localhost:{proxy.port}", channel_credentials(certs["ours"])) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(20):
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert proxy.stat("route_rate_limit.http_local_rate_limit.rate_limited") >= 12
    # Per-method gRPC statistics, also in Prometheus form.
    assert proxy.stat("cluster.stable.grpc.rag.v1.AdminService.Stats.total") >= 10
    # The same refusals, in Prometheus form, under the route limiter's prefix.
    prometheus = proxy.admin("/stats/prometheus")
    series = (
        "envoy_http_local_rate_limit_rate_limited"
        '{envoy_local_http_ratelimit_prefix="route_rate_limit"} '
    )
    (line,) = [line for line in prometheus.splitlines() if line.startswith(series)]
    assert float(line.split()[-1]) == proxy.stat(
        "route_rate_limit.http_local_rate_limit.rate_limited"
    )


def channel_credentials(certs: Path, who: str = "client") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{who}.key").read_bytes(),
        certificate_chain=(certs / f"{who}.pem").read_bytes(),
    )


def test_canary_takes_its_weight_and_the_header_override(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    stable = marked(start_server, tmp_path, "stable")
    canary = marked(start_server, tmp_path, "canary")
    proxy = envoy(
        stable.target,
        *("--canary", canary.target, "--canary-weight", "10"),
        *NO_LIMITS,
    )
    counts = {"stable": 0, "canary": 0}
    with proxy.client(certs["ours"]) as client:
        for _ in range(2000):
            counts[served_by(client)] += 1
    share = counts["canary"] / 2000
    assert abs(share - 0.10) <= 0.05, counts
    channel = grpc.secure_channel(f"localhost:{proxy.port}", channel_credentials(certs["ours"]))
    with channel:
        from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc

        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        for _ in range(20):
            reply = stub.Stats(
                admin_pb2.StatsRequest(), metadata=(("x-rag-canary", "always"),), timeout=5
            )
            assert "canary" in {ns.name for ns in reply.namespaces}


def test_blue_green_switch_under_load_fails_no_call(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    blue = marked(start_server, tmp_path, "blue")
    green = marked(start_server, tmp_path, "green")
    limits = NO_LIMITS
    proxy = envoy(blue.target, *limits)
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with proxy.client(certs["ours"]) as client:
            while not stop.is_set():
                try:
                    seen.append(served_by(client))
                except RpcError as exc:
                    failures.append(f"{exc.code}: {exc.message}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        proxy.render("--upstream", green.target, "--clusters-only", *limits)
        deadline = time.monotonic() + 20
        while "green" not in seen[-20:]:
            assert time.monotonic() < deadline, "Envoy never switched to green"
            time.sleep(0.1)
        time.sleep(1.0)
        blue.stop()  # the old colour goes away once traffic has moved
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not failures, failures[:5]
    assert seen[0] == "blue" and set(seen[-50:]) == {"green"}
    assert proxy.proc.poll() is None  # the same Envoy throughout


def test_a_node_grpc_js_client_works_through_the_gateway(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    node_dir = ROOT / "tests" / "node"
    npm = tool_or_system("npm")
    if not (node_dir / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=node_dir, check=True)
    server = start_server(tmp_path / "data")
    with RagClient(server.target) as direct:
        direct.upsert(
            [
                Document("chess", "Chess pieces: a king, a queen, rooks, bishops and knights.", {}),
                Document("tea", "Green tea is steeped briefly in water below boiling.", {}),
            ]
        )
    proxy = envoy(server.target)
    run = subprocess.run(
        [
            tool_or_system("node"),
            str(node_dir / "client.js"),
            f"localhost:{proxy.port}",
            str(certs["ours"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    stats, search, missing = (json.loads(line) for line in run.stdout.splitlines())
    assert (
        stats["response"]["version"] and "rag.v1.RetrievalService" in stats["response"]["services"]
    )
    hits = search["response"]["hits"]
    assert hits[0]["document_id"] == "chess" and hits[0]["score"] > hits[-1]["score"]
    assert missing["code"] == "NOT_FOUND" and "no-such-namespace" in missing["message"]


def tool_or_system(name: str) -> str:
    import shutil

    path = shutil.which(name)
    assert path, f"{name} is not installed (Node.js 18+ with npm is needed for this test)"
    return path


def test_json_transcoding_lets_plain_https_clients_search(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    import ssl

    descriptor = tmp_path / "rag.pb"
    subprocess.run([tool("rag-grpc"), "descriptor", "--out", str(descriptor)], check=True)
    server = marked(start_server, tmp_path, "blue")
    proxy = envoy(server.target, "--transcode", str(descriptor))
    context = ssl.create_default_context(cafile=str(certs["ours"] / "ca.pem"))
    context.load_cert_chain(certs["ours"] / "client.pem", certs["ours"] / "client.key")

    def post(method: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(
            f"https://localhost:{proxy.port}/rag.v1.{method}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    status, found = post(
        "RetrievalService/Search", {"namespace": "blue", "text": "who served this", "k": 1}
    )
    assert status == 200, found
    hits = found["hits"]
    assert isinstance(hits, list) and hits[0]["document_id"] == "blue-doc"
    status, error = post("RetrievalService/Search", {"namespace": "nope", "text": "x"})
    assert status == 404 and "nope" in str(error.get("message"))
    # gRPC clients still work on the same listener.
    with proxy.client(certs["ours"]) as client:
        assert served_by(client) == "blue"


def test_grpcurl_lists_and_calls_through_the_gateway(
    start_server: Callable[..., ServerThread],
    envoy: Callable[..., Envoy],
    certs: dict[str, Path],
    tmp_path: Path,
) -> None:
    server = marked(start_server, tmp_path, "blue")
    proxy = envoy(server.target)
    ours = certs["ours"]
    tls = ["-cacert", str(ours / "ca.pem"), "-cert", str(ours / "client.pem")]
    tls += ["-key", str(ours / "client.key"), f"localhost:{proxy.port}"]
    listed = subprocess.run(
        [tool("grpcurl"), *tls, "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert "rag.v1.RetrievalService" in listed.stdout.split()
    search = subprocess.run(
        [
            tool("grpcurl"),
            "-d",
            '{"namespace": "blue", "text": "served", "k": 1}',
            *tls,
            "rag.v1.RetrievalService/Search",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert search.returncode == 0, search.stderr
    hit = json.loads(search.stdout)["hits"][0]
    assert hit.get("documentId", hit.get("document_id")) == "blue-doc"
    # Without a client certificate grpcurl is turned away too.
    refused = subprocess.run(
        [
            tool("grpcurl"),
            "-connect-timeout",
            "3",
            "-cacert",
            str(ours / "ca.pem"),
            f"localhost:{proxy.port}",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0


def test_every_upstream_is_a_replica_and_retries_go_to_another(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    out = tmp_path / "gw.yaml"
    replicas = ["127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063"]
    upstreams = [arg for replica in replicas for arg in ("--upstream", replica)]
    made = render(tmp_path, *upstreams, "--certs", str(certs["ours"]), "--out", str(out))
    assert made.returncode == 0, made.stderr
    check = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(out)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    (stable,) = json.loads(cds_of(out).read_text())["resources"]
    endpoints = stable["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [
        f"{e['endpoint']['address']['socket_address']['address']}:"
        f"{e['endpoint']['address']['socket_address']['port_value']}"
        for e in endpoints
    ] == replicas
    # Health checks run before the cluster sees traffic, so a dead replica
    # leaves the rotation in seconds (tests/test_chaos.py kills one).
    assert stable["health_checks"][0]["no_traffic_interval"] == "2s"
    config = json.loads(out.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    policies = [r["route"]["retry_policy"] for r in routes if "retry_policy" in r.get("route", {})]
    assert policies and all(
        p["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
        for p in policies
    )
