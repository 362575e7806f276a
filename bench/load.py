"""Load generation for the gRPC benchmarks: start `rag-grpc serve` and drive
it from several client processes, each keeping asyncio calls in flight."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
NO_OP = "/grpc.health.v1.Health/Check"


def start_server(
    data_dir: Path,
    port: int,
    log: Path,
    services: str,
    env: dict[str, str] | None = None,
    ready_within_s: float = 600,
) -> subprocess.Popen[bytes]:
    """`rag-grpc serve` on loopback; returns once its health check answers SERVING."""
    environment = {
        **os.environ,
        "RAG_GRPC_EMBEDDING__MODEL_DIR": str(ROOT / "models/all-MiniLM-L6-v2"),
        "RAG_GRPC_EMBEDDING__EXPORT_DIR": str(ROOT / "bench/.cache/model-exports"),
        **(env or {}),
    }
    command = shutil.which("rag-grpc", path=str(Path(sys.executable).parent)) or "rag-grpc"
    proc = subprocess.Popen(
        [
            command,
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--services",
            services,
        ],
        stdout=open(log, "w"),  # noqa: SIM115 - the server outlives this function
        stderr=subprocess.STDOUT,
        env=environment,
    )
    deadline = time.monotonic() + ready_within_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc
            except grpc.RpcError:
                time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start within {ready_within_s:.0f} s")


async def _load(
    target: str,
    method: str,
    payloads: list[bytes],
    seconds: float,
    inflight: int,
    out: mp.Queue,
    tls: tuple[str, str, str] | None = None,
) -> None:
    if tls is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        ca, cert, key = (Path(p).read_bytes() for p in tls)
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                await call(payloads[i % len(payloads)], timeout=30)
                latencies.append(time.perf_counter() - started)
                i += inflight

        await asyncio.gather(*(worker(j) for j in range(inflight)))
    out.put(latencies)


def _process(*load: Any) -> None:
    """A spawned worker: `_load` with these arguments on its own event loop."""
    asyncio.run(_load(*load))


def run_load(
    target: str,
    label: str,
    method: str,
    payloads: list[bytes],
    *,
    procs: int,
    inflight: int,
    seconds: float,
    tls: tuple[str, str, str] | None = None,
) -> list[object]:
    """[label, calls, RPC/s, p50 ms, p99 ms] of `procs` x `inflight` calls for `seconds`
    (tls: CA, client certificate and key files for a TLS target)."""
    # Spawned, not forked: a forked child inherits the parent's gRPC state
    # and can hang before its first call.
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    workers = [
        ctx.Process(
            target=_process,
            args=(target, method, payloads[p:] + payloads[:p], seconds, inflight, out, tls),
        )
        for p in range(procs)
    ]
    for worker in workers:
        worker.start()
    latencies = np.concatenate([np.asarray(out.get()) for _ in workers]) * 1000
    for worker in workers:
        worker.join()
    return [
        label,
        len(latencies),
        len(latencies) / seconds,
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
    ]
