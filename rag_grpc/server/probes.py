"""What keeps running beside the calls: the health of remote dependencies
and of Triton reflected in ours, the retention sweeper, the periodic index
saver, and NOT_SERVING everywhere once a replica stops following the log."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.config import Settings
from rag_grpc.generate.triton import TritonGenerator
from rag_grpc.index.retriever import Retriever
from rag_grpc.ingest.backend import WriteBackend
from rag_grpc.services.registry import SERVICES

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RemoteDependency:
    """A remote service this process needs, probed through its health service."""

    target: str
    service: str
    channel: grpc.aio.Channel
    dependents: list[str] = field(default_factory=list)


class BackgroundTasks:
    """The loops a server runs until it stops, cancelled together."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: Coroutine[Any, Any, None], name: str) -> None:
        """Run loop as a named task until cancel()."""
        self._tasks.append(asyncio.create_task(loop, name=name))

    def cancel(self) -> None:
        """Cancel every loop (they hold no state that needs saving)."""
        for task in self._tasks:
            task.cancel()


async def probe_remotes(
    remotes: list[RemoteDependency], health: health_aio.HealthServicer, interval_s: float
) -> None:
    """Turn dependents NOT_SERVING while a remote dependency's health check fails."""
    while True:
        for remote in remotes:
            stub = health_pb2_grpc.HealthStub(remote.channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICES[remote.service].health_name),
                    timeout=interval_s,
                )
                ok = reply.status == SERVING
            except grpc.aio.AioRpcError:
                ok = False
            status = SERVING if ok else NOT_SERVING
            for dependent in remote.dependents:
                await health.set(SERVICES[dependent].health_name, status)
        await asyncio.sleep(interval_s)


async def probe_triton(
    triton: TritonGenerator, health: health_aio.HealthServicer, settings: Settings
) -> None:
    """Follow Triton's server and model readiness in our health status."""
    while True:
        await asyncio.sleep(settings.generation.triton.probe_interval_s)
        await apply_triton_health(await triton.probe(), health, settings)


async def apply_triton_health(
    ready: bool, health: health_aio.HealthServicer, settings: Settings
) -> None:
    """Generation and rag SERVING while Triton is ready (or the extractive
    fallback answers for it)."""
    # With the extractive fallback, Ask still answers while Triton is down.
    serving = ready or settings.generation.fallback_to_extractive
    for name in ("generation", "rag"):
        if name in settings.services:
            await health.set(SERVICES[name].health_name, SERVING if serving else NOT_SERVING)


async def mark_stalled(
    health: health_aio.HealthServicer, services: Iterable[str], reason: str
) -> None:
    """A replica that can no longer follow the write log serves stale data:
    every service says NOT_SERVING so probes and gateways route around it."""
    for name in [*services, ""]:
        await health.set(SERVICES[name].health_name if name else "", NOT_SERVING)


async def sweep_retention(
    settings: Settings, retriever: Retriever, writes: WriteBackend, executor: Executor
) -> None:
    """Enforce each namespace's time to live."""
    retention = settings.retention
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(retention.sweep_interval_s)
        for namespace, ttl in retention.ttl_s.items():
            try:
                expired = await loop.run_in_executor(executor, retriever.expired, namespace, ttl)
                if expired is None:
                    continue
                # Through the write path (and the log, under NATS); the
                # cut-off is checked again inside the write transaction.
                result = await writes.apply_delete(expired)
                log.info(
                    "retention: deleted %d expired documents from %s",
                    result.documents,
                    namespace,
                )
            except Exception:  # the sweeper must outlive one bad pass
                log.exception("retention sweep of %s failed", namespace)


async def save_periodically(retriever: Retriever, interval_s: float, executor: Executor) -> None:
    """Save indexes written since their last save, every interval_s."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        try:
            saved = await loop.run_in_executor(
                executor, functools.partial(retriever.save_indexes, True)
            )
            if saved:
                log.info("saved %d changed indexes", saved)
        except Exception:  # a failed save must not end the saver
            log.exception("saving the indexes failed; retrying at the next interval")
