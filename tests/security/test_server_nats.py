"""Tenancy over the NATS write log and job queue: jobs and log entries carry
the stored "<tenant>~<namespace>" name, so every worker and replica writes
into, and answers from, the right tenant's namespace."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document
from tests.conftest import CORPUS, ServerThread, wait_for
from tests.ingest.nats_setup import Nats, nats_server, on_nats
from tests.security.tenants import member, write_policy

# Starts a NATS server.
pytestmark = pytest.mark.slow

__all__ = ["nats_server"]  # the fixture, used by name

ACME = member("acme", "admin", "acme-admin")
GLOBEX = member("globex", "admin", "globex-admin")


def test_replicas_keep_tenants_apart_and_a_job_keeps_what_the_quota_allows(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "policy.toml", [ACME, GLOBEX], quotas={"acme": {"documents": 3}}
    )
    auth = {"auth": {"policy_file": policy}}
    # One worker (a); b only applies the log. Quotas are checked against the
    # worker's replica, so two workers could each overshoot by a batch in flight.
    a = start_server(tmp_path / "a", **on_nats(nats_server.url, batch_documents=1), **auth)
    b = start_server(tmp_path / "b", **on_nats(nats_server.url, worker=False), **auth)

    def connected(replica: ServerThread) -> Callable[[], bool]:
        nats = replica.server.nats
        return lambda: nats is not None and nats.connected.is_set()

    for replica in (a, b):
        wait_for(connected(replica))
    with (
        RagClient(a.target, token=ACME.key) as acme_a,
        RagClient(b.target, token=ACME.key) as acme_b,
    ):
        job_id = acme_a.submit(CORPUS)
        final = list(acme_b.watch_job(job_id, timeout=120))[-1]
        assert (final.state, final.processed, final.failed) == ("SUCCEEDED", 5, 2)
        assert all("may store 3 documents" in message for _, message in final.errors)

        # Both replicas applied exactly the documents the quota allowed.
        def holds_three(client: RagClient) -> Callable[[], bool]:
            return lambda: len(client.get([d.id for d in CORPUS])[0]) == 3

        for client in (acme_a, acme_b):
            wait_for(holds_three(client))
        # The replica that did not run the job counts the same stored sizes.
        assert acme_b.usage()[0].documents == 3
    with (
        RagClient(b.target, token=GLOBEX.key) as globex_b,
        RagClient(a.target, token=GLOBEX.key) as globex_a,
    ):
        globex_b.upsert([Document("volcano", "Globex's own volcano note.", {})])
        wait_for(lambda: bool(globex_a.get(["volcano"])[0]))
        assert globex_a.get(["volcano"])[0][0].text == "Globex's own volcano note."
        assert globex_a.get(["chess"]) == ([], ["chess"])
        # Another tenant's job is NOT_FOUND on every replica, as if it did not exist.
        with pytest.raises(RpcError) as info:
            globex_a.get_job(job_id)
        assert info.value.code == "NOT_FOUND" and "acme" not in info.value.message
    stored = {n.name for n in b.server.retriever.stats()}  # type: ignore[union-attr]
    assert {"acme~default", "globex~default"} <= stored
