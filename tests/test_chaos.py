"""Replicas under failure: the deployment as processes (tests/cluster.py: a
3-node JetStream cluster, 3 retrieval replicas behind Envoy, 2 ingestion
workers) under steady Search load with an ingestion job in flight, while
processes are SIGKILLed and restarted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import (
    Cluster,
    SearchLoad,
    holding,
    job,
    make_certs,
    missing_on,
    submit,
    wait_until,
)
from tests.ingest.nats_setup import documents

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    deployment = Cluster(tmp_path / "cluster", make_certs(tmp_path / "certs"))
    try:
        yield deployment.start()
    finally:
        deployment.stop()


def finished(cluster: Cluster, worker_index: int, job_id: str, total: int) -> None:
    """Wait for the job to end, then check it ended with every document processed."""
    worker = cluster.workers[worker_index]
    wait_until(lambda: job(worker, job_id).state not in ("QUEUED", "RUNNING"), timeout=240)
    status = job(worker, job_id)
    assert (status.state, status.processed, status.failed) == ("SUCCEEDED", total, 0), status


@pytest.mark.timeout(600)
def test_replicas_survive_kills_under_search_and_ingestion_load(cluster: Cluster) -> None:
    replicas, (worker, doomed_worker) = cluster.replicas, cluster.workers
    gateway = cluster.gateway_view()
    seed = documents(60, "seed")
    finished(cluster, 0, submit(worker, seed), len(seed))
    for replica in replicas:
        wait_until(holding(replica, {"default": (60, 60)}))

    load = SearchLoad(cluster)
    with load.running():
        wait_until(lambda: load.ok_calls() >= 30)
        # Big enough to be in flight through both kills below, on a busy machine.
        total = 2000
        batch = documents(total)
        job_id = submit(worker, batch)
        wait_until(lambda: 0 < job(worker, job_id).processed < total // 4)

        # 1. A replica dies mid-load: Envoy retries its calls on another replica
        # and stops routing to it (outlier detection, then the active health
        # check keeps it out); no caller sees a failure.
        dead_replica = replicas[2]
        retried = gateway.stat("cluster.stable.upstream_rq_retry")
        dead_replica.kill()
        wait_until(lambda: not gateway.healthy(dead_replica.target))
        answered = load.ok_calls()
        wait_until(lambda: load.ok_calls() >= answered + 30)
        # Calls did meet the dead replica (reset or refused) and went elsewhere.
        assert gateway.stat("cluster.stable.upstream_rq_retry") > retried

        # 2. The node leading the job queue's consumer (it holds which documents
        # are delivered and not acknowledged) and a worker holding documents die.
        wait_until(lambda: cluster.consumer().num_ack_pending > 0)
        leader = cluster.consumer().cluster.leader
        at_kill = job(worker, job_id).processed
        assert at_kill < total  # still in flight
        print("processed at the leader's kill:", at_kill, "of", total)
        cluster.node(leader).stop()
        doomed_worker.kill()

        # The job finishes on the remaining worker, after a new leader is
        # elected and what the dead worker held is redelivered.
        finished(cluster, 0, job_id, total)
        assert cluster.consumer().cluster.leader != leader
        survivors = replicas[:2]
        ids = [d.id for d in seed + batch]
        for replica in survivors:
            wait_until(holding(replica, {"default": (2060, 2060)}))
            assert missing_on(replica, ids) == []

        # 3. Everything killed comes back and catches up.
        cluster.node(leader).start()
        dead_replica.start()
        doomed_worker.start()
        wait_until(holding(dead_replica, {"default": (2060, 2060)}))
        assert missing_on(dead_replica, ids) == []
        wait_until(cluster.nats_in_step)
        # Envoy routes to the restarted replica again.
        wait_until(lambda: gateway.healthy(dead_replica.target))
        before = gateway.successes(dead_replica.target)
        wait_until(lambda: gateway.successes(dead_replica.target) > before + 5)

        # The restarted worker works the queue: alone (the other drained away), it
        # finishes a new job, which every replica then holds.
        worker.stop()
        late = documents(20, "late")
        finished(cluster, 1, submit(doomed_worker, late), len(late))
        for replica in replicas:
            wait_until(holding(replica, {"default": (2080, 2080)}))

    statuses = load.statuses()
    print(
        "searches:",
        dict(statuses),
        "retried by Envoy:",
        gateway.stat("cluster.stable.upstream_rq_retry"),
        "ejections:",
        gateway.stat("cluster.stable.outlier_detection.ejections_enforced_total"),
        "health check failures:",
        gateway.stat("cluster.stable.health_check.failure"),
    )
    # Every Search call through the gateway, across both kills and the
    # restarts, succeeded.
    assert set(statuses) == {"OK"}, (statuses, load.failures[:5])
    assert statuses["OK"] > 100
