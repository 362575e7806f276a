"""What several test modules of tests/ingest share: a nats-server with
JetStream (the `nats_server` and `nats_node` fixtures, from nats_setup.py
where the rest of the NATS set-up lives), and the SQLite job backend built
over a Retriever with the word embedder (the `retriever` fixture, `run_with`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from rag_grpc.config import LimitsConfig
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.jobs import IngestionManager, JobQueue
from tests.in_process import open_retriever
from tests.ingest.nats_setup import nats_node, nats_server

# nats_node and nats_server: fixtures, used by name
__all__ = ["nats_node", "nats_server", "retriever", "run_with"]

T = TypeVar("T")


@pytest.fixture
def retriever(tmp_path: Path) -> Retriever:
    return open_retriever(tmp_path / "data")


def run_with(
    queue: JobQueue,
    retriever: Retriever,
    body: Callable[[IngestionManager], Awaitable[T]],
    *,
    limits: LimitsConfig | None = None,
    start: bool = True,
) -> T:
    """body(manager) on a fresh event loop, the worker running (if start)."""

    async def main() -> T:
        manager = IngestionManager(queue, retriever, None, limits or LimitsConfig(), retry_s=0.01)
        if start:
            manager.start()
        try:
            return await asyncio.wait_for(body(manager), timeout=20)
        finally:
            await manager.stop()

    return asyncio.run(main())
