"""A configured bearer token guards every rag.v1 call, and remote calls send it;
tokens come from files or the environment, never the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient, RpcError
from rag_grpc.generate.base import Citations
from tests.cli.command import cli
from tests.conftest import CORPUS, ServerThread, ask_citations


def test_calls_without_the_token_are_refused(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(server={"auth_token": "t0ken-for-the-tests"})
    with RagClient(server.target, token="t0ken-for-the-tests") as client:
        client.upsert(CORPUS)
        assert client.search("lava", k=1)[0].document_id == "volcano"
        assert isinstance(next(iter(client.ask("What is lava?"))), Citations)
    for token in (None, "wrong"):
        with RagClient(server.target, token=token) as client:
            with pytest.raises(RpcError) as info:
                client.search("lava")
            assert info.value.code == "UNAUTHENTICATED"
            assert "authorization: Bearer" in info.value.message
            with pytest.raises(RpcError) as info:
                list(client.ask("What is lava?"))
            assert info.value.code == "UNAUTHENTICATED"
    with grpc.insecure_channel(server.target) as channel:  # probes need no token
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_remote_retrieval_receives_the_token(start_server: Callable[..., ServerThread]) -> None:
    token = {"server": {"auth_token": "shared-secret-of-the-tests"}}
    retrieval = start_server(services="retrieval", **token)
    with RagClient(retrieval.target, token="shared-secret-of-the-tests") as client:
        client.upsert(CORPUS)
    rag = start_server(
        services="rag,generation",
        remote={"retrieval_target": retrieval.target},
        **token,
    )
    with RagClient(rag.target, token="shared-secret-of-the-tests") as client:
        events = list(client.ask("What erupts from a volcano?", k=1))
    assert ask_citations(events)[0].document_id == "volcano"


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_cli_takes_the_token_from_a_file_or_the_environment_never_argv(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    token = "t0ken-from-a-file"
    server_file = _secret_file(tmp_path / "server-token", token + "\n")
    server = start_server(server={"auth_token_file": server_file})
    target = ("stats", "--target", server.target)
    client_file = _secret_file(tmp_path / "client-token", token + "\n")

    by_file = cli(*target, "--token-file", str(client_file))
    assert by_file.returncode == 0, by_file.stderr
    by_env_file = cli(*target, env={"RAG_GRPC_TOKEN_FILE": str(client_file)})
    assert by_env_file.returncode == 0, by_env_file.stderr
    by_env = cli(*target, env={"RAG_GRPC_TOKEN": token})
    assert by_env.returncode == 0, by_env.stderr
    without = cli(*target, env={"RAG_GRPC_TOKEN": ""})
    assert without.returncode == 1 and "UNAUTHENTICATED" in without.stderr

    in_argv = cli(*target, "--token", token)
    assert in_argv.returncode == 2
    assert "--token-file" in in_argv.stderr and "RAG_GRPC_TOKEN" in in_argv.stderr
    assert token not in in_argv.stderr

    client_file.chmod(0o644)
    shared = cli(*target, "--token-file", str(client_file))
    assert shared.returncode == 2 and f"chmod 600 {client_file}" in shared.stderr
    assert token not in shared.stderr


def test_the_server_token_file_must_be_private_and_alone(tmp_path: Path) -> None:
    token_file = _secret_file(tmp_path / "token", "s3cret-token-of-the-tests\n", mode=0o640)
    env = {"RAG_GRPC_SERVER__AUTH_TOKEN_FILE": str(token_file)}
    shared = cli("config", env=env)
    assert shared.returncode == 2 and f"chmod 600 {token_file}" in shared.stderr
    token_file.chmod(0o600)
    shown = cli("config", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["server"]["auth_token"] == "**********"
    assert "s3cret" not in shown.stdout
    both = cli("config", env={**env, "RAG_GRPC_SERVER__AUTH_TOKEN": "other"})
    assert both.returncode == 2 and "not both" in both.stderr
    empty = _secret_file(tmp_path / "empty", "\n")
    blank = cli("config", env={"RAG_GRPC_SERVER__AUTH_TOKEN_FILE": str(empty)})
    assert blank.returncode == 2 and "is empty" in blank.stderr
