"""A real Prometheus server for tests: Debian's `prometheus` on a free port.

Usage (targets are "host:port" of /metrics endpoints, e.g. a test server's
`telemetry.prometheus_port`; rule files are paths Prometheus loads as they are)::

    with PrometheusServer(tmp_path / "prom", targets=[f"127.0.0.1:{port}"],
                          rule_files=[rules]) as prom:
        prom.wait_for_targets_up()
        prom.wait_until(lambda: prom.query("rag_rpc_calls_total"), "calls scraped")
        prom.query("sum(rate(rag_rpc_calls_total[1m]))")   # -> list of samples
        prom.alerts()                                      # -> /api/v1/alerts

Scrape and evaluation intervals default to 1 s so rules and alerts move in
seconds. The binary comes from the Debian package (`make install-test`
installs it as root); when it is missing, `prometheus_binary()` installs it if
we are root, or fails saying what to install: never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

from tests.conftest import free_port

T = TypeVar("T")

INSTALL_HINT = (
    "Prometheus is not installed: run `make install-test` as root, or "
    "`apt-get install --no-install-recommends prometheus` (Debian/Ubuntu; 2.42 or newer)"
)


class PrometheusError(RuntimeError):
    """Prometheus answered a query or API call with status "error"."""

    def __init__(self, error_type: str, error: str, expr: str | None = None) -> None:
        where = f" for {expr!r}" if expr is not None else ""
        super().__init__(f"Prometheus {error_type}{where}: {error}")
        self.error_type = error_type
        self.error = error


def _stop_system_service() -> None:
    """Stop the service the Debian package starts, so it does not hold port 9090.

    Our servers use their own free ports; a system Prometheus left running would
    only cost memory and scrape nothing we want, but it must not outlive us.
    """
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", "prometheus"], check=False)
    elif Path("/etc/init.d/prometheus").exists():
        subprocess.run(["/etc/init.d/prometheus", "stop"], check=False, capture_output=True)


def prometheus_binary() -> str:
    """Path of the `prometheus` server; installs the Debian package if we are root."""
    path = shutil.which("prometheus")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(INSTALL_HINT)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}\n{INSTALL_HINT}")
    _stop_system_service()
    path = shutil.which("prometheus")
    if not path:
        pytest.fail(f"the prometheus package installed no `prometheus` command\n{INSTALL_HINT}")
    return path


class PrometheusServer:
    """One Prometheus process scraping `targets`, loading `rule_files`, on a free port."""

    def __init__(
        self,
        directory: Path,
        targets: Sequence[str] = (),
        rule_files: Sequence[Path] = (),
        *,
        job: str = "rag-grpc",
        scrape_interval_s: float = 1.0,
        evaluation_interval_s: float = 1.0,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.directory = directory
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The prometheus.yml this server runs with (JSON is valid YAML)."""
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": f"{int(self.evaluation_interval_s * 1000)}ms",
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": self.job, "static_configs": [{"targets": self.targets}]}
            ],
        }

    def start(self) -> PrometheusServer:
        binary = prometheus_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        config_file = self.directory / "prometheus.yml"
        config_file.write_text(json.dumps(self.config(), indent=2))
        self.port = free_port()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.wait_until(self._ready, "Prometheus ready", timeout_s=self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of Prometheus's own log (for failure messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # --- HTTP API ---------------------------------------------------------

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError on status "error"."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            # Bad queries come back as 400/422 with a JSON body that says why.
            raw = error.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise PrometheusError(str(error.code), raw.decode(errors="replace")) from error
        if body.get("status") != "success":
            raise PrometheusError(
                body.get("errorType", "error"), body.get("error", ""), (params or {}).get("query")
            )
        return body.get("data")

    def query_data(self, expr: str) -> dict[str, Any]:
        """An instant query's whole `data` ({"resultType", "result"}), scalars included."""
        data = self.api("query", {"query": expr})
        assert isinstance(data, dict)
        return data

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's samples: [{"metric": {labels}, "value": [ts, "v"]}, ...].

        A scalar or string result comes back as one sample with no labels.
        """
        data = self.query_data(expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        assert isinstance(result, list)
        return result

    def value(self, expr: str) -> float | None:
        """The value of an expression that yields one sample; None when it yields none."""
        samples = self.query(expr)
        if not samples:
            return None
        assert len(samples) == 1, f"{expr!r} gave {len(samples)} samples: {samples}"
        return float(samples[0]["value"][1])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing): [{"labels", "annotations", "state", ...}]."""
        data = self.api("alerts")
        return list(data["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups with each rule's health and last error."""
        data = self.api("rules")
        return list(data["groups"])

    def targets_active(self) -> list[dict[str, Any]]:
        """Active scrape targets: [{"scrapeUrl", "health", "lastError", ...}]."""
        data = self.api("targets")
        return list(data["activeTargets"])

    def wait_for_targets_up(self, timeout_s: float = 30.0) -> None:
        """Wait until every configured target has been scraped successfully."""

        def all_up() -> bool:
            active = self.targets_active()
            return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

        self.wait_until(all_up, "every target up", timeout_s=timeout_s)

    def wait_until(self, predicate: Callable[[], T], what: str, *, timeout_s: float = 30.0) -> T:
        """Poll `predicate` until it returns something truthy; fail with `what` after timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                detail = ""
                if self.port and self.proc is not None and self.proc.poll() is None:
                    try:
                        detail = f"\ntargets: {self.targets_active()}"
                    except Exception as error:  # the message is best effort
                        detail = f"\n(targets unavailable: {error})"
                pytest.fail(
                    f"timed out after {timeout_s:.0f}s waiting for {what}{detail}\n"
                    f"prometheus log:\n{self.log_tail()}"
                )
            time.sleep(0.25)


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Start Prometheus servers (each in its own tmp dir); all are stopped at teardown.

    Import it into a test module (`from tests.prometheus_server import start_prometheus`)
    and take it as an argument like any fixture.
    """
    started: list[PrometheusServer] = []

    def start(
        targets: Sequence[str] = (), rule_files: Sequence[Path] = (), **options: Any
    ) -> PrometheusServer:
        directory = tmp_path / f"prometheus-{len(started)}"
        server = PrometheusServer(directory, targets, rule_files, **options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
