"""NVIDIA Triton Inference Server as a child process on free ports
(deploy/triton/serve.sh), and the llm model's pinned weights
(deploy/triton/weights.py), for the generation tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, free_port

SERVE = ROOT / "deploy" / "triton" / "serve.sh"
WEIGHTS = ROOT / "deploy" / "triton" / "weights.py"
TOKEN_DELAY_MS = 20  # per generated word, so a long answer takes seconds


class Triton:
    """deploy/triton/serve.sh as a child process on free ports."""

    def __init__(
        self,
        log: Path,
        grpc_port: int | None = None,
        token_delay_ms: float = TOKEN_DELAY_MS,
        models: str = "rag_llm,rag_llm_sync",
        env: dict[str, str] | None = None,
    ) -> None:
        self.token_delay_ms = token_delay_ms
        self.models = models
        self.env = env or {}
        self.grpc_port = grpc_port or free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 280) -> Triton:
        env = {**os.environ, "RAG_LLM_TOKEN_DELAY_MS": str(self.token_delay_ms), **self.env}
        ports = ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
        self.proc = subprocess.Popen(
            [
                str(SERVE),
                *ports,
                "--metrics-port",
                str(self.metrics_port),
                "--models",
                self.models,
            ],
            stdout=open(self.log, "ab"),  # noqa: SIM115 - lives as long as the process
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"Triton did not become ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def metric(self, name: str, model: str = "rag_llm") -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        match = re.search(rf'^{name}\{{model="{model}"[^}}]*\}} (\S+)$', text, re.M)
        assert match, f"no {name} for {model} in Triton's metrics"
        return float(match.group(1))


def llm_weights(name: str) -> tuple[Path, str]:
    """(path, pinned sha256) of a GGUF in deploy/triton/weights.py's catalog,
    fetched and checked once per machine, through the script's command line
    as serve-llm.sh uses it (its progress and errors go to stderr)."""

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(WEIGHTS), *args], stdout=subprocess.PIPE, text=True, check=True
        )
        return done.stdout.strip().splitlines()[-1]

    return Path(run("fetch", name)), run("sha256", name)
