"""The grpc.aio server of one process: the services the settings choose,
registered from the service registry over the assembled components, standard
health checking, reflection and the interceptor; start, drain and stop."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rag_grpc import telemetry
from rag_grpc.config import ConfigError, Settings
from rag_grpc.documents import Document
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.encoder import OnnxEncoder
from rag_grpc.flags import FeatureFlags
from rag_grpc.generate.pipeline import AnswerCache
from rag_grpc.generate.triton import TritonGenerator
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.sizes import NamespaceSizes
from rag_grpc.ingest.backend import IngestionBackend, WriteBackend
from rag_grpc.ingest.jobs import JobQueue
from rag_grpc.ingest.nats_log import NatsIngestion
from rag_grpc.security.access import AccessControl
from rag_grpc.security.audit import AuditLog
from rag_grpc.security.tls import TlsConfigError, server_credentials
from rag_grpc.security.usage import UsageLedger
from rag_grpc.server import probes
from rag_grpc.server.access import build_access
from rag_grpc.server.assembly import Components, channel_options, local_retrieval
from rag_grpc.server.gauges import register_gauges
from rag_grpc.services.interceptors import ServiceInterceptor
from rag_grpc.services.registry import SERVICES
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import Telemetry

log = logging.getLogger(__name__)


class RagServer:
    """One rag-grpc process: start() binds and serves, stop() drains and saves."""

    def __init__(self, settings: Settings, seed_documents: list[Document] | None = None) -> None:
        self.settings = settings
        self.seed_documents = seed_documents
        self.port = 0
        self.components = Components(settings)
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.telemetry: Telemetry | None = None
        self._background = probes.BackgroundTasks()

    # The components, as the tests and tools reach them through the server.
    @property
    def flags(self) -> FeatureFlags:
        return self.components.flags

    @property
    def access(self) -> AccessControl | None:
        return self.components.access

    @property
    def audit(self) -> AuditLog | None:
        return self.components.audit

    @property
    def usage(self) -> UsageLedger | None:
        return self.components.usage

    @property
    def store(self) -> DocumentStore | None:
        return self.components.store

    @property
    def retriever(self) -> Retriever | None:
        return self.components.retriever

    @property
    def encoder(self) -> OnnxEncoder | None:
        return self.components.encoder

    @property
    def embedder(self) -> BatchingEmbedder | None:
        return self.components.embedder

    @property
    def writes(self) -> WriteBackend | None:
        return self.components.writes

    @property
    def nats(self) -> NatsIngestion | None:
        return self.components.nats

    @property
    def triton(self) -> TritonGenerator | None:
        return self.components.triton

    @property
    def answer_cache(self) -> AnswerCache | None:
        return self.components.answer_cache

    @property
    def job_queue(self) -> JobQueue | None:
        return self.components.job_queue

    @property
    def ingestion(self) -> IngestionBackend | None:
        return self.components.ingestion

    def reload(self) -> str | None:
        """Reload the policy, JWT keys and feature flags (SIGHUP); the old
        ones stay on error."""
        errors = [
            self.access.reload() if self.access is not None else None,
            self.flags.reload(),
        ]
        return "; ".join(error for error in errors if error) or None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> int:
        """Build everything, bind the port, start serving; return the bound port."""
        s, parts = self.settings, self.components
        built = build_access(s, local_retrieval(s))
        access = parts.access = built.control
        parts.audit, parts.usage = built.audit, built.usage
        credentials = None
        if s.server.tls_cert is not None and s.server.tls_key is not None:
            try:
                credentials = server_credentials(
                    s.server.tls_cert, s.server.tls_key, s.server.tls_client_ca
                )
            except TlsConfigError as exc:
                raise ConfigError(str(exc)) from None
        self.telemetry = parts.telemetry = Telemetry(s.telemetry)
        # The components built below record into parts.telemetry; the
        # servicers and interceptors at the edge, through the module functions.
        telemetry.install(self.telemetry)
        self.flags.register_metrics(self.telemetry.meter_provider)
        await asyncio.get_running_loop().run_in_executor(parts.executor, parts.build_core)
        retriever = parts.retriever
        if retriever is not None:
            retriever.searcher.default_mode_for = self.flags.default_mode(s.retrieval.default_mode)
        if retriever is not None and access.multi_tenant:
            # Tenancy: every write keeps its tenant's sizes current, is
            # admitted against its storage quotas, and counts its embedding.
            writes = retriever.writes
            access.sizes = writes.sizes = NamespaceSizes(retriever.store)
            access.set_namespaces(retriever.store.namespaces)
            writes.admission = access.admit_write
            writes.embedding_listeners.append(access.count_embedding)
        register_gauges(self.telemetry, parts)
        server = grpc.aio.server(
            interceptors=[
                ServiceInterceptor(
                    access,
                    call_log_sample_ratio=s.logging.call_log_sample_ratio,
                    tls=credentials is not None,
                )
            ],
            options=[
                *channel_options(s.server),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=s.server.max_concurrent_rpcs,
        )
        self.server = server
        parts.build_serving()
        entries = [SERVICES[name] for name in s.services]
        for entry in entries:
            entry.add_to_server(entry.servicer(parts), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                *(entry.full_name for entry in entries),
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address = f"{s.host}:{s.port}"
        if credentials is not None:
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {s.host}:{s.port}")
        await server.start()
        for entry in entries:
            await self.health.set(entry.health_name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._start_background()
        log.info("rag-grpc serving %s on %s:%d", ", ".join(s.services), s.host, self.port)
        return self.port

    async def _start_background(self) -> None:
        """Ingestion, the demo seed, and the loops of probes.py."""
        s, parts, health = self.settings, self.components, self.health
        if parts.nats is not None:
            parts.nats.stall_listeners.append(
                functools.partial(probes.mark_stalled, health, s.services)
            )
            parts.nats.start()
        elif parts.ingestion is not None:
            parts.ingestion.start()
        if parts.ingestion is not None:
            await self._seed()
        background = self._background
        if parts.remotes:
            background.start(
                probes.probe_remotes(parts.remotes, health, s.remote.health_probe_interval_s),
                "remote-probe",
            )
        if parts.retriever is not None and s.retention.ttl_s:
            background.start(
                probes.sweep_retention(
                    s, parts.retriever, parts.local_writes(), parts.write_executor
                ),
                "retention",
            )
        if parts.retriever is not None and s.index.save_interval_s:
            background.start(
                probes.save_periodically(
                    parts.retriever, s.index.save_interval_s, parts.write_executor
                ),
                "index-saver",
            )
        if parts.triton is not None:
            await probes.apply_triton_health(await parts.triton.probe(), health, s)
            background.start(probes.probe_triton(parts.triton, health, s), "triton-probe")

    async def _seed(self) -> None:
        parts = self.components
        assert parts.ingestion is not None and parts.store is not None
        if self.seed_documents and not any(c.documents for c in parts.store.counts()):
            job_id = await parts.ingestion.submit("", self.seed_documents)
            log.info(
                "empty data dir: ingesting %d demo documents as job %s",
                len(self.seed_documents),
                job_id,
            )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace
        period, then stop the worker and save the indexes."""
        parts = self.components
        grace = self.settings.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self._background.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        if parts.ingestion is not None:
            await parts.ingestion.stop()
        if parts.nats is not None and parts.nats is not parts.ingestion:
            await parts.nats.stop()
        for remote in parts.remotes:
            await remote.channel.close(None)
        if parts.triton is not None:
            await parts.triton.close()
        loop = asyncio.get_running_loop()
        # Core work already running on the pool (an ingestion batch whose task
        # was cancelled, say) finishes before anything it uses is closed.
        # Queued work that has not started is dropped (it is durable where it
        # matters: a job resumes, a caller already got its status).
        await loop.run_in_executor(
            None, functools.partial(parts.executor.shutdown, True, cancel_futures=True)
        )
        await loop.run_in_executor(
            None, functools.partial(parts.write_executor.shutdown, True, cancel_futures=True)
        )
        if parts.retriever is not None:
            await loop.run_in_executor(None, parts.retriever.save_indexes)
        if parts.embedder is not None:
            parts.embedder.close()
        if parts.job_queue is not None:
            parts.job_queue.close()
        if parts.store is not None:
            parts.store.close()
        if parts.usage is not None:
            parts.usage.close()
        if parts.audit is not None:
            parts.audit.close()
        if self.telemetry is not None:
            if telemetry.current() is self.telemetry:
                telemetry.install(None)
            self.telemetry.shutdown()
        log.info("rag-grpc stopped")


async def serve(settings: Settings, seed_documents: list[Document] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RagServer(settings, seed_documents)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The policy (and JWT keys) are reloaded without a restart; a broken
    # file keeps the previous one in force and says why in the log.
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    print(f"rag-grpc listening on {settings.host}:{server.port}", flush=True)
    await stop.wait()
    log.info(
        "signal received: draining in-flight calls (grace %.1f s)", settings.server.grace_period_s
    )
    await server.stop()
