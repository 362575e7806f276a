"""Envoy as a child process on free ports, configured by envoy/render.py, for
the gateway tests (tests/test_envoy.py, tests/security/test_envoy_gateway.py),
tests/test_telemetry.py's trace through Envoy and tests/cluster.py's
`ReplicaGateway`; envoy/certs.sh makes the certificates they hand it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rag_grpc.client import RagClient
from tests.conftest import ROOT, free_port, tool

RENDER = ROOT / "envoy" / "render.py"
CERTS_SH = ROOT / "envoy" / "certs.sh"
# Rate limits set out of the way, for tests about something else.
NO_LIMITS: tuple[str, ...] = ("--rate-limit", "100000", "--burst", "100000")
NO_LIMITS += ("--client-rate-limit", "100000", "--client-burst", "100000")


class Envoy:
    """envoy/render.py + the envoy binary on free ports."""

    def __init__(self, workdir: Path, certs: Path, upstream: str, *extra: str) -> None:
        self.workdir = workdir
        self.certs = certs
        self.port = free_port()
        self.admin_port = free_port()
        self.config = workdir / "envoy.yaml"
        self.render("--upstream", upstream, *extra)
        self.proc = subprocess.Popen(
            [tool("envoy"), "-c", str(self.config), "--use-dynamic-base-id", "-l", "warning"],
            stdout=open(workdir / "envoy.log", "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def render(self, *args: str) -> None:
        subprocess.run(
            [
                sys.executable,
                str(RENDER),
                "--listen-port",
                str(self.port),
                "--admin-port",
                str(self.admin_port),
                "--certs",
                str(self.certs),
                "--out",
                str(self.config),
                *args,
            ],
            check=True,
            capture_output=True,
        )

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def stat(self, name: str) -> int:
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "envoy.log").read_text()[-3000:]
            try:
                if self.admin("/ready").strip() == "LIVE" and self.stat(
                    "cluster.stable.membership_healthy"
                ):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError((self.workdir / "envoy.log").read_text()[-3000:])

    def client(self, certs: Path, who: str = "client", timeout: float = 10) -> RagClient:
        return RagClient(
            f"localhost:{self.port}",
            timeout=timeout,
            ca=certs / "ca.pem",
            cert=certs / f"{who}.pem",
            key=certs / f"{who}.key",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
