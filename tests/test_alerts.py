"""Alerts and recording rules as code (deploy/prometheus/): the committed rule
files are what the generator writes, promtool accepts them and its unit tests
pass, every alert carries what an operator needs (summary, description,
severity, a runbook section that exists), the metrics they watch move on a
real server, and a real Prometheus scraping a real rag-grpc fires the Search
availability burn-rate alert when Search fails.

One file: all of it is the one rule set the generator writes, from the files
to promtool's unit tests of it to the alert firing; its longest part is the
table of those unit tests (`unit_tests`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rag_grpc import errors
from rag_grpc.client import RagClient, RpcError
from tests.conftest import CORPUS, ServerThread, free_port, wait_for
from tests.ingest.nats_setup import Nats, nats_server, on_nats
from tests.prometheus_server import PrometheusServer, prometheus_binary, start_prometheus

__all__ = ["nats_server", "start_prometheus"]  # fixtures, used by name

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
OPERATIONS_MD = ROOT / "docs" / "operations.md"
SEARCH = "/rag.v1.RetrievalService/Search"
SEARCH_FAST_BURN = "RagSearchAvailabilityBurnRateFast"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate", PROMETHEUS_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generator()


def promtool() -> str:
    """promtool from Debian's prometheus package (installed as root when missing)."""
    path = shutil.which("promtool")
    if path is None:
        prometheus_binary()  # installs the package, or fails saying what to install
        path = shutil.which("promtool")
    if path is None:
        pytest.fail("the prometheus package installed no `promtool`")
    return path


def rule_groups(time_scale: float = 1) -> list[dict[str, Any]]:
    """The generator's rule groups (what it renders into rules/*.yml)."""
    config = json.loads(generate.CONFIG.read_text())
    scale = generate.Scale(time_scale)
    return [*generate.slo_groups(config, scale), generate.operations_group(config, scale)]


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


# -- the rule files -----------------------------------------------------------


def test_committed_rule_files_are_a_fresh_generation() -> None:
    fresh = generate.generate()
    committed = {p.name: p.read_text() for p in (PROMETHEUS_DIR / "rules").glob("*.yml")}
    assert committed == fresh, "run: python deploy/prometheus/generate.py"


