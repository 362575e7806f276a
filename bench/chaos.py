"""Soak of the deployment under failure: 3 retrieval replicas behind Envoy,
2 ingestion workers, a 3-node NATS JetStream cluster, all processes on
loopback (tests/cluster.py), under steady Search load through Envoy and a
stream of ingestion jobs, with kills in the middle.

    python -m bench.chaos [--minutes 10] [--threads 3] [--pause-ms 20] \\
        [--job-documents 100] [--job-interval-s 10] [--no-save]

At 40 % of the run one replica is SIGKILLed; at 45 % (once documents are
in flight) the node leading the job queue's consumer and one worker; at 60 %
all three restart. Per minute:
Search calls, failures (any status but OK), p50/p99 latency through Envoy,
and the peak RSS of every process. At the end: whether every replica holds
the same documents, and the drift of p99 and RSS from the first minute to
the last. The tests (tests/test_chaos.py) assert the behaviour; this
measures it over time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import command_line, record, table
from rag_grpc.documents import Document
from tests.cluster import (
    Cluster,
    SearchLoad,
    holding,
    job,
    make_certs,
    replica_counts,
    rss_bytes,
    submit,
    wait_until,
)

TOPICS = ["volcanoes", "espresso", "chess", "photosynthesis", "tides", "glaciers"]


def job_documents(round_: int, size: int, id_space: int) -> list[Document]:
    """One job's documents: ids cycle through a fixed space (so the store
    stops growing once it is full) and the text changes every round (so each
    document is written again, not skipped as unchanged)."""
    start = round_ * size
    return [
        Document(
            f"doc-{(start + i) % id_space}",
            f"Note {start + i} on {TOPICS[(start + i) % len(TOPICS)]}, revision {round_}: "
            "an item of the catalogue, in plain words.",
            {"round": float(round_)},
        )
        for i in range(size)
    ]


class Feeder:
    """Submits a job every interval to the worker that is never killed."""

    def __init__(self, cluster: Cluster, size: int, interval_s: float, id_space: int) -> None:
        self.cluster = cluster
        self.size = size
        self.interval_s = interval_s
        self.id_space = id_space
        self.jobs: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            docs = job_documents(round_, self.size, self.id_space)
            self.jobs.append(submit(self.cluster.workers[0], docs))
            round_ += 1
            self.stop.wait(self.interval_s)


class Sampler:
    """Peak RSS per process name per minute, sampled every few seconds."""

    def __init__(self, cluster: Cluster, started: float, every_s: float = 5.0) -> None:
        self.cluster = cluster
        self.started = started
        self.every_s = every_s
        self.peak: dict[int, dict[str, int]] = defaultdict(dict)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            minute = int((time.monotonic() - self.started) // 60)
            for name, pid in self.cluster.pids().items():
                rss = rss_bytes(pid)
                self.peak[minute][name] = max(self.peak[minute].get(name, 0), rss)
            self.stop.wait(self.every_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (10)")
    parser.add_argument("--threads", type=int, default=3, help="Search client threads (3)")
    parser.add_argument(
        "--pause-ms", type=float, default=20.0, help="pause between a thread's calls (20)"
    )
    parser.add_argument("--job-documents", type=int, default=100, help="documents per job (100)")
    parser.add_argument(
        "--job-interval-s", type=float, default=10.0, help="a job submitted every (10 s)"
    )
    parser.add_argument(
        "--id-space", type=int, default=1000, help="distinct document ids, reused (1000)"
    )
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rag-chaos-"))
    cluster = Cluster(work / "cluster", make_certs(work / "certs"))
    events: list[tuple[float, str]] = []
    try:
        cluster.start()
        load = SearchLoad(cluster, threads=args.threads, pause_s=args.pause_ms / 1000)
        seconds = args.minutes * 60
        started = time.monotonic()
        sampler = Sampler(cluster, started)
        feeder = Feeder(cluster, args.job_documents, args.job_interval_s, args.id_space)
        sampler.thread.start()
        feeder.thread.start()
        replica, worker = cluster.replicas[-1], cluster.workers[-1]
        leader = ""
        with load.running():
            plan = [(0.40, "kill replica"), (0.45, "kill leader and worker"), (0.60, "restart")]
            for at, action in plan:
                time.sleep(max(0.0, started + at * seconds - time.monotonic()))
                now = time.monotonic() - started
                if action == "kill replica":
                    replica.kill()
                    events.append((now, f"SIGKILL {replica.name}"))
                elif action == "kill leader and worker":
                    # With documents delivered and not acknowledged (a job in
                    # flight): the next job comes within an interval.
                    deadline = time.monotonic() + args.job_interval_s + 30
                    consumer = cluster.consumer()
                    while not consumer.num_ack_pending and time.monotonic() < deadline:
                        time.sleep(0.05)
                        consumer = cluster.consumer()
                    now = time.monotonic() - started
                    leader = consumer.cluster.leader
                    cluster.node(leader).stop()
                    worker.kill()
                    events.append(
                        (
                            now,
                            f"SIGKILL nats-{leader} (consumer leader; "
                            f"{consumer.num_ack_pending} documents in flight) and {worker.name}",
                        )
                    )
                else:
                    cluster.node(leader).start()
                    replica.start()
                    worker.start()
                    events.append((now, f"restart nats-{leader}, {replica.name}, {worker.name}"))
            time.sleep(max(0.0, started + seconds - time.monotonic()))
            feeder.stop.set()
            sampler.stop.set()
        elapsed = time.monotonic() - started
        # The last job ends, then every replica must hold the same documents.
        last = feeder.jobs[-1]
        wait_until(
            lambda: job(cluster.workers[0], last).state not in ("QUEUED", "RUNNING"), timeout=300
        )
        expected = replica_counts(cluster.replicas[0])
        try:
            for member in cluster.replicas:
                wait_until(holding(member, expected), timeout=120)
            converged = f"yes: every replica holds {expected}"
        except AssertionError:
            converged = f"NO: {[replica_counts(m) for m in cluster.replicas]}"
        retries = cluster.gateway_view().stat("cluster.stable.upstream_rq_retry")
        ejections = cluster.gateway_view().stat(
            "cluster.stable.outlier_detection.ejections_enforced_total"
        )
        finished = [job(cluster.workers[0], j) for j in feeder.jobs]
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    by_minute: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for start, ms, status in load.calls:
        by_minute[int((start - started) // 60)].append((ms, status))
    names = sorted({name for peaks in sampler.peak.values() for name in peaks})
    minutes = sorted(m for m in by_minute if m * 60 < elapsed - 1)
    rows = []
    p99s = []
    for m in minutes:
        latencies = np.array([ms for ms, status in by_minute[m] if status == "OK"])
        failed = sum(status != "OK" for _, status in by_minute[m])
        happened = "; ".join(text for t, text in events if int(t // 60) == m)
        p99s.append(float(np.percentile(latencies, 99)) if len(latencies) else 0.0)
        rss = [sampler.peak.get(m, {}).get(name, 0) / 2**20 for name in names]
        rows.append(
            [
                m + 1,
                len(by_minute[m]),
                failed,
                float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
                p99s[-1],
                *[f"{v:.0f}" for v in rss],
                happened,
            ]
        )
    headers = ["min", "searches", "failed", "p50 ms", "p99 ms", *[f"{n} MB" for n in names]]
    headers.append("events")
    statuses = load.statuses()
    total_failed = sum(n for s, n in statuses.items() if s != "OK")
    drift_p99 = p99s[-1] / p99s[0] if p99s[0] else float("nan")
    rss_drift = {
        name: (
            sampler.peak[minutes[-1]].get(name, 0) / 2**20,
            sampler.peak[minutes[0]].get(name, 0) / 2**20,
        )
        for name in names
    }
    jobs_ok = sum(j.state == "SUCCEEDED" and j.failed == 0 for j in finished)
    body = table(headers, rows) + (
        f"\n\nSearch calls through Envoy: {sum(statuses.values()):,}, failed: {total_failed} "
        f"({dict(statuses)}); Envoy retried {retries} calls, ejected a replica {ejections} "
        f"times. Jobs: {jobs_ok} of {len(finished)} succeeded with no failed document "
        f"({args.job_documents} documents every {args.job_interval_s:.0f} s, ids reused over "
        f"{args.id_space}). Replicas converged: {converged}. p99 last minute / first minute: "
        f"{drift_p99:.2f}. RSS last minute - first minute (MB): "
        + ", ".join(f"{n} {a - b:+.0f}" for n, (a, b) in rss_drift.items())
        + " (a restarted process starts again from its first-minute size)."
        f" Load: {args.threads} client threads, {args.pause_ms:.0f} ms pause between calls."
    )
    record(
        f"Chaos soak, {args.minutes:g} min",
        command_line(),
        "none (rag-grpc deployment: 3 replicas behind Envoy, 2 workers, 3-node NATS JetStream)",
        body,
        {
            "minutes": args.minutes,
            "rows": [dict(zip(headers, row, strict=True)) for row in rows],
            "statuses": dict(statuses),
            "retries": retries,
            "ejections": ejections,
            "converged": converged,
            "events": events,
            "p99_drift": drift_p99,
        },
        save=not args.no_save,
    )


if __name__ == "__main__":
    main()
