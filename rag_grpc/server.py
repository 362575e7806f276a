"""Builds and runs the grpc.aio server: the configured services over the
core library, standard health checking, reflection and the interceptor."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.metrics import Observation

from rag_grpc import telemetry
from rag_grpc.backup import default_key_provider
from rag_grpc.config import ConfigError, Settings
from rag_grpc.documents import Document
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.cache import EmbeddingCache
from rag_grpc.embed.chunking import TokenChunker
from rag_grpc.embed.encoder import OnnxEncoder
from rag_grpc.embed.loader import load_encoder
from rag_grpc.flags import FeatureFlags
from rag_grpc.generate.base import Generator
from rag_grpc.generate.extractive import ExtractiveGenerator
from rag_grpc.generate.pipeline import AnswerCache, LocalSearch, RagPipeline, SearchBackend
from rag_grpc.generate.triton import TritonGenerator
from rag_grpc.index.retriever import Retriever
from rag_grpc.index.search import Rescorer
from rag_grpc.index.sizes import NamespaceSizes
from rag_grpc.ingest.backend import IngestionBackend, LocalWrites, WriteBackend
from rag_grpc.ingest.jobs import IngestionManager, JobQueue
from rag_grpc.ingest.nats_log import NatsIngestion
from rag_grpc.pb import (
    SERVICE_FILES,
    admin_service_pb2_grpc,
    embedding_service_pb2_grpc,
    generation_service_pb2_grpc,
    ingestion_service_pb2_grpc,
    rag_service_pb2_grpc,
    retrieval_service_pb2_grpc,
)
from rag_grpc.security.access import AccessControl
from rag_grpc.security.api_keys import ApiKeyConfigError, ApiKeys
from rag_grpc.security.audit import AuditLog
from rag_grpc.security.authn import Authenticator
from rag_grpc.security.jwt_auth import JwtConfigError, JwtSettings, JwtVerifier
from rag_grpc.security.policy import Policy, PolicyError, PolicyHolder
from rag_grpc.security.tls import TlsConfigError, certificate_expiry, server_credentials
from rag_grpc.security.usage import COUNTERS, GAUGES, UsageLedger
from rag_grpc.security.xfcc import TrustedProxies
from rag_grpc.services.admin import AdminServicer
from rag_grpc.services.embedding import EmbeddingServicer
from rag_grpc.services.generation import GenerationServicer
from rag_grpc.services.ingestion import IngestionServicer
from rag_grpc.services.interceptors import ServiceInterceptor
from rag_grpc.services.rag import RagServicer
from rag_grpc.services.remote import RemoteGenerator, RemoteSearch
from rag_grpc.services.retrieval import RetrievalServicer
from rag_grpc.store.sqlite import DocumentStore
from rag_grpc.telemetry import Telemetry

log = logging.getLogger(__name__)

# Tenants named in metric labels; the rest are summed under "_other".
MAX_TENANT_LABELS = 200
USAGE_KINDS = COUNTERS + GAUGES

SERVICE_NAMES = {
    name: SERVICE_FILES[i].DESCRIPTOR.services_by_name[cls].full_name
    for i, (name, cls) in enumerate(
        [
            ("retrieval", "RetrievalService"),
            ("embedding", "EmbeddingService"),
            ("generation", "GenerationService"),
            ("rag", "RagService"),
            ("ingestion", "IngestionService"),
            ("admin", "AdminService"),
        ]
    )
}


@dataclass
class _RemoteDependency:
    """A remote service this process needs, probed through its health service."""

    target: str
    service: str
    channel: grpc.aio.Channel
    dependents: list[str] = field(default_factory=list)


class RagServer:
    """One rag-grpc process: start() binds and serves, stop() drains and saves."""

    def __init__(self, settings: Settings, seed_documents: list[Document] | None = None) -> None:
        self.settings = settings
        self.seed_documents = seed_documents
        self.port = 0
        self.executor = ThreadPoolExecutor(
            max_workers=settings.server.worker_threads, thread_name_prefix="rag-core"
        )
        # Writes, ingestion and admin work (snapshots, forget, compaction) run
        # on their own threads, so they can never take every thread that
        # searches need.
        self.write_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rag-write")
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.store: DocumentStore | None = None
        self.retriever: Retriever | None = None
        self.encoder: OnnxEncoder | None = None
        self.embedder: BatchingEmbedder | None = None
        self.ingestion: IngestionBackend | None = None
        self.writes: WriteBackend | None = None
        self.answer_cache: AnswerCache | None = None
        self.job_queue: JobQueue | None = None
        self.nats: NatsIngestion | None = None
        self._remotes: list[_RemoteDependency] = []
        self._probe_task: asyncio.Task[None] | None = None
        self.triton: TritonGenerator | None = None
        self.telemetry: Telemetry | None = None
        self._triton_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self.access: AccessControl | None = None
        self.audit: AuditLog | None = None
        self.usage: UsageLedger | None = None
        # Read per request; SIGHUP reloads them from the same files.
        self.flags = FeatureFlags.from_settings(settings)

    # -- access ------------------------------------------------------------

    def _build_access(self) -> AccessControl:
        """Identity sources, policy, audit log and usage ledger, checked
        before anything expensive is built; ConfigError names what is wrong."""
        s, auth = self.settings, self.settings.auth
        try:
            policy = PolicyHolder(auth.policy_file) if auth.policy_file else None
            jwt = None
            if auth.jwt_jwks_file is not None:
                assert auth.jwt_issuer and auth.jwt_audience  # checked by the config
                jwt = JwtVerifier(
                    JwtSettings(
                        jwks_file=auth.jwt_jwks_file,
                        issuer=auth.jwt_issuer,
                        audience=auth.jwt_audience,
                        tenant_claim=auth.jwt_tenant_claim,
                    )
                )
            if policy is not None:
                ApiKeys(policy.current.api_keys)  # a bad entry fails the start, not a call
        except (PolicyError, JwtConfigError, ApiKeyConfigError) as exc:
            raise ConfigError(str(exc)) from None
        token = s.server.auth_token.get_secret_value() if s.server.auth_token else None
        authenticator = Authenticator(
            token=token,
            jwt=jwt,
            api_keys=_api_keys_of(policy),
            trusted_proxies=TrustedProxies(
                s.trusted_proxies, trust_unix_socket=auth.trust_unix_socket
            ),
            proxy_identity=auth.proxy_identity,
            client_certificates=s.server.tls_client_ca is not None,
        )
        sources = authenticator.sources
        if not sources and policy is None and not _is_loopback(s.host):
            if not auth.insecure_no_auth:
                raise ConfigError(
                    f"refusing to serve {s.host} without authentication: anyone who can "
                    "reach the port could read, overwrite and erase every document. "
                    "Configure an identity source (auth.policy_file with API keys, "
                    "server.tls_client_ca for mutual TLS, auth.jwt_jwks_file, or "
                    "server.auth_token), bind 127.0.0.1, or set auth.insecure_no_auth "
                    "(--insecure-no-auth) to run open on purpose"
                )
            log.warning(
                "SERVING %s WITHOUT AUTHENTICATION (auth.insecure_no_auth): anyone who "
                "can reach port %d may read, overwrite and erase every document",
                s.host,
                s.port,
            )
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(s.audit_path)
        if policy is not None:
            # A process that follows the NATS write log counts usage through
            # it, so that every replica reports the same totals.
            self.usage = UsageLedger(
                s.usage_path,
                replicated=s.ingestion.queue == "nats" and self._local_retrieval(),
            )
        return AccessControl(
            authenticator,
            policy=policy,
            require_identity=bool(sources),
            audit=self.audit,
            usage=self.usage,
        )

    def reload(self) -> str | None:
        """Reload the policy, JWT keys and feature flags (SIGHUP); the old
        ones stay on error."""
        errors = [
            self.access.reload() if self.access is not None else None,
            self.flags.reload(),
        ]
        return "; ".join(error for error in errors if error) or None

    # -- assembly ----------------------------------------------------------

    def _local_retrieval(self) -> bool:
        """Whether this process keeps a store (and, on NATS, follows the log)."""
        s = self.settings
        return bool(
            set(s.services) & {"retrieval", "ingestion"}
            or ("rag" in s.services and not s.remote.retrieval_target)
        )

    def _build_core(self) -> None:
        s = self.settings
        wanted = set(s.services)
        local_retrieval = self._local_retrieval()
        local_generation = "generation" in wanted or (
            "rag" in wanted and not s.remote.generation_target
        )
        if local_retrieval or local_generation or "embedding" in wanted:
            e = s.embedding
            self.encoder = load_encoder(e, s.data_dir)
            self.embedder = BatchingEmbedder(
                self.encoder,
                max_batch_size=e.max_batch_size,
                max_delay_s=e.max_delay_ms / 1000,
                max_queue_texts=e.max_queue_texts,
                cache=EmbeddingCache(e.cache_bytes),
            )
        if local_retrieval:
            assert self.embedder is not None
            s.data_dir.mkdir(parents=True, exist_ok=True)
            # Copies of snapshots a crash interrupted: nothing reads them again.
            for leftover in s.data_dir.glob(".snapshot-*"):
                log.warning("removing %s, left by an interrupted snapshot", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            self.store = DocumentStore(s.data_dir / "rag.sqlite3")
            assert self.encoder is not None
            chunker = TokenChunker(
                self.encoder.spec.tokenizer,
                s.chunking.chunk_tokens,
                s.chunking.overlap_tokens,
            )
            self.retriever = Retriever(
                self.store,
                self.embedder,
                chunker,
                s.data_dir / "index",
                s.index,
                s.limits,
                retrieval=s.retrieval,
                reranker=self._reranker(),
                rerank=s.rerank,
            )
            if s.ingestion.queue == "nats":
                # Every process with a store follows the shared write log.
                self.nats = NatsIngestion(
                    s.ingestion,
                    self.retriever,
                    self.write_executor,
                    s.limits,
                    worker="ingestion" in wanted,
                )
                self.nats.usage = self.usage
                self.writes = self.nats
            else:
                self.writes = LocalWrites(self.retriever, self.write_executor)

    def _reranker(self) -> Rescorer | None:
        """The configured cross-encoder, loaded (and exported) now so a
        missing file or a wrong hash stops the start, not a search."""
        s = self.settings
        if not s.rerank.configured:
            return None
        from rag_grpc.rerank import load_reranker

        return load_reranker(s.rerank, s.data_dir)

    def _generator(self) -> Generator:
        s = self.settings
        if s.remote.generation_target and "generation" not in s.services:
            channel = self._remote(s.remote.generation_target, "generation", "rag")
            return RemoteGenerator(
                channel, s.remote.generation_target, s.remote.call_timeout_s, self._call_metadata()
            )
        assert self.encoder is not None
        extractive = ExtractiveGenerator(
            self.encoder,
            self.executor,
            embedder=self.embedder,
            sentences=s.generation.extractive_sentences,
            default_max_tokens=s.generation.default_max_tokens,
        )
        if s.generation.generator == "triton":
            self.triton = TritonGenerator(
                s.generation,
                self.encoder.spec.tokenizer,
                fallback=extractive if s.generation.fallback_to_extractive else None,
            )
            return self.triton
        return extractive

    def _search_backend(self) -> SearchBackend:
        s = self.settings
        if self.retriever is not None and not s.remote.retrieval_target:
            return LocalSearch(self.retriever, self.executor)
        assert s.remote.retrieval_target, (
            "rag without local retrieval needs remote.retrieval_target"
        )
        channel = self._remote(s.remote.retrieval_target, "retrieval", "rag")
        return RemoteSearch(
            channel, s.remote.retrieval_target, s.remote.call_timeout_s, self._call_metadata()
        )

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.settings.server.auth_token
        return (("authorization", f"Bearer {token.get_secret_value()}"),) if token else ()

    def _remote(self, target: str, service: str, dependent: str) -> grpc.aio.Channel:
        for remote in self._remotes:
            if remote.target == target and remote.service == service:
                remote.dependents.append(dependent)
                return remote.channel
        channel = grpc.aio.insecure_channel(target, options=self._channel_options())
        self._remotes.append(_RemoteDependency(target, service, channel, [dependent]))
        return channel

    def _channel_options(self) -> list[tuple[str, Any]]:
        srv = self.settings.server
        return [
            ("grpc.max_send_message_length", srv.max_message_bytes),
            ("grpc.max_receive_message_length", srv.max_message_bytes),
            ("grpc.keepalive_time_ms", int(srv.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(srv.keepalive_timeout_s * 1000)),
        ]

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> int:
        """Build everything, bind the port, start serving; return the bound port."""
        s = self.settings
        access = self.access = self._build_access()
        credentials = None
        if s.server.tls_cert is not None and s.server.tls_key is not None:
            try:
                credentials = server_credentials(
                    s.server.tls_cert, s.server.tls_key, s.server.tls_client_ca
                )
            except TlsConfigError as exc:
                raise ConfigError(str(exc)) from None
        self.telemetry = Telemetry(s.telemetry)
        telemetry.install(self.telemetry)
        self.flags.register_metrics(self.telemetry.meter_provider)
        await asyncio.get_running_loop().run_in_executor(self.executor, self._build_core)
        if self.retriever is not None:
            self.retriever.searcher.default_mode_for = self.flags.default_mode(
                s.retrieval.default_mode
            )
        if self.retriever is not None and access.multi_tenant:
            # Tenancy: every write keeps its tenant's sizes current, is
            # admitted against its storage quotas, and counts its embedding.
            writes = self.retriever.writes
            access.sizes = writes.sizes = NamespaceSizes(self.retriever.store)
            access.set_namespaces(self.retriever.store.namespaces)
            writes.admission = access.admit_write
            writes.embedding_listeners.append(access.count_embedding)
        self._register_gauges()
        server = grpc.aio.server(
            interceptors=[
                ServiceInterceptor(
                    access,
                    call_log_sample_ratio=s.logging.call_log_sample_ratio,
                    tls=credentials is not None,
                )
            ],
            options=[
                *self._channel_options(),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=s.server.max_concurrent_rpcs,
        )
        self.server = server
        served: list[str] = []
        generator: Generator | None = None
        for name in s.services:
            served.append(SERVICE_NAMES[name])
        if "retrieval" in s.services:
            assert self.retriever is not None
            retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server(
                RetrievalServicer(self.retriever, self.executor, self._writes(), access), server
            )
        if "embedding" in s.services:
            assert self.embedder is not None
            embedding_service_pb2_grpc.add_EmbeddingServiceServicer_to_server(
                EmbeddingServicer(self.embedder, s.limits, access), server
            )
        if "generation" in s.services or "rag" in s.services:
            generator = self._generator()
        if "generation" in s.services:
            assert generator is not None
            generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
                GenerationServicer(generator, s.limits, access, s.generation.default_max_tokens),
                server,
            )
        if "rag" in s.services:
            assert generator is not None
            answers = s.generation.answer_cache_entries
            answer_cache = self.answer_cache = AnswerCache(answers) if answers else None
            if answer_cache is not None and self.retriever is not None:
                # Forgotten documents leave no answer quoting them behind.
                self.retriever.writes.forget_listeners.append(answer_cache.drop_namespace)
            pipeline = RagPipeline(
                self._search_backend(),
                generator,
                s.limits,
                answer_cache,
                answer_cache_on=functools.partial(self.flags.enabled, "answer_cache"),
            )
            rag_service_pb2_grpc.add_RagServiceServicer_to_server(
                RagServicer(pipeline, access, s.generation.default_max_tokens), server
            )
        if "ingestion" in s.services:
            assert self.retriever is not None
            if self.nats is not None:
                self.ingestion = self.nats
            else:
                self.job_queue = JobQueue(s.data_dir / "rag.sqlite3")
                self.ingestion = IngestionManager(
                    self.job_queue,
                    self.retriever,
                    self.write_executor,
                    s.limits,
                    watch_max_s=s.ingestion.watch_max_s,
                )
            ingestion_service_pb2_grpc.add_IngestionServiceServicer_to_server(
                IngestionServicer(self.ingestion), server
            )
        if "admin" in s.services:
            admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
                AdminServicer(
                    services=served,
                    retriever=self.retriever,
                    embedder=self.embedder,
                    generator_name=generator.name if generator else "",
                    generator_stats=self.triton.stats if self.triton is not None else None,
                    index_config=s.index,
                    executor=self.write_executor,
                    backup_key=default_key_provider(s.backup_key_file),
                    access=access,
                    flags=self.flags,
                ),
                server,
            )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                *served,
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
        for name in served:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.nats is not None:
            self.nats.stall_listeners.append(self._stalled)
            self.nats.start()
        elif self.ingestion is not None:
            self.ingestion.start()
        if self.ingestion is not None:
            await self._seed()
        if self._remotes:
            self._probe_task = asyncio.create_task(self._probe_remotes(), name="remote-probe")
        if self.retriever is not None and s.retention.ttl_s:
            self._sweeper = asyncio.create_task(self._sweep(), name="retention")
        if self.retriever is not None and s.index.save_interval_s:
            self._saver = asyncio.create_task(self._save_periodically(), name="index-saver")
        if self.triton is not None:
            await self._apply_triton_health(await self.triton.probe())
            self._triton_task = asyncio.create_task(self._probe_triton(), name="triton-probe")
        log.info("rag-grpc serving %s on %s:%d", ", ".join(s.services), s.host, self.port)
        return self.port

    def _register_gauges(self) -> None:
        """Observable metrics read at collection time."""
        t = self.telemetry
        assert t is not None
        embedder, retriever = self.embedder, self.retriever
        if embedder is not None:
            t.observe(
                "rag_embed_cache_hit_ratio",
                "Embedding cache hits / lookups since start",
                lambda: [Observation(embedder.stats().cache.hit_ratio)],
            )
            t.observe(
                "rag_embed_queue_texts",
                "Texts waiting for the embedding model",
                lambda: [Observation(embedder.stats().queued_texts)],
            )
        if retriever is not None:
            t.observe(
                "rag_index_vectors",
                "Live vectors per namespace index",
                lambda: [
                    Observation(size, {"namespace": name})
                    for name, size in retriever.index_sizes().items()
                ],
            )

        def lag() -> list[Observation]:
            if self.nats is not None:
                return [Observation(self.nats.pending_documents)]
            queue = self.job_queue
            return [Observation(queue.pending_count())] if queue is not None else []

        t.observe("rag_ingestion_pending_jobs", "Ingestion jobs not finished yet", lag)
        self._register_operations_gauges(t)
        access = self.access
        if access is not None and access.multi_tenant and access.usage is not None:
            self._register_tenant_gauges(t, access)

    def _register_operations_gauges(self, t: Telemetry) -> None:
        """The gauges the operational alerts watch (deploy/prometheus/):
        queue room, index memory and its limit, the write log's lag, the
        generation circuit and the serving certificate's expiry."""
        embedder, retriever, nats = self.embedder, self.retriever, self.nats
        if isinstance(embedder, BatchingEmbedder):
            t.observe(
                "rag_embed_queue_limit_texts",
                "Texts the embedding queue holds before it refuses more (RESOURCE_EXHAUSTED)",
                lambda: [Observation(embedder.max_queue_texts)],
            )
        if retriever is not None:
            t.observe(
                "rag_index_memory_bytes",
                "Memory of the loaded vector indexes (what limits.max_index_bytes bounds)",
                lambda: [Observation(retriever.indexes.memory_bytes())],
            )
            t.observe(
                "rag_index_memory_limit_bytes",
                "limits.max_index_bytes in effect (0: no limit); writes past it are refused",
                lambda: [Observation(retriever.writes.memory_limit)],
            )
        if nats is not None:
            t.observe(
                "rag_write_log_lag",
                "Write log entries this replica knows exist and has not applied yet",
                lambda: [Observation(nats.log_lag)],
            )
            t.observe(
                "rag_write_log_stalled",
                "1 once this replica stopped applying the write log for good (restore it)",
                lambda: [Observation(int(nats.stalled is not None))],
            )

        def circuit() -> list[Observation]:
            # Read at collection: the generator is built after the gauges.
            triton = self.triton
            return [Observation(int(triton.breaker.state == "open"))] if triton else []

        t.observe(
            "rag_generation_circuit_open",
            "1 while the circuit breaker in front of Triton is open (calls refused)",
            circuit,
        )
        cert = self.settings.server.tls_cert
        if cert is not None:
            not_after = certificate_expiry(cert)
            t.observe(
                "rag_tls_certificate_expiry_timestamp_seconds",
                "When the certificate this server presents expires (Unix time)",
                lambda: [Observation(not_after)],
            )

    def _register_tenant_gauges(self, t: Telemetry, access: AccessControl) -> None:
        """Usage per tenant and budget state, labelled by tenant: the tenants
        of the policy only (at most MAX_TENANT_LABELS, the rest summed under
        "_other"), so the label stays bounded whatever callers send."""
        ledger = access.usage
        assert ledger is not None

        def usage() -> list[Observation]:
            observations = []
            labelled: dict[str, dict[str, int]] = {}
            known = set(access.policy.current.tenants) if access.policy else set()
            for tenant, counts in ledger.totals().items():
                if tenant not in known:
                    continue
                label = tenant if len(labelled) < MAX_TENANT_LABELS else "_other"
                summed = labelled.setdefault(label, {})
                for kind in USAGE_KINDS:
                    summed[kind] = summed.get(kind, 0) + getattr(counts, kind)
            for label, summed in labelled.items():
                for kind, value in summed.items():
                    observations.append(Observation(value, {"tenant": label, "kind": kind}))
            return observations

        t.observe(
            "rag_tenant_usage",
            "Usage per tenant since first counted (kind: tokens, searches, asks; stored sizes "
            "as last reported by the Usage RPC)",
            usage,
        )
        t.observe(
            "rag_tenant_budget_reached",
            "1 while a tenant's estimated spend today has reached its daily budget",
            lambda: [
                Observation(int(reached), {"tenant": tenant})
                for tenant, reached in list(access.budget_reached().items())[:MAX_TENANT_LABELS]
            ],
        )

    async def _seed(self) -> None:
        assert self.ingestion is not None and self.store is not None
        if self.seed_documents and not any(c.documents for c in self.store.counts()):
            job_id = await self.ingestion.submit("", self.seed_documents)
            log.info(
                "empty data dir: ingesting %d demo documents as job %s",
                len(self.seed_documents),
                job_id,
            )

    async def _probe_remotes(self) -> None:
        """Turn dependents NOT_SERVING while a remote dependency's health check fails."""
        interval = self.settings.remote.health_probe_interval_s
        while True:
            for remote in self._remotes:
                stub = health_pb2_grpc.HealthStub(remote.channel)
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAMES[remote.service]),
                        timeout=interval,
                    )
                    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    ok = False
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if ok
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for dependent in remote.dependents:
                    await self.health.set(SERVICE_NAMES[dependent], status)
            await asyncio.sleep(interval)

    async def _sweep(self) -> None:
        """Enforce each namespace's time to live."""
        retention = self.settings.retention
        assert self.retriever is not None
        writes = self._writes()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(retention.sweep_interval_s)
            for namespace, ttl in retention.ttl_s.items():
                try:
                    expired = await loop.run_in_executor(
                        self.write_executor, self.retriever.expired, namespace, ttl
                    )
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

    async def _save_periodically(self) -> None:
        """Save indexes written since their last save, every save_interval_s."""
        assert self.retriever is not None
        retriever = self.retriever
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.index.save_interval_s)
            try:
                saved = await loop.run_in_executor(
                    self.write_executor, functools.partial(retriever.save_indexes, True)
                )
                if saved:
                    log.info("saved %d changed indexes", saved)
            except Exception:  # a failed save must not end the saver
                log.exception("saving the indexes failed; retrying at the next interval")

    async def _stalled(self, reason: str) -> None:
        """A replica that can no longer follow the write log serves stale data:
        every service says NOT_SERVING so probes and gateways route around it."""
        for name in [*self.settings.services, ""]:
            service = SERVICE_NAMES[name] if name else ""
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _writes(self) -> WriteBackend:
        assert self.writes is not None, "writes need a local store"
        return self.writes

    async def _probe_triton(self) -> None:
        """Follow Triton's server and model readiness in our health status."""
        assert self.triton is not None
        while True:
            await asyncio.sleep(self.settings.generation.triton.probe_interval_s)
            await self._apply_triton_health(await self.triton.probe())

    async def _apply_triton_health(self, ready: bool) -> None:
        # With the extractive fallback, Ask still answers while Triton is down.
        serving = ready or self.settings.generation.fallback_to_extractive
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("generation", "rag"):
            if name in self.settings.services:
                await self.health.set(SERVICE_NAMES[name], status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace
        period, then stop the worker and save the indexes."""
        grace = self.settings.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._probe_task:
            self._probe_task.cancel()
        if self._triton_task:
            self._triton_task.cancel()
        if self._sweeper:
            self._sweeper.cancel()
        if self._saver:
            self._saver.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        if self.ingestion is not None:
            await self.ingestion.stop()
        if self.nats is not None and self.nats is not self.ingestion:
            await self.nats.stop()
        for remote in self._remotes:
            await remote.channel.close(None)
        if self.triton is not None:
            await self.triton.close()
        loop = asyncio.get_running_loop()
        # Core work already running on the pool (an ingestion batch whose task
        # was cancelled, say) finishes before anything it uses is closed.
        # Queued work that has not started is dropped (it is durable where it
        # matters: a job resumes, a caller already got its status).
        await loop.run_in_executor(
            None, functools.partial(self.executor.shutdown, True, cancel_futures=True)
        )
        await loop.run_in_executor(
            None, functools.partial(self.write_executor.shutdown, True, cancel_futures=True)
        )
        if self.retriever is not None:
            await loop.run_in_executor(None, self.retriever.save_indexes)
        if self.embedder is not None:
            self.embedder.close()
        if self.job_queue is not None:
            self.job_queue.close()
        if self.store is not None:
            self.store.close()
        if self.usage is not None:
            self.usage.close()
        if self.audit is not None:
            self.audit.close()
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


def _is_loopback(host: str) -> bool:
    """Whether binding host serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def _api_keys_of(policy: PolicyHolder | None) -> Callable[[], ApiKeys | None]:
    """The API keys of the policy in force, rebuilt only when it is reloaded."""
    built: dict[int, tuple[Policy, ApiKeys | None]] = {}

    def current() -> ApiKeys | None:
        if policy is None:
            return None
        now = policy.current
        cached = built.get(id(now))
        if cached is None or cached[0] is not now:
            built.clear()
            cached = (now, ApiKeys(now.api_keys) if now.api_keys else None)
            built[id(now)] = cached
        return cached[1]

    return current
