"""Feature flags: evaluation by stable hash buckets and lists, validation,
and flags changed mid-traffic on a real server (file rewritten, then the
reload SIGHUP runs), seen in Search, Ask, Stats and the metrics."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rag_grpc.client import RagClient
from rag_grpc.config import ConfigError, FlagConfig, load_settings
from rag_grpc.flags import BUCKETS, KNOWN_FLAGS, FeatureFlags, bucket, is_on
from rag_grpc.generate.base import AskFinished
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from tests.conftest import CORPUS, EXPORT_DIR, MODEL_DIR, ServerProcess, ServerThread

QUESTION = "How is espresso brewed?"


def test_buckets_are_stable_and_split_keys_as_configured() -> None:
    # sha256 of "flag\0key": the same on every replica, restart and version.
    assert bucket("hybrid_search", "docs") == bucket("hybrid_search", "docs")
    assert bucket("hybrid_search", "docs") == 1885
    keys = [f"tenant-{i}" for i in range(4000)]
    for percentage in (0.0, 10.0, 37.5, 100.0):
        config = FlagConfig(percentage=percentage)
        on = {key for key in keys if is_on("answer_cache", config, key)}
        assert on == {k for k in keys if bucket("answer_cache", k) < percentage * BUCKETS / 100}
        assert abs(len(on) / len(keys) - percentage / 100) < 0.03
    # Raising the percentage only adds keys: nobody flips back and forth.
    ten = {k for k in keys if is_on("answer_cache", FlagConfig(percentage=10), k)}
    twenty = {k for k in keys if is_on("answer_cache", FlagConfig(percentage=20), k)}
    assert ten < twenty
    # Each flag splits on its own hash.
    other = {k for k in keys if is_on("hybrid_search", FlagConfig(percentage=10), k)}
    assert other != ten


def test_lists_and_the_kill_switch() -> None:
    config = FlagConfig(percentage=0, allow=("a",), deny=("b",))
    assert is_on("answer_cache", config, "a")
    assert not is_on("answer_cache", config, "c")
    assert not is_on("answer_cache", FlagConfig(percentage=100, deny=("b",)), "b")
    assert not is_on("answer_cache", FlagConfig(enabled=False, allow=("a",)), "a")
    flags = FeatureFlags({"answer_cache": FlagConfig(key="tenant", allow=("acme",), percentage=0)})
    assert flags.enabled("answer_cache", "acme~docs")
    assert not flags.enabled("answer_cache", "other~docs")
    assert flags.enabled("hybrid_search", "anything")  # not configured: on
    mode = flags.default_mode("hybrid")
    assert mode("x") == "hybrid"
    off = FeatureFlags({"hybrid_search": FlagConfig(deny=("default",))})
    assert off.default_mode("hybrid")("") == "dense"  # "" is the default namespace
    assert off.default_mode("lexical")("") == "lexical"  # only hybrid is switched


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"hybird_search": {}}, "unknown flag(s) hybird_search"),
        ({"answer_cache": {"percentage": 101}}, "flags.answer_cache.percentage"),
        ({"answer_cache": {"allow": ["a"], "deny": ["a"]}}, "a both allowed and denied"),
        ({"answer_cache": {"key": "user"}}, "flags.answer_cache.key"),
        ({"answer_cache": {"enabeld": False}}, "enabeld"),
    ],
)
def test_bad_flags_are_refused_at_start(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, flags=flags)
    assert message in str(error.value)


def _write(path: Path, flags: str) -> None:
    path.write_text(
        f'data_dir = "{path.parent / "data"}"\nport = 0\n'
        f'[embedding]\nmodel_dir = "{MODEL_DIR}"\nexport_dir = "{EXPORT_DIR}"\n'
        "[server]\ngrace_period_s = 1.0\n[telemetry]\nprometheus_port = 0\n" + flags
    )


@pytest.fixture
def flagged(tmp_path: Path) -> Iterator[tuple[ServerThread, Path]]:
    config = tmp_path / "rag-grpc.toml"
    _write(config, "")
    server = ServerThread(load_settings(config)).start()
    yield server, config
    server.stop()


def _mode(client: RagClient, namespace: str) -> str:
    """Which mode a Search that leaves it to the server ran: its scores are
    those of the dense or of the hybrid search (fused scores are not cosines)."""
    query = "an active volcano in Sicily"

    def scores(**options: Any) -> list[tuple[str, float]]:
        hits = client.search(query, k=3, namespace=namespace, **options)
        return [(h.chunk_id, round(h.score, 5)) for h in hits]

    default, dense, hybrid = scores(), scores(mode="dense"), scores(mode="hybrid")
    assert dense != hybrid
    return "dense" if default == dense else "hybrid" if default == hybrid else "?"


def _cached(client: RagClient, namespace: str) -> bool:
    """Whether a repeated Ask was answered from the answer cache."""
    for _ in range(2):
        summary = [
            e for e in client.ask(QUESTION, namespace=namespace) if isinstance(e, AskFinished)
        ]
    return summary[0].cached


def _stats_flags(target: str) -> dict[str, admin_pb2.FeatureFlag]:
    with grpc.insecure_channel(target) as channel:
        stats = admin_service_pb2_grpc.AdminServiceStub(channel).Stats(admin_pb2.StatsRequest())
    return {flag.name: flag for flag in stats.flags}


def _gauges(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r'^(rag_feature_flag_\w+)\{.*flag="(\w+)".*\} (\S+)$', line)
        if match:
            found[match.group(1), match.group(2)] = float(match.group(3))
    return found


def test_flags_change_mid_traffic_for_the_affected_namespaces_only(
    flagged: tuple[ServerThread, Path],
) -> None:
    server, config = flagged
    namespaces = [f"ns{i}" for i in range(12)]
    with RagClient(server.target) as client:
        for namespace in namespaces:
            client.upsert(CORPUS, namespace=namespace)
        # No flags configured: everything as before flags existed.
        assert {_mode(client, ns) for ns in namespaces} == {"hybrid"}
        assert _cached(client, "ns0") and _cached(client, "ns1")
        shown = _stats_flags(server.target)
        assert set(shown) == set(KNOWN_FLAGS)
        assert all(f.enabled and f.percentage == 100 and not f.configured for f in shown.values())

        # Mid-traffic: hybrid search rolls out to half the namespaces (by
        # their hash buckets) plus ns0, never ns1; the answer cache goes off for ns1.
        _write(
            config,
            '[flags.hybrid_search]\npercentage = 50\nallow = ["ns0"]\ndeny = ["ns1"]\n'
            '[flags.answer_cache]\ndeny = ["ns1"]\n',
        )
        assert server.server.reload() is None  # what SIGHUP calls
        expected = {
            ns: "hybrid"
            if ns == "ns0" or (ns != "ns1" and bucket("hybrid_search", ns) < BUCKETS // 2)
            else "dense"
            for ns in namespaces
        }
        assert {ns: _mode(client, ns) for ns in namespaces} == expected
        assert 0 < list(expected.values()).count("dense") < len(namespaces)
        assert _cached(client, "ns0") and not _cached(client, "ns1")
        shown = _stats_flags(server.target)
        hybrid = shown["hybrid_search"]
        assert (hybrid.configured, hybrid.enabled, hybrid.percentage, hybrid.key) == (
            True,
            True,
            50.0,
            "namespace",
        )
        assert list(hybrid.allow) == ["ns0"] and list(hybrid.deny) == ["ns1"]
        assert server.server.telemetry is not None
        port = server.server.telemetry.prometheus_port
        gauges = _gauges(port)
        assert gauges["rag_feature_flag_rollout_percent", "hybrid_search"] == 50
        assert gauges["rag_feature_flag_enabled", "answer_cache"] == 1

        # A broken file keeps the flags in force and says why.
        config.write_text(config.read_text() + "[flags.hybrid_search.typo]\n")
        error = server.server.reload()
        assert error is not None and "flags.hybrid_search" in error
        assert {ns: _mode(client, ns) for ns in namespaces} == expected

        # The kill switch: off for everyone, allow list included.
        _write(config, '[flags.hybrid_search]\nenabled = false\nallow = ["ns0"]\n')
        assert server.server.reload() is None
        assert {_mode(client, ns) for ns in namespaces} == {"dense"}
        assert _cached(client, "ns1")  # answer_cache no longer configured: on
        assert _gauges(port)["rag_feature_flag_enabled", "hybrid_search"] == 0


@pytest.mark.slow
def test_sighup_reloads_the_flags_of_a_serving_process(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    base = tmp_path / "rag-grpc.toml"
    base.write_text("[flags.answer_cache]\npercentage = 100\n")
    overlay = tmp_path / "rag-grpc.staging.toml"
    overlay.write_text("[flags.answer_cache]\npercentage = 25\n")
    proc = server_process(None, "--config", str(base), "--env", "staging")
    assert _stats_flags(proc.target)["answer_cache"].percentage == 25  # the overlay won
    overlay.write_text('[flags.answer_cache]\npercentage = 5\ndeny = ["default"]\n')
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _stats_flags(proc.target)["answer_cache"].percentage != 5:
        assert time.monotonic() < deadline, proc.log.read_text()
        time.sleep(0.1)
    assert list(_stats_flags(proc.target)["answer_cache"].deny) == ["default"]
    assert proc.stop() == 0
    assert "flags reloaded: answer_cache" in proc.log.read_text()
