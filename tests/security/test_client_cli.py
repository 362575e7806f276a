"""The security commands of `rag-grpc` (apikey, audit, the serve flags),
run as the real command.

One file: these are the commands of rag_grpc/cli/security.py and the serve
flags they feed; the TLS tests share one certificate authority made once for
the module (`pki`)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from rag_grpc.cli import _parser, command_settings
from rag_grpc.client import RagClient
from rag_grpc.security.api_keys import api_key_hash
from rag_grpc.security.audit import AuditEvent, AuditLog
from rag_grpc.security.usage import COUNTERS, GAUGES
from tests.cli.command import cli
from tests.conftest import CORPUS, EXPORT_DIR, MODEL_DIR, free_port, tool
from tests.security.certs import issue, make_ca


def created_key(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("# key: ")]
    return line.removeprefix("# key: ")


@pytest.mark.slow
def test_apikey_create_prints_the_key_once_and_an_entry_with_its_hash(tmp_path: Path) -> None:
    made = cli("apikey", "create", "--name", "ci-bot", "--expires", "2030-01-01T00:00:00+01:00")
    assert made.returncode == 0, made.stderr
    key = created_key(made.stdout)
    assert key.startswith("rag_") and len(key) >= 40
    assert made.stdout.count(key) == 1 and key not in made.stderr
    # The whole output is TOML: pasted into a policy, it is one [[api_keys]] entry.
    (entry,) = tomllib.loads(made.stdout)["api_keys"]
    assert entry == {
        "name": "ci-bot",
        "hash": api_key_hash(key),
        "expires": datetime(2029, 12, 31, 23, tzinfo=UTC),
    }
    assert 'identity = "apikey:ci-bot"' in made.stdout
    # Each run is a new key.
    again = cli("apikey", "create", "--name", "ci-bot")
    assert created_key(again.stdout) != key
    assert "expires" not in tomllib.loads(again.stdout)["api_keys"][0]


@pytest.mark.slow
def test_apikey_create_into_a_new_private_file(tmp_path: Path) -> None:
    key_file = tmp_path / "ci.key"
    made = cli("apikey", "create", "--name", "ci", "--key-file", str(key_file))
    assert made.returncode == 0, made.stderr
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in made.stdout and "# key:" not in made.stdout
    assert tomllib.loads(made.stdout)["api_keys"][0]["hash"] == api_key_hash(key)
    # Never over an existing file: it may hold the only copy of another key.
    again = cli("apikey", "create", "--name", "ci", "--key-file", str(key_file))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert key_file.read_text().strip() == key


@pytest.mark.slow
def test_apikey_create_refuses_bad_names_and_times_without_a_zone() -> None:
    bad_name = cli("apikey", "create", "--name", "CI Bot")
    assert bad_name.returncode == 2 and "lowercase" in bad_name.stderr
    assert "rag_" not in bad_name.stdout
    naive = cli("apikey", "create", "--name", "ci", "--expires", "2030-01-01T00:00:00")
    assert naive.returncode == 2 and "has no zone" in naive.stderr
    date_only = cli("apikey", "create", "--name", "ci", "--expires", "2030-01-01")
    assert date_only.returncode == 2 and "2030-01-01T00:00:00Z" in date_only.stderr


def audit_log(path: Path, count: int, start: datetime) -> None:
    times = iter(start + timedelta(minutes=i) for i in range(count))
    log = AuditLog(path, clock=lambda: next(times))
    try:
        for i in range(count):
            log.record(
                AuditEvent(
                    principal="spiffe://example.org/acme/app",
                    tenant="acme",
                    action="/rag.v1.RetrievalService/Delete",
                    outcome="ok",
                    namespace="default",
                    ids=(f"doc-{i}",),
                )
            )
    finally:
        log.close()


@pytest.mark.slow
def test_audit_verify_fails_after_a_row_is_edited(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "audit.sqlite3"
    audit_log(path, 3, datetime(2026, 12, 1, tzinfo=UTC))
    intact = cli("audit", "verify", "--data-dir", str(data_dir))
    assert intact.returncode == 0, intact.stderr
    assert "3 rows verified" in intact.stdout
    head = intact.stdout.split("head ")[1].split()[0]
    with_anchor = cli("audit", "verify", "--file", str(path), "--anchor", head)
    assert with_anchor.returncode == 0, with_anchor.stderr

    # Someone with the file drops the guard and rewrites who did it.
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_events_no_update")
    (row,) = conn.execute("SELECT row FROM audit_events WHERE seq = 2").fetchone()
    forged = row.replace("acme/app", "acme/someone-else")
    conn.execute("UPDATE audit_events SET row = ? WHERE seq = 2", (forged,))
    conn.commit()
    conn.close()
    broken = cli("audit", "verify", "--file", str(path))
    assert broken.returncode == 1
    assert "broken at row 2" in broken.stderr and "row 2 was modified" in broken.stderr

    missing = cli("audit", "verify", "--file", str(tmp_path / "nope.sqlite3"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "nope.sqlite3").exists()
    bad_anchor = cli("audit", "verify", "--file", str(path), "--anchor", "2:xyz")
    assert bad_anchor.returncode == 2 and "SEQ:HASH" in bad_anchor.stderr


@pytest.mark.slow
def test_audit_export_from_the_file_since_a_time(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    audit_log(path, 4, datetime(2026, 12, 1, 10, tzinfo=UTC))
    out = cli("audit", "export", "--file", str(path), "--since", "2026-12-01T10:02:00Z")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["seq"] for e in events] == [3, 4]
    assert events[0]["ids"] == ["doc-2"] and events[0]["principal"].endswith("acme/app")
    assert {"prev_hash", "hash", "at", "outcome"} <= events[0].keys()
    naive = cli("audit", "export", "--file", str(path), "--since", "2026-12-01")
    assert naive.returncode == 2 and "has no zone" in naive.stderr


def test_serve_flags_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "rag.toml"
    config.write_text(
        "[server]\n"
        f'tls_cert = "{tmp_path / "file.pem"}"\n'
        f'tls_key = "{tmp_path / "file.key"}"\n'
        "[auth]\n"
        f'policy_file = "{tmp_path / "file-policy.toml"}"\n'
        'trusted_proxies = ["10.0.0.0/8"]\n'
    )
    args = _parser().parse_args(
        [
            "serve",
            "--config",
            str(config),
            "--tls-cert",
            str(tmp_path / "flag.pem"),
            "--tls-key",
            str(tmp_path / "flag.key"),
            "--tls-client-ca",
            str(tmp_path / "ca.pem"),
            "--policy",
            str(tmp_path / "flag-policy.toml"),
            "--insecure-no-auth",
        ]
    )
    settings = command_settings(args)
    assert settings.server.tls_cert == tmp_path / "flag.pem"
    assert settings.server.tls_key == tmp_path / "flag.key"
    assert settings.server.tls_client_ca == tmp_path / "ca.pem"
    assert settings.auth.policy_file == tmp_path / "flag-policy.toml"
    assert settings.auth.insecure_no_auth is True
    # What no flag names keeps the file's value.
    assert settings.auth.trusted_proxies == ("10.0.0.0/8",)
    plain = command_settings(_parser().parse_args(["serve", "--config", str(config)]))
    assert plain.server.tls_cert == tmp_path / "file.pem"
    assert plain.auth.policy_file == tmp_path / "file-policy.toml"
    assert plain.auth.insecure_no_auth is False


# -- against a real `rag-grpc serve` with TLS and a policy --------------------

APP = "spiffe://example.org/acme/app"
ADMIN = "spiffe://example.org/acme/admin"
OPS = "spiffe://example.org/ops"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    ca.write(out, "ca")
    issue(ca, "rag-grpc", dns=["localhost"], ips=["127.0.0.1"], usage="server").write(out, "server")
    for stem, uri in (("app", APP), ("admin", ADMIN), ("ops", OPS)):
        issue(ca, stem, uris=[uri], usage="client").write(out, stem)
    make_ca("another CA").write(out, "other-ca")
    return out


def policy(path: Path, *api_key_entries: str) -> Path:
    path.write_text(
        "[[tenants]]\n"
        'name = "acme"\n'
        "members = [\n"
        f'  {{ identity = "{APP}", role = "writer" }},\n'
        f'  {{ identity = "{ADMIN}", role = "admin" }},\n'
        '  { identity = "apikey:ci", role = "reader" },\n'
        "]\n\n"
        "[[operators]]\n"
        f'identity = "{OPS}"\n\n' + "\n".join(api_key_entries)
    )
    return path


class TlsServe:
    """`rag-grpc serve` with the TLS and policy flags, as a child process."""

    def __init__(self, data_dir: Path, pki: Path, *flags: str) -> None:
        self.port = free_port()
        self.pki = pki
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = data_dir.parent / f"serve-{self.port}.log"
        env = {
            **os.environ,
            "RAG_GRPC_EMBEDDING__MODEL_DIR": str(MODEL_DIR),
            "RAG_GRPC_EMBEDDING__EXPORT_DIR": str(EXPORT_DIR),
        }
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    *(tool("rag-grpc"), "serve", "--port", str(self.port)),
                    *("--data-dir", str(data_dir)),
                    *("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")),
                    *flags,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.wait_ready()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        credentials = grpc.ssl_channel_credentials(
            (self.pki / "ca.pem").read_bytes(),
            (self.pki / "ops.key").read_bytes(),
            (self.pki / "ops.pem").read_bytes(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            with grpc.secure_channel(self.target, credentials) as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    pass
        raise AssertionError(self.log.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def serve(tmp_path: Path, pki: Path) -> Iterator[Callable[..., TlsServe]]:
    started: list[TlsServe] = []

    def start(*flags: str) -> TlsServe:
        server = TlsServe(tmp_path / f"data{len(started)}", pki, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def as_client(server: TlsServe, who: str | None) -> tuple[str, ...]:
    """The CLI flags that reach server over TLS, as `who` (a certificate)."""
    flags: tuple[str, ...] = ("--target", server.target, "--ca", str(server.pki / "ca.pem"))
    if who is not None:
        flags += ("--cert", str(server.pki / f"{who}.pem"), "--key", str(server.pki / f"{who}.key"))
    return flags


@pytest.mark.slow
def test_client_certificates_usage_and_audit_over_mutual_tls(
    serve: Callable[..., TlsServe], pki: Path, tmp_path: Path
) -> None:
    server = serve(
        "--tls-client-ca", str(pki / "ca.pem"), "--policy", str(policy(tmp_path / "p.toml"))
    )
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d.id, "text": d.text}) for d in CORPUS) + "\n")
    ingested = cli("ingest", str(corpus), *as_client(server, "app"))
    assert ingested.returncode == 0, ingested.stderr
    found = cli("search", "lava", "--json", "-k", "1", *as_client(server, "app"))
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)[0]["document_id"] == "volcano"

    # No client certificate: no connection. A CA that did not sign the server's
    # certificate: no connection either. A CA file that is missing: named.
    anonymous = cli("stats", *as_client(server, None), "--timeout", "5")
    assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr
    stranger = cli(
        "stats", *as_client(server, "app"), "--ca", str(pki / "other-ca.pem"), "--timeout", "5"
    )
    assert stranger.returncode == 1 and "UNAVAILABLE" in stranger.stderr
    missing = cli("stats", *as_client(server, "app"), "--ca", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "nope.pem does not exist" in missing.stderr
    # A writer may not see usage; the tenant's admin sees its own tenant.
    denied = cli("usage", "--json", *as_client(server, "app"))
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    deadline = time.monotonic() + 10
    while True:
        shown = cli("usage", "--json", *as_client(server, "admin"))
        assert shown.returncode == 0, shown.stderr
        (acme,) = json.loads(shown.stdout)
        if acme["searches"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert acme["tenant"] == "acme" and acme["documents"] == len(CORPUS)
    assert acme["searches"] >= 1 and acme["embedding_tokens"] > 0
    assert set(COUNTERS + GAUGES) | {"estimated_cost"} <= acme.keys()
    text = cli("usage", *as_client(server, "admin"))
    assert text.returncode == 0 and text.stdout.startswith("acme: ")
    everyone = cli("usage", "--json", "--tenant", "acme", *as_client(server, "ops"))
    assert [t["tenant"] for t in json.loads(everyone.stdout)] == ["acme"]

    # The denial above is in the audit log, which operators export.
    exported = cli("audit", "export", "--since", "2000-01-01T00:00:00Z", *as_client(server, "ops"))
    assert exported.returncode == 0, exported.stderr
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    assert any(e["principal"] == APP and e["outcome"] == "denied" for e in events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    not_ops = cli("audit", "export", "--since", "2000-01-01T00:00:00Z", *as_client(server, "admin"))
    assert not_ops.returncode == 1 and "PERMISSION_DENIED" in not_ops.stderr
    verified = cli("audit", "verify", "--data-dir", str(tmp_path / "data0"))
    assert verified.returncode == 0, verified.stderr


@pytest.mark.slow
def test_an_api_key_from_apikey_create_authenticates(
    serve: Callable[..., TlsServe], pki: Path, tmp_path: Path
) -> None:
    made = cli("apikey", "create", "--name", "ci")
    assert made.returncode == 0, made.stderr
    key = created_key(made.stdout)
    server = serve("--policy", str(policy(tmp_path / "p.toml", made.stdout)))
    target = as_client(server, None)
    by_env = cli("embed", "lava", *target, env={"RAG_GRPC_TOKEN": key})
    assert by_env.returncode == 0, by_env.stderr
    key_file = tmp_path / "ci.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    by_file = cli("embed", "lava", *target, "--token-file", str(key_file))
    assert by_file.returncode == 0, by_file.stderr
    # A reader may not write.
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    write = cli("ingest", str(corpus), *target, env={"RAG_GRPC_TOKEN": key})
    assert write.returncode == 1 and "PERMISSION_DENIED" in write.stderr
    other = cli("apikey", "create", "--name", "ci")
    wrong = cli("embed", "lava", *target, env={"RAG_GRPC_TOKEN": created_key(other.stdout)})
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    nothing = cli("embed", "lava", *target, env={"RAG_GRPC_TOKEN": ""})
    assert nothing.returncode == 1 and "UNAUTHENTICATED" in nothing.stderr
    # Never from argv; a shared file is refused before anything is sent.
    argv = cli("stats", *target, "--token", key)
    assert argv.returncode == 2 and "RAG_GRPC_TOKEN" in argv.stderr and key not in argv.stderr
    key_file.chmod(0o640)
    shared = cli("stats", *target, "--token-file", str(key_file))
    assert shared.returncode == 2 and "chmod 600" in shared.stderr
    key_file.write_text("\n")
    key_file.chmod(0o600)
    empty = cli("stats", *target, "--token-file", str(key_file))
    assert empty.returncode == 2 and "empty" in empty.stderr


@pytest.mark.slow
def test_a_token_never_leaves_this_machine_in_plaintext(tmp_path: Path) -> None:
    key = "rag_" + "k" * 43
    remote = cli("embed", "x", "--target", "192.0.2.1:50051", env={"RAG_GRPC_TOKEN": key})
    assert remote.returncode == 2 and "only over TLS" in remote.stderr and "--ca" in remote.stderr
    assert key not in remote.stderr
    with pytest.raises(ValueError, match="only over TLS"):
        RagClient("rag.example.org:443", token=key)
    with pytest.raises(ValueError, match="printable ASCII"):
        RagClient("127.0.0.1:1", token=key + "\n")
    # Over TLS, or to this machine, it goes.
    RagClient("[::1]:1", token=key).close()
    ca = make_ca()
    ca_pem, _ = ca.write(tmp_path, "ca")
    RagClient("rag.example.org:443", ca=ca_pem, token=key).close()
