"""Forgetting documents erases them from the NATS write log
(rag_grpc/ingest/log_erasure.py), against a real NATS JetStream server: no
entry nor file of NATS keeps their text, the other documents of the erased
entries are published again, and replicas behind or new pass the erased
sequences and end with the survivors."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.conftest import ServerThread, wait_for
from tests.ingest.nats_setup import (
    Nats,
    documents,
    holds,
    on_nats,
    run_on,
    stream_state,
)

# Starts NATS servers (and clusters of them).
pytestmark = pytest.mark.slow


def log_entries(server: ServerThread) -> dict[int, bytes]:
    """Every entry the write log still holds, by sequence."""
    import nats.js.errors

    log = server.server.nats
    assert log is not None
    state = stream_state(server).state

    async def read() -> dict[int, bytes]:
        found = {}
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                found[seq] = (await log.js.get_msg(log.writes_stream, seq)).data
            except nats.js.errors.NotFoundError:
                pass
        return found

    return dict(run_on(server, read()))


def stored(client: RagClient, ids: list[str]) -> dict[str, str]:
    found, _ = client.get(ids)
    return {d.id: d.text for d in found}


def test_forget_erases_the_documents_from_the_nats_log_and_keeps_the_others(
    start_server: Callable[..., ServerThread], nats_server: Nats, tmp_path: Path
) -> None:
    settings = on_nats(nats_server.url)
    a = start_server(tmp_path / "a", **settings)
    b = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    log = a.server.nats
    assert log is not None
    secret = Document("secret", "Margaret Oyelaran lives at 12 Quillfeather Lane.", {})
    moved = Document("secret", "Margaret Oyelaran moved to 7 Brackenhurst Row.", {})
    keep = documents(5, "keep")
    newer = Document("keep-0", "Note 0, rewritten: volcanoes and their ash clouds.", {})
    ids = ["secret", *(d.id for d in keep)]
    with RagClient(a.target) as ca:
        wait_for(log.connected.is_set)
        # The secret shares its entries with other documents, in two versions.
        ca.upsert([secret, keep[0], keep[1]])
        with RagClient(b.target) as cb:
            wait_for(holds(cb, {"default": (3, 3)}))
        b.stop()  # b lags behind what follows
        ca.upsert([keep[2], moved, keep[3]])
        ca.upsert([newer, keep[4]])  # keep-0's first version is not its latest
        ca.delete(["keep-3"])  # nor is keep-3 alive: neither may come back
        before = log_entries(a)
        assert sum(b"Oyelaran" in data for data in before.values()) == 2
        result = ca.delete(["secret"], forget=True)
        assert result.documents == 1
        survivors = {"keep-0": newer.text, "keep-1": keep[1].text, "keep-2": keep[2].text}
        survivors["keep-4"] = keep[4].text
        assert stored(ca, ids) == survivors

        # Nothing the log holds carries the secret, nor does the NATS store on disk.
        after = log_entries(a)
        assert not [seq for seq, data in after.items() if b"Oyelaran" in data]
        assert not [seq for seq in before if b"Oyelaran" in before[seq] and seq in after]
        on_disk = [
            p
            for p in (tmp_path / "jetstream").rglob("*")
            if p.is_file() and b"Oyelaran" in p.read_bytes()
        ]
        assert not on_disk
        # The other documents of the erased entries are in the log again.
        again = b"".join(data for seq, data in after.items() if seq > max(before))
        assert keep[1].text.encode() in again and keep[2].text.encode() in again

    # b, which had applied the first erased entry and not the second, and a
    # new replica replaying the log from its start both end with the survivors.
    b2 = start_server(tmp_path / "b", services=["retrieval", "admin"], **settings)
    c = start_server(tmp_path / "c", services=["retrieval", "admin"], **settings)
    for replica in (b2, c):
        follower = replica.server.nats
        assert follower is not None
        with RagClient(replica.target) as client:
            wait_for(holds(client, {"default": (4, 4)}))
            assert stored(client, ids) == survivors
        assert follower.stalled is None
        wait_for(partial(lambda f: f.applied == log.applied, follower))
