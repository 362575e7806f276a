"""Dynamic micro-batching: concurrent embedding requests (Embed calls, text
searches, ingestion) are coalesced into one encoder call on a worker thread,
up to ``max_batch_size`` texts or ``max_delay`` after the first arrives
(a delay of 0 takes just what is already queued). The
encoder sorts each batch by length, so batches pad little. A cache answers
repeated texts without the model; a bound on queued texts turns overload into
RESOURCE_EXHAUSTED instead of unbounded memory."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from rag_grpc.embed.cache import CacheStats, EmbeddingCache, text_key
from rag_grpc.embed.encoder import EmbedOutput, OnnxEncoder
from rag_grpc.errors import ResourceExhausted
from rag_grpc.telemetry import OFF, Recorder

log = logging.getLogger(__name__)


@dataclass
class _Request:
    texts: list[str]
    future: Future[EmbedOutput]


@dataclass(frozen=True)
class BatcherStats:
    """Batches run, texts embedded by the model, texts waiting now."""

    batches: int
    texts: int
    queued_texts: int
    cache: CacheStats


class BatchingEmbedder:
    """An Embedder (``embed`` for threads, ``submit`` for the event loop) that
    batches concurrent requests and caches results."""

    def __init__(
        self,
        encoder: OnnxEncoder,
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue_texts: int = 8192,
        cache: EmbeddingCache | None = None,
        telemetry: Recorder = OFF,
    ) -> None:
        self.encoder = encoder
        # Where batch sizes go: the server's Telemetry, or OFF (tests, tools).
        self.telemetry = telemetry
        self.model_id = encoder.model_id
        self.dimension = encoder.dimension
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_texts = max_queue_texts
        self.cache = cache or EmbeddingCache(0)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        self._batches = 0
        self._embedded = 0
        self._thread = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
        self._thread.start()

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        """Embed from a worker thread (blocks until the batch containing these ran)."""
        return self.submit(texts).result()

    def submit(self, texts: Sequence[str]) -> Future[EmbedOutput]:
        """Queue texts; the future resolves to their vectors in input order.
        Raises ResourceExhausted when the queue is full."""
        keys = [text_key(self.model_id, t) for t in texts]
        cached = [self.cache.get(k) for k in keys]
        missing = [i for i, entry in enumerate(cached) if entry is None]
        result: Future[EmbedOutput] = Future()
        if not missing:
            result.set_result(_assemble(cached, self.dimension))
            return result
        with self._lock:
            if self._queued + len(missing) > self.max_queue_texts:
                raise ResourceExhausted(
                    f"the embedding queue is full ({self._queued} texts waiting, limit "
                    f"{self.max_queue_texts}); retry with backoff"
                )
            self._queued += len(missing)
        inner: Future[EmbedOutput] = Future()

        def finish(done: Future[EmbedOutput]) -> None:
            error = done.exception()
            if error is not None:
                result.set_exception(error)
                return
            out = done.result()
            for row, i in enumerate(missing):
                entry = (out.vectors[row], int(out.token_counts[row]))
                cached[i] = entry
                self.cache.put(keys[i], *entry)
            result.set_result(_assemble(cached, self.dimension))

        inner.add_done_callback(finish)
        self._queue.put(_Request([texts[i] for i in missing], inner))
        return result

    def stats(self) -> BatcherStats:
        """Counters for Stats and metrics."""
        with self._lock:
            return BatcherStats(self._batches, self._embedded, self._queued, self.cache.stats())

    def close(self) -> None:
        """Finish queued work and stop the worker thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.texts)
            deadline = time.monotonic() + self.max_delay_s
            stop = False
            while size < self.max_batch_size:
                wait = deadline - time.monotonic()
                try:
                    # Past the deadline, still take whatever is already queued.
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += len(item.texts)
            self._embed_batch(batch, size)
            if stop:
                return

    def _embed_batch(self, batch: list[_Request], size: int) -> None:
        texts = [t for request in batch for t in request.texts]
        self.telemetry.record("batch_size", size)
        try:
            out = self.encoder.embed(texts)
        except Exception as exc:  # every waiting caller gets the error
            log.exception("embedding a batch of %d texts failed", size)
            for request in batch:
                request.future.set_exception(exc)
            return
        finally:
            with self._lock:
                self._queued -= size
                self._batches += 1
                self._embedded += size
        start = 0
        for request in batch:
            end = start + len(request.texts)
            counts = out.token_counts[start:end]
            request.future.set_result(
                EmbedOutput(out.vectors[start:end], int(counts.sum()), counts)
            )
            start = end


def _assemble(entries: list[tuple[np.ndarray, int] | None], dimension: int) -> EmbedOutput:
    vectors = np.empty((len(entries), dimension), dtype=np.float32)
    counts = np.empty(len(entries), dtype=np.int64)
    for i, entry in enumerate(entries):
        assert entry is not None
        vectors[i], counts[i] = entry
    return EmbedOutput(vectors, int(counts.sum()), counts)
