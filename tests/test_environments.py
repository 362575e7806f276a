"""Environments: a base file, the environment's overlay, environment
variables and flags on top, validated at start, shown with each value's origin."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from rag_grpc.config import ConfigError, config_files, deep_merge, load_settings
from tests.conftest import tool

BASE = """
port = 6000
services = ["retrieval", "admin"]
[limits]
max_k = 42
default_k = 5
[generation.triton]
url = "127.0.0.1:8001"
model = "base-model"
[flags.answer_cache]
percentage = 50
allow = ["docs"]
"""

PROD = """
host = "0.0.0.0"
services = ["retrieval"]
[limits]
default_k = 7
[generation.triton]
model = "prod-model"
[server]
auth_token = "prod-s3cret-token-0123456789"
[flags.answer_cache]
percentage = 10
"""


def cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAG_GRPC_")}
    return subprocess.run(
        [tool("rag-grpc"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**clean, **(env or {})},
    )


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    (tmp_path / "rag-grpc.toml").write_text(BASE)
    (tmp_path / "rag-grpc.prod.toml").write_text(PROD)
    return tmp_path


def test_the_overlay_merges_over_the_base_and_the_environment_over_both(configs: Path) -> None:
    shown = cli(configs, "config", "--env", "prod", env={"RAG_GRPC_LIMITS__MAX_K": "9"})
    assert shown.returncode == 0, shown.stderr
    effective = json.loads(shown.stdout)
    assert effective["port"] == 6000  # base only
    assert effective["host"] == "0.0.0.0"  # overlay only
    assert effective["services"] == ["retrieval"]  # arrays are replaced, not joined
    # Tables merge key by key: the base's max_k under the overlay's default_k,
    # then the environment's max_k over both.
    assert effective["limits"]["default_k"] == 7 and effective["limits"]["max_k"] == 9
    assert effective["generation"]["triton"] == {
        **effective["generation"]["triton"],
        "url": "127.0.0.1:8001",
        "model": "prod-model",
    }
    flag = effective["flags"]["answer_cache"]
    assert flag["percentage"] == 10 and flag["allow"] == ["docs"]
    assert effective["server"]["auth_token"] == "**********"
    assert "s3cret" not in shown.stdout
    # Without --env the base alone (when named), as before environments.
    base = json.loads(cli(configs, "config", "--config", "rag-grpc.toml").stdout)
    assert base["limits"]["default_k"] == 5 and base["host"] == "127.0.0.1"
    # RAG_GRPC_ENV chooses the environment too.
    by_variable = json.loads(cli(configs, "config", env={"RAG_GRPC_ENV": "prod"}).stdout)
    assert by_variable["host"] == "0.0.0.0"


def test_show_origin_names_the_source_of_every_value(configs: Path) -> None:
    shown = cli(
        configs,
        "config",
        "--env",
        "prod",
        "--show-origin",
        env={"RAG_GRPC_LIMITS__MAX_K": "9", "RAG_GRPC_INDEX": '{"m": 24}'},
    )
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(" = ", 1) for line in shown.stdout.splitlines())
    assert lines["port"] == "6000  # rag-grpc.toml"
    assert lines["host"] == '"0.0.0.0"  # rag-grpc.prod.toml'
    assert lines["limits.max_k"] == "9  # RAG_GRPC_LIMITS__MAX_K"
    assert lines["limits.default_k"] == "7  # rag-grpc.prod.toml"
    assert lines["index.m"] == "24  # RAG_GRPC_INDEX"
    assert lines["index.ef_search"] == "64  # default"
    assert lines["generation.triton.url"] == '"127.0.0.1:8001"  # rag-grpc.toml'
    assert lines["flags.answer_cache.allow"] == '["docs"]  # rag-grpc.toml'
    assert lines["flags.answer_cache.percentage"] == "10.0  # rag-grpc.prod.toml"
    assert lines["server.auth_token"] == '"**********"  # rag-grpc.prod.toml'
    assert lines["data_dir"] == '"data"  # default'
    assert "s3cret" not in shown.stdout
    explicit = cli(configs, "config", "--config", "rag-grpc.toml", "--show-origin")
    assert "port = 6000  # rag-grpc.toml" in explicit.stdout.splitlines()


def test_an_explicit_base_takes_its_overlay_from_beside_it(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "rag.toml").write_text("port = 6001\n")
    (etc / "rag.prod.toml").write_text("[limits]\nmax_k = 11\n")
    settings = load_settings(etc / "rag.toml", env="prod")
    assert (settings.port, settings.limits.max_k) == (6001, 11)
    assert config_files(etc / "rag.toml", "prod") == (etc / "rag.toml", etc / "rag.prod.toml")
    assert settings.origin(("limits", "max_k")) == str(etc / "rag.prod.toml")
    assert load_settings(etc / "rag.toml", env="prod", port=7).origin(("port",)) == "command line"


def test_environments_are_validated_at_start(configs: Path) -> None:
    missing = cli(configs, "config", "--env", "staging")
    assert missing.returncode == 2
    assert "environment 'staging' needs its overlay file rag-grpc.staging.toml" in missing.stderr
    odd = cli(configs, "config", "--env", "../prod")
    assert odd.returncode == 2 and "letters, digits" in odd.stderr
    (configs / "rag-grpc.bad.toml").write_text("[limits]\nmax_k = 0\n[flags.hybird]\n")
    bad = cli(configs, "config", "--env", "bad")
    assert bad.returncode == 2
    assert "limits.max_k" in bad.stderr and "unknown flag(s) hybird" in bad.stderr
    (configs / "rag-grpc.broken.toml").write_text("[limits\n")
    broken = cli(configs, "config", "--env", "broken")
    assert broken.returncode == 2 and "rag-grpc.broken.toml is not valid TOML" in broken.stderr
    # serve refuses the same configuration before binding anything.
    refused = cli(configs, "serve", "--env", "bad", "--port", "0")
    assert refused.returncode == 2 and "limits.max_k" in refused.stderr


def test_an_environment_needs_no_base_file(tmp_path: Path) -> None:
    (tmp_path / "rag-grpc.dev.toml").write_text("port = 6100\n")
    shown = cli(tmp_path, "config", "--env", "dev", "--show-origin")
    assert shown.returncode == 0, shown.stderr
    assert "port = 6100  # rag-grpc.dev.toml" in shown.stdout.splitlines()
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", env="dev")


def test_deep_merge_replaces_everything_but_tables() -> None:
    merged = deep_merge(
        {"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3], "e": {"f": 1}}, "d": {"g": 2}}
    )
    assert merged == {"a": {"b": 1, "c": [3], "e": {"f": 1}}, "d": {"g": 2}}
