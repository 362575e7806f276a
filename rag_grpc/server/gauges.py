"""The observable gauges of one process, read at collection time: caches,
queues, index memory, the write log, the generation circuit, the serving
certificate and, with tenants, usage and budgets per tenant."""

from __future__ import annotations

from opentelemetry.metrics import Observation

from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.security.access import AccessControl
from rag_grpc.security.tls import certificate_expiry
from rag_grpc.security.usage import COUNTERS, GAUGES
from rag_grpc.server.assembly import Components
from rag_grpc.telemetry import Telemetry

# Tenants named in metric labels; the rest are summed under "_other".
MAX_TENANT_LABELS = 200
USAGE_KINDS = COUNTERS + GAUGES


def register_gauges(t: Telemetry, parts: Components) -> None:
    """Observable metrics read at collection time."""
    embedder, retriever = parts.embedder, parts.retriever
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
        # Read at collection: the job queue is built after the gauges.
        if parts.nats is not None:
            return [Observation(parts.nats.pending_documents)]
        queue = parts.job_queue
        return [Observation(queue.pending_count())] if queue is not None else []

    t.observe("rag_ingestion_pending_jobs", "Ingestion jobs not finished yet", lag)
    _register_operations_gauges(t, parts)
    access = parts.access
    if access is not None and access.multi_tenant and access.usage is not None:
        _register_tenant_gauges(t, access)


def _register_operations_gauges(t: Telemetry, parts: Components) -> None:
    """The gauges the operational alerts watch (deploy/prometheus/):
    queue room, index memory and its limit, the write log's lag, the
    generation circuit and the serving certificate's expiry."""
    embedder, retriever, nats = parts.embedder, parts.retriever, parts.nats
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
        triton = parts.triton
        return [Observation(int(triton.breaker.state == "open"))] if triton else []

    t.observe(
        "rag_generation_circuit_open",
        "1 while the circuit breaker in front of Triton is open (calls refused)",
        circuit,
    )
    cert = parts.settings.server.tls_cert
    if cert is not None:
        not_after = certificate_expiry(cert)
        t.observe(
            "rag_tls_certificate_expiry_timestamp_seconds",
            "When the certificate this server presents expires (Unix time)",
            lambda: [Observation(not_after)],
        )


def _register_tenant_gauges(t: Telemetry, access: AccessControl) -> None:
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
