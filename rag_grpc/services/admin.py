"""rag.v1.AdminService: what this process holds and runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from datetime import datetime
from typing import Any

import grpc

from rag_grpc import __version__
from rag_grpc.backup import BackupError, FileKeyProvider, KeyProvider, SnapshotArchive
from rag_grpc.config import IndexConfig
from rag_grpc.deadlines import in_thread
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted
from rag_grpc.flags import KNOWN_FLAGS, FeatureFlags
from rag_grpc.index.query import NamespaceStats
from rag_grpc.index.retriever import Retriever
from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc
from rag_grpc.security import tenancy
from rag_grpc.security.access import AccessControl
from rag_grpc.security.audit import AuditLog
from rag_grpc.services import convert
from rag_grpc.services.auditing import audit, outcome_of
from rag_grpc.services.interceptors import current_caller
from rag_grpc.stats import ServerStats

# Audit records sent per read of the log (AuditExport pages through it).
_AUDIT_PAGE = 1000


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """Stats, snapshots (backup archives streamed to the caller), usage per
    tenant and the audit log."""

    def __init__(
        self,
        *,
        services: list[str],
        retriever: Retriever | None,
        embedder: BatchingEmbedder | None,
        generator_name: str,
        generator_stats: Callable[[], dict[str, Any]] | None = None,
        index_config: IndexConfig,
        executor: Executor | None,
        backup_key: KeyProvider | None = None,
        access: AccessControl | None = None,
        flags: FeatureFlags | None = None,
    ) -> None:
        self.access = access
        self.flags = flags
        self.backup_key = backup_key or FileKeyProvider(None)
        self.services = services
        self.retriever = retriever
        self.embedder = embedder
        self.generator_name = generator_name
        self.generator_stats = generator_stats
        self.index_config = index_config
        self.executor = executor
        self.started = time.monotonic()
        self._snapshot_running = False

    async def Stats(
        self, request: admin_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatsResponse:
        tenant = current_caller().tenant
        namespaces, owners = await self._namespaces(tenant)
        embedder = self.embedder
        stats = ServerStats(
            version=__version__,
            services=tuple(self.services),
            namespaces=namespaces,
            generator=self.generator_name,
            models=(embedder.encoder.model_id,) if embedder is not None else (),
        )
        response = convert.server_stats_to_pb(stats, owners)
        response.uptime_seconds = time.monotonic() - self.started
        if self.generator_name:
            backend = self.generator_stats() if self.generator_stats else {"ready": True}
            response.generation.CopyFrom(
                admin_pb2.GeneratorStats(name=self.generator_name, **backend)
            )
        if self.flags is not None:
            self._add_flags(response, show_lists=tenant is None)
        if self.retriever is not None:
            cfg = self.index_config
            response.index.CopyFrom(
                admin_pb2.IndexParameters(
                    kind="rag-native-hnsw (hnswlib 0.8.0 headers)",
                    space="ip",
                    dimension=self.retriever.embedder.dimension,
                    m=cfg.m,
                    ef_construction=cfg.ef_construction,
                    ef_search=cfg.ef_search,
                )
            )
        if embedder is not None:
            encoder = embedder.encoder
            counters = embedder.stats()
            response.models[0].MergeFrom(
                admin_pb2.ModelInfo(
                    dimension=encoder.dimension,
                    provider=encoder.provider,
                    variant=encoder.variant,
                    max_sequence_length=encoder.max_sequence_length,
                    cache_hits=counters.cache.hits,
                    cache_misses=counters.cache.misses,
                    cache_hit_ratio=counters.cache.hit_ratio,
                    cache_bytes=counters.cache.bytes,
                    batches=counters.batches,
                    batched_texts=counters.texts,
                )
            )
        return response

    async def _namespaces(self, tenant: str | None) -> tuple[tuple[NamespaceStats, ...], list[str]]:
        """The namespaces the caller may see, as it names them, and each one's
        tenant: a tenant sees its own; operators (and a single-tenant server)
        see all, each with its tenant."""
        if self.retriever is None:
            return (), []
        shown: list[NamespaceStats] = []
        owners: list[str] = []
        for ns in await in_thread(self.executor, self.retriever.stats):
            if not tenancy.owns(tenant, ns.name):
                continue
            owner, own_name = tenancy.split(ns.name)
            shown.append(dataclasses.replace(ns, name=own_name))
            owners.append(owner if tenant is None and owner else "")
        return tuple(shown), owners

    def _add_flags(self, response: admin_pb2.StatsResponse, show_lists: bool) -> None:
        assert self.flags is not None
        flags = self.flags.current
        for name in sorted({*KNOWN_FLAGS, *flags}):
            config = flags.get(name)
            flag = response.flags.add(
                name=name, configured=config is not None, description=KNOWN_FLAGS.get(name, "")
            )
            if config is None:
                flag.enabled, flag.percentage, flag.key = True, 100.0, "namespace"
                continue
            flag.enabled, flag.percentage, flag.key = config.enabled, config.percentage, config.key
            # The lists name tenants and namespaces: empty for a tenant's callers.
            if show_lists:
                flag.allow.extend(config.allow)
                flag.deny.extend(config.deny)

    async def Snapshot(
        self, request: admin_pb2.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.SnapshotChunk]:
        caller = current_caller()
        detail = "unencrypted" if request.unencrypted else ""
        try:
            async for chunk in self._snapshot(request):
                yield chunk
        except BaseException as exc:
            await audit(self.access, caller, context, "Snapshot", outcome_of(exc), detail=detail)
            raise
        await audit(self.access, caller, context, "Snapshot", "ok", detail=detail)

    async def _snapshot(
        self, request: admin_pb2.SnapshotRequest
    ) -> AsyncIterator[admin_pb2.SnapshotChunk]:
        retriever = self.retriever
        if retriever is None:
            raise FailedPrecondition("this process holds no data (it does not run retrieval)")
        try:
            key = self.backup_key.key()
        except BackupError as exc:
            raise FailedPrecondition(str(exc)) from None
        if key is None and not request.unencrypted:
            raise FailedPrecondition(
                "no backup key is configured on the server: set RAG_GRPC_BACKUP_KEY_FILE (or "
                "backup_key_file) to a file of 32 random bytes, or ask for an unencrypted "
                "archive (rag-grpc backup --unencrypted)"
            )
        # Each snapshot holds a copy of the whole data dir on disk: one at a time.
        if self._snapshot_running:
            raise ResourceExhausted(
                "a snapshot of this server is already being taken; wait for it to finish "
                "and try again"
            )
        self._snapshot_running = True
        archive = SnapshotArchive(retriever.snapshot, retriever.store.path.parent, key)
        try:
            await in_thread(self.executor, archive.open)
            while (piece := await in_thread(self.executor, archive.next_piece)) is not None:
                yield admin_pb2.SnapshotChunk(data=piece)
            yield admin_pb2.SnapshotChunk(
                total_bytes=archive.size, sha256=archive.sha256, encrypted=key is not None
            )
        finally:
            # Also when the caller went away: the copy is removed (after the
            # step still running in the pool) before another snapshot may start.
            await in_thread(self.executor, archive.close)
            self._snapshot_running = False

    async def Usage(
        self, request: admin_pb2.UsageRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UsageResponse:
        caller = current_caller()
        access = self.access
        if access is None:
            raise FailedPrecondition("this process keeps no usage")
        wanted = request.tenant or None
        if caller.tenant is not None and wanted not in (None, caller.tenant):
            # Whether that tenant exists is none of this caller's business.
            refusal = PermissionDenied(
                f"an admin of tenant {caller.tenant} may see its own usage only"
            )
            await audit(access, caller, context, "Usage", "denied", detail=str(refusal))
            raise refusal
        tenant = caller.tenant or wanted
        loop = asyncio.get_running_loop()
        try:
            reports = await loop.run_in_executor(None, access.usage_report, tenant)
        except BaseException as exc:
            if caller.tenant is None:
                await audit(
                    access,
                    caller,
                    context,
                    "Usage",
                    outcome_of(exc),
                    detail=wanted or "all tenants",
                )
            raise
        if caller.tenant is None:
            # Another tenant's figures (or all of them): an operator's act.
            await audit(access, caller, context, "Usage", "ok", detail=wanted or "all tenants")
        return admin_pb2.UsageResponse(tenants=[convert.usage_report_to_pb(r) for r in reports])

    async def AuditExport(
        self, request: admin_pb2.AuditExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.AuditRecord]:
        access = self.access
        if access is None or access.audit is None:
            raise FailedPrecondition("this process keeps no audit log")
        log = access.audit
        since = _since(request.since)
        caller = current_caller()
        await audit(access, caller, context, "AuditExport", "ok", detail=request.since)
        loop = asyncio.get_running_loop()
        after = 0
        while True:
            page = await loop.run_in_executor(None, _audit_page, log, since, after)
            for row in page:
                yield convert.audit_record_to_pb(row)
            if len(page) < _AUDIT_PAGE:
                return
            after = page[-1]["seq"]


def _audit_page(log: AuditLog, since: datetime | None, after: int) -> list[dict[str, Any]]:
    return list(log.export(since, after_seq=after, limit=_AUDIT_PAGE))


def _since(text: str) -> datetime | None:
    """An RFC 3339 time with its zone ("" for none)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidArgument(
            "since must be an RFC 3339 time with a zone, e.g. 2026-01-01T00:00:00Z; "
            f"got {text[:64]!r}"
        )
    return moment
