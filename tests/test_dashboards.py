"""The Grafana dashboards in deploy/grafana/: the committed JSON is what build.py
writes, and every PromQL expression in them, evaluated by a real Prometheus
scraping a real rag-grpc under a short load, parses and returns data."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rag_grpc.client import RpcError
from tests.conftest import CORPUS, ROOT, ServerThread, ask_summary
from tests.ingest.nats_setup import Nats, on_nats
from tests.prometheus_server import PrometheusServer
from tests.security.tenants import client, member, write_policy

ACME_ADMIN = member("acme", "admin", "acme-admin")
GLOBEX_ADMIN = member("globex", "admin", "globex-admin")

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

# What the test puts for each dashboard variable: Prometheus has no
# $__rate_interval, and "All" is the regex .* as the dashboard's allValue says.
VARIABLES = {
    "$__rate_interval": "1m",
    "$job": "rag-grpc",
    "$instance": ".*",
    "$tenant": ".*",
}

# Series that only exist after an event this test does not cause: each
# expression over them must still parse and run (query status success), but
# may return nothing. The configurations the test can run cheaply, it runs:
# tenancy with a budget (rag_tenant_*), the NATS write log (rag_write_log_lag
# and _stalled), a warning logged (rag_log_messages_total).
ONLY_AFTER = {
    "rag_ingestion_retries_total": "counted only when an ingestion batch is retried after a "
    "busy or full database; forcing SQLITE_BUSY here would mean holding the server's "
    "database locked mid-ingest",
    "rag_write_log_errors_total": "counted only when a replica cannot apply a write log entry "
    "(tests/ingest/test_log_follower.py publishes such entries by hand)",
}


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' nested panels included."""
    found = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def substitute(expr: str) -> str:
    # Longest names first, so $instance is not read as $i followed by "nstance".
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"a variable the test does not know is left in {expr!r}"
    return expr


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, PromQL) for each label_values() variable, as a count by that label."""
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["definition"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
        assert match, f"variable {variable['name']}: {definition!r} is not label_values(...)"
        selector, label = match.groups()
        found.append((variable["name"], f"count by ({label}) ({selector})"))
    return found


def load_build() -> Any:
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_dashboards_are_what_build_py_writes() -> None:
    build = load_build()
    assert DASHBOARDS == [build.OUTPUT], "every dashboard file comes from build.py"
    assert build.OUTPUT.read_text() == build.render(), (
        "deploy/grafana/dashboards/ is stale: run `python deploy/grafana/build.py` and commit"
    )
    dashboard = json.loads(build.OUTPUT.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            # Every query goes to the chosen data source, never a fixed one.
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for path in (GRAFANA / "provisioning").rglob("*.yml"):
        assert "apiVersion: 1" in path.read_text(), path


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    (tmp_path / "nats").mkdir()
    nats = Nats(tmp_path / "nats").start()
    try:
        policy = write_policy(
            tmp_path / "policy.toml",
            [ACME_ADMIN, GLOBEX_ADMIN],
            budgets={"acme": {"usd_per_day": 1.5}},
            prices={"asks": 1.0},
        )
        started = []
        server = start_server(
            auth={"policy_file": policy},
            telemetry={"prometheus_port": 0},
            **on_nats(nats.url),
        )
        started.append(server)  # stopped before NATS, so it does not see NATS go away
        port = server.server.telemetry.prometheus_port  # type: ignore[union-attr]
        with PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"]) as prometheus:
            prometheus.wait_for_targets_up()
            put_load(server)
            check_dashboards(prometheus)
    finally:
        for running in started:
            running.stop()
        nats.stop()


def put_load(server: ServerThread) -> None:
    """Writes, searches in every mode, asks (one answer cache hit), an embed,
    a failed call, from two tenants."""
    with client(server, ACME_ADMIN) as acme, client(server, GLOBEX_ADMIN) as globex:
        acme.upsert(CORPUS)
        globex.upsert(CORPUS[:2])
        deadline = time.monotonic() + 60
        # Writes reach the index through the NATS log: wait until they are applied.
        while not acme.search("an active volcano in Sicily", mode="dense", k=1):
            assert time.monotonic() < deadline, "the upserted documents never became searchable"
            time.sleep(0.2)
        for mode in ("dense", "lexical", "hybrid"):
            acme.search("an active volcano in Sicily", mode=mode)
            globex.search("zzzz qqqq xxxx", mode=mode)
        for _ in range(2):  # the second is an answer cache hit
            ask_summary(list(acme.ask("How is espresso brewed?")))
        ask_summary(list(globex.ask("What is photosynthesis?")))
        acme.embed(["espresso crema"])
        with pytest.raises(RpcError):
            acme.search("volcano", namespace="no-such-namespace")
    # The server runs in this process: a warning logged here is counted like its own.
    logging.getLogger("rag_grpc.test_dashboards").warning("dashboard test: a counted warning")


def check_dashboards(prometheus: PrometheusServer) -> None:
    queries: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        queries += [(f"{path.name}: {title}", substitute(e)) for title, e in expressions(dashboard)]
        queries += [
            (f"{path.name}: ${name}", substitute(q)) for name, q in variable_queries(dashboard)
        ]
    assert len(queries) > 30
    optional = [q for q in queries if any(name in q[1] for name in ONLY_AFTER)]
    required = [q for q in queries if q not in optional]
    # Each ONLY_AFTER name must still be used, or the list is stale.
    for name in ONLY_AFTER:
        assert any(name in expr for _, expr in optional), f"{name} is in no dashboard"
    for _, expr in optional:
        prometheus.query(expr)  # parses and runs; raises PrometheusError otherwise
    pending = list(required)
    deadline = time.monotonic() + 30
    while True:
        # Each query raises on a parse or evaluation error; rates need two scrapes.
        pending = [(where, expr) for where, expr in pending if not prometheus.query(expr)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not pending, f"dashboard queries with no data: {pending}"