@pytest.mark.slow
def test_promtool_accepts_the_rules_at_every_time_scale(tmp_path: Path) -> None:
    files = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
    for name, text in generate.generate(time_scale=60).items():
        (tmp_path / name).write_text(text)
        files.append(tmp_path / name)
    done = subprocess.run(
        [promtool(), "check", "rules", *map(str, files)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_time_scale_divides_ranges_and_for() -> None:
    scaled = {r.get("alert"): r for g in rule_groups(60) for r in g["rules"] if "alert" in r}
    fast = scaled[SEARCH_FAST_BURN]
    assert fast["for"] == "2s"
    records = {
        r["record"]: r["expr"]
        for g in rule_groups(60)
        for r in g["rules"]
        if r.get("labels", {}).get("slo") == "search-availability" and "record" in r
    }
    assert "[5s]" in records["rag:slo_errors:ratio_rate5m"]
    assert "[1m]" in records["rag:slo_errors:ratio_rate1h"]
    assert "[72m]" in records["rag:slo_errors:ratio_rate3d"]
    assert generate.duration(0.4) == "400ms"


def test_every_alert_has_severity_summary_description_and_an_existing_runbook() -> None:
    headings = {
        generate.anchor(line.lstrip("#"))
        for line in OPERATIONS_MD.read_text().splitlines()
        if line.startswith("#")
    }
    found = alerts()
    assert len(found) >= 30
    names = [a["alert"] for a in found]
    assert len(set(names)) == len(names)
    assert SEARCH_FAST_BURN in names
    for alert in found:
        assert alert["labels"]["severity"] in {"page", "ticket"}, alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        page, _, section = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", alert["alert"]
        assert section in headings, f"{alert['alert']}: no section #{section} in {page}"
    # The burn-rate windows and factors of the SRE workbook.
    fast = next(a for a in found if a["alert"] == SEARCH_FAST_BURN)
    assert "ratio_rate1h" in fast["expr"] and "ratio_rate5m" in fast["expr"]
    assert "(14.4 * 0.001)" in fast["expr"] and fast["labels"]["severity"] == "page"


def test_the_runbook_keeps_a_place_for_the_disaster_recovery_drill() -> None:
    assert "## Disaster-recovery drill" in OPERATIONS_MD.read_text().splitlines()


# -- promtool unit tests --------------------------------------------------------

TARGET = {"job": "rag-grpc", "instance": "a"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    matchers = ",".join(f'{k}="{v}"' for k, v in {**TARGET, **labels}.items())
    return {"series": f"{name}{{{matchers}}}", "values": values}


def alert_case(
    at: str, name: str, *expected: dict[str, str], severity: str = "ticket"
) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": {**labels, "severity": severity}} for labels in expected],
    }


def slo_calls(bad: str, good: str, **labels: str) -> list[dict[str, str]]:
    return [
        series("rag_rpc_calls_total", bad, method=SEARCH, code="UNAVAILABLE", **labels),
        series("rag_rpc_calls_total", good, method=SEARCH, code="OK", **labels),
        # Client errors spend no budget.
        series("rag_rpc_calls_total", "0+500x200", method=SEARCH, code="NOT_FOUND", **labels),
    ]


def unit_tests() -> list[dict[str, Any]]:
    """promtool test cases: every burn rate of an SLO, a latency SLO, and
    each operational alert, firing and (where a near miss is likely) not."""
    search = {"slo": "search-availability"}
    half = "0+60x200"  # half of the calls fail
    return [
        {
            "interval": "1m",
            "input_series": slo_calls(half, half),
            "alert_rule_test": [
                alert_case("10m", SEARCH_FAST_BURN, search, severity="page"),
                alert_case("10m", "RagSearchAvailabilityBurnRateMedium"),
                alert_case("2h", "RagSearchAvailabilityBurnRateMedium", search, severity="page"),
                alert_case("2h", "RagSearchAvailabilityBurnRateSlow", search),
                alert_case("2h", "RagAskAvailabilityBurnRateFast"),
            ],
        },
        {
            # 0.1 % failing: within a 99.9 % objective's budget, nothing fires.
            "interval": "1m",
            "input_series": slo_calls("0+1x200", "0+999x200"),
            "alert_rule_test": [
                alert_case("2h", SEARCH_FAST_BURN),
                alert_case("2h", "RagSearchAvailabilityBurnRateMedium"),
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series(
                    "rag_rpc_duration_milliseconds_bucket",
                    "0+50x100",
                    method=SEARCH,
                    code="OK",
                    le="250.0",
                ),
                series(
                    "rag_rpc_duration_milliseconds_count", "0+100x100", method=SEARCH, code="OK"
                ),
                series("rag_ask_first_token_milliseconds_bucket", "0+99x100", le="2500.0"),
                series("rag_ask_first_token_milliseconds_count", "0+100x100"),
            ],
            "alert_rule_test": [
                alert_case(
                    "10m",
                    "RagSearchLatencyBurnRateFast",
                    {"slo": "search-latency"},
                    severity="page",
                ),
                # 1 % slow against a 95 % objective: within budget.
                alert_case("10m", "RagAskFirstTokenLatencyBurnRateFast"),
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series("up", "0x20"),
                series("process_start_time_seconds", "100 100 200 300 400 400 400"),
                series("rag_tls_certificate_expiry_timestamp_seconds", "864000x10"),
                series("rag_ingestion_pending_jobs", "7x60"),
                series(
                    "rag_log_messages_total",
                    "0+1x30",
                    level="ERROR",
                    logger="rag_grpc.ingest.jobs",
                ),
                series("rag_write_log_errors_total", "0+1x30"),
                series("rag_write_log_lag", "500x20"),
                series("rag_write_log_stalled", "1x5"),
                series("rag_generation_circuit_open", "1x10"),
                series("rag_embed_queue_texts", "7168x30"),
                series("rag_embed_queue_limit_texts", "8192x30"),
                series("rag_index_memory_bytes", "900x30"),
                series("rag_index_memory_limit_bytes", "1000x30"),
                series("rag_tenant_budget_reached", "1x10", tenant="acme"),
            ],
            "alert_rule_test": [
                alert_case("10m", "RagTargetDown", TARGET, severity="page"),
                alert_case("6m", "RagServerCrashLooping", TARGET, severity="page"),
                alert_case("0m", "RagCertificateExpiresSoon", TARGET),
                alert_case("0m", "RagCertificateExpiryImminent"),
                alert_case("60m", "RagIngestionBacklogGrowing", TARGET),
                alert_case("20m", "RagIngestionBatchesFailing", TARGET),
                alert_case("20m", "RagWriteLogApplyErrors", TARGET),
                alert_case("15m", "RagReplicaLagging", TARGET),
                alert_case("3m", "RagReplicaStalled", TARGET, severity="page"),
                alert_case("10m", "RagGenerationCircuitOpen", TARGET),
                alert_case("15m", "RagEmbeddingQueueSaturated", TARGET),
                alert_case("20m", "RagIndexMemoryNearLimit", TARGET),
                alert_case("8m", "RagTenantOverBudget", {"tenant": "acme"}),
            ],
        },
        {
            # A day of steady traffic, then the last two hours change: the
            # answer cache stops hitting, a tenant's tokens and the log's
            # warnings jump.
            "interval": "1m",
            "input_series": [
                series("rag_answer_cache_total", "0+48x1440 69120+6x180", outcome="hit"),
                series("rag_answer_cache_total", "0+12x1620", outcome="miss"),
                series(
                    "rag_tenant_usage",
                    "0+100x1440 144000+1000x180",
                    tenant="acme",
                    kind="prompt_tokens",
                ),
                series(
                    "rag_log_messages_total",
                    " ".join(str(v) for v in log_baseline(1440)) + " _x0",
                    level="WARNING",
                    logger="rag_grpc.index.writes",
                ),
            ],
            "alert_rule_test": [
                alert_case("26h", "RagAnswerCacheHitRatioCollapsed", {}),
                alert_case(
                    "26h",
                    "RagTenantSpendRateAnomaly",
                    {"tenant": "acme", "kind": "prompt_tokens"},
                ),
                alert_case("23h", "RagTenantSpendRateAnomaly"),
                alert_case("23h", "RagLogAnomaly"),
                alert_case(
                    "26h",
                    "RagLogAnomaly",
                    {"job": "rag-grpc", "level": "WARNING", "logger": "rag_grpc.index.writes"},
                ),
            ],
        },
    ]


def log_baseline(minutes: int) -> list[int]:
    """A counter of warnings: 2 to 4 a minute for a day (varying, so its
    deviation is not zero), then 120 a minute for the last two hours."""
    values, total = [], 0
    for minute in range(minutes + 180):
        total += 120 if minute >= minutes else 2 + minute % 3
        values.append(total)
    return values


@pytest.mark.slow
def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    # Annotations are left out here (their text is checked above and by
    # `promtool check rules`); expressions, `for:` and labels are as committed.
    groups = [
        {
            "name": group["name"],
            "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in group["rules"]],
        }
        for group in rule_groups()
    ]
    (tmp_path / "rules.yml").write_text(json.dumps({"groups": groups}, indent=1))
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": unit_tests()}
    (tmp_path / "tests.yml").write_text(json.dumps(tests, indent=1))
    done = subprocess.run(
        [promtool(), "test", "rules", "tests.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {case["alertname"] for t in unit_tests() for case in t["alert_rule_test"]}
    assert tested >= {a["alert"] for a in alerts()} - {
        # Same expressions as the Search ones, other methods and objectives.
        f"{slo}BurnRate{speed}"
        for slo in ("RagAskAvailability", "RagUpsertAvailability", "RagSearchLatency")
        for speed in ("Medium", "Slow")
    } - {
        "RagAskAvailabilityBurnRateFast",
        "RagUpsertAvailabilityBurnRateFast",
        "RagAskFirstTokenLatencyBurnRateMedium",
        "RagAskFirstTokenLatencyBurnRateSlow",
    }


# -- the metrics the alerts watch ----------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def metric(text: str, pattern: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_operations_metrics_move(start_server: Callable[..., ServerThread], tmp_path: Path) -> None:
    from tests.envoy_server import CERTS_SH

    subprocess.run([str(CERTS_SH), str(tmp_path / "certs")], check=True, capture_output=True)
    certs = tmp_path / "certs"
    server = start_server(
        telemetry={"prometheus_port": 0},
        server={"tls_cert": certs / "rag-grpc.pem", "tls_key": certs / "rag-grpc.key"},
        limits={"max_index_bytes": 64 * 2**20},
        generation={
            "generator": "triton",
            "triton": {"url": f"127.0.0.1:{free_port()}", "breaker_failures": 1},
        },
    )
    core = server.server
    port = core.telemetry.prometheus_port  # type: ignore[union-attr]
    before = scrape(port)
    assert re.search(r"(?m)^rag_generation_circuit_open\{.*\} 0\.0$", before)
    assert metric(before, r"^rag_embed_queue_limit_texts") == 8192
    assert metric(before, r"^rag_index_memory_limit_bytes") == 64 * 2**20
    expiry = metric(before, r"^rag_tls_certificate_expiry_timestamp_seconds")
    assert time.time() + 29 * 86400 < expiry < time.time() + 31 * 86400  # certs.sh: 30 days
    # Writes grow the index; a warning is counted by level and logger; the
    # circuit opens after a failure; an Ask records its first token.
    assert core.retriever is not None and core.triton is not None
    core.retriever.upsert("", CORPUS)
    logging.getLogger("rag_grpc.test_alerts").warning("a warning for the counter")
    core.triton.breaker.failure()
    after = scrape(port)
    assert metric(after, r"^rag_index_memory_bytes") > metric(before, r"^rag_index_memory_bytes")
    warnings = r'^rag_log_messages_total\{(?=.*level="WARNING")(?=.*logger="rag_grpc.test_alerts")'
    assert metric(after, warnings) == metric(before, warnings) + 1
    assert metric(after, r"^rag_generation_circuit_open") == 1


def test_ask_records_its_first_token(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(telemetry={"prometheus_port": 0})
    port = server.server.telemetry.prometheus_port  # type: ignore[union-attr]
    count = r"^rag_ask_first_token_milliseconds_count"
    with RagClient(server.target, timeout=60) as client:
        client.upsert(CORPUS)
        before = metric(scrape(port), count)
        list(client.ask("What is a volcano?"))
    assert metric(scrape(port), count) == before + 1


@pytest.mark.slow
def test_write_log_lag_counts_entries_published_but_not_applied(
    start_server: Callable[..., ServerThread], nats_server: Nats
) -> None:
    server = start_server(telemetry={"prometheus_port": 0}, **on_nats(nats_server.url))
    port = server.server.telemetry.prometheus_port  # type: ignore[union-attr]
    nats = server.server.nats
    assert nats is not None
    wait_for(nats.connected.is_set)
    with RagClient(server.target, timeout=60) as client:
        client.upsert(CORPUS[:1])
        assert metric(scrape(port), r"^rag_write_log_lag") == 0
        assert re.search(r"(?m)^rag_write_log_stalled\{.*\} 0\.0$", scrape(port))
        # The applier is held inside the next entry: published, not applied.
        release = threading.Event()
        apply = nats.follower.apply_entry

        def held(data: bytes, seq: int) -> Any:
            release.wait(30)
            return apply(data, seq)

        nats.follower.apply_entry = held  # type: ignore[method-assign]
        writer = threading.Thread(target=client.upsert, args=(CORPUS[1:2],))
        writer.start()
        try:
            wait_for(lambda: metric(scrape(port), r"^rag_write_log_lag") == 1, timeout=30)
        finally:
            release.set()
            writer.join(60)
        wait_for(lambda: metric(scrape(port), r"^rag_write_log_lag") == 0, timeout=30)


# -- end to end: a real Prometheus, a real server, injected failures ----------------


@pytest.mark.slow
def test_search_failures_fire_the_fast_burn_alert_in_a_real_prometheus(
    start_server: Callable[..., ServerThread],
    start_prometheus: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    # At time scale 60 the 1 h and 5 m windows are 60 s and 5 s, `for: 2m` is 2 s.
    rules = tmp_path / "rules"
    generate.main(["--time-scale", "60", "--out", str(rules)])
    server = start_server(telemetry={"prometheus_port": 0})
    port = server.server.telemetry.prometheus_port  # type: ignore[union-attr]
    prometheus = start_prometheus([f"127.0.0.1:{port}"], sorted(rules.glob("*.yml")))
    prometheus.wait_for_targets_up()

    def fast_burn() -> list[dict[str, Any]]:
        return [a for a in prometheus.alerts() if a["labels"]["alertname"] == SEARCH_FAST_BURN]

    with RagClient(server.target, timeout=30) as client:
        client.upsert(CORPUS)
        # Healthy traffic: the SLI is recorded as 0 and nothing fires.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            client.search("an active volcano", mode="dense")
            time.sleep(0.05)
        ratio = 'rag:slo_errors:ratio_rate5m{slo="search-availability"}'
        prometheus.wait_until(lambda: prometheus.value(ratio) == 0, "a zero error ratio")
        assert fast_burn() == []

        # Searches now fail inside the core with UNAVAILABLE (a server error).
        retriever = server.server.retriever
        assert retriever is not None

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise errors.Unavailable("injected: the index is unavailable")

        retriever.searcher.search_batch = unavailable  # type: ignore[method-assign]
        failures = 0

        def firing() -> bool:
            nonlocal failures
            for _ in range(10):
                try:
                    client.search("an active volcano", mode="dense")
                except RpcError as exc:
                    assert exc.code == "UNAVAILABLE", exc
                    failures += 1
            return any(a["state"] == "firing" for a in fast_burn())

        prometheus.wait_until(firing, f"{SEARCH_FAST_BURN} firing", timeout_s=120)
    alert = fast_burn()[0]
    assert alert["labels"]["severity"] == "page"
    assert alert["annotations"]["runbook_url"].endswith("#ragsearchavailabilityburnrate")
    assert failures > 0
