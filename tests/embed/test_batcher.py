"""The embedding cache and micro-batcher, in process and through Embed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.embed.batcher import BatchingEmbedder
from rag_grpc.embed.cache import EmbeddingCache, text_key
from rag_grpc.embed.encoder import EmbedOutput, OnnxEncoder
from rag_grpc.embed.loader import load_encoder
from rag_grpc.errors import ResourceExhausted
from tests.cli.command import cli
from tests.conftest import ServerProcess, ServerThread, make_settings


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> OnnxEncoder:
    settings = make_settings(tmp_path_factory.mktemp("data"))
    return load_encoder(settings.embedding, settings.data_dir)


def test_cache_is_an_lru_bounded_in_bytes() -> None:
    vector = np.ones(384, np.float32)
    one_entry = vector.nbytes + 200
    cache = EmbeddingCache(3 * one_entry)
    keys = [text_key("m", f"text {i}") for i in range(4)]
    for key in keys[:3]:
        cache.put(key, vector, 3)
    assert cache.get(keys[0]) is not None  # now most recently used
    cache.put(keys[3], vector * 2, 3)  # evicts keys[1], the least recently used
    assert cache.get(keys[1]) is None
    assert cache.get(keys[3])[0][0] == 2.0  # type: ignore[index]
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (3, 3 * one_entry)
    assert (stats.hits, stats.misses) == (2, 1) and stats.hit_ratio == pytest.approx(2 / 3)
    stored = cache.get(keys[0])[0]  # type: ignore[index]
    with pytest.raises(ValueError):
        stored[0] = 5.0  # cached vectors are read-only


def test_cache_keys_fold_whitespace_and_separate_models() -> None:
    assert text_key("m", "hello   world\n") == text_key("m", " hello world")
    assert text_key("m", "hello world") != text_key("other-model", "hello world")
    assert text_key("m", "Hello world") != text_key("m", "hello world")


def test_batcher_coalesces_concurrent_requests(encoder: OnnxEncoder) -> None:
    batcher = BatchingEmbedder(
        encoder, max_batch_size=64, max_delay_s=0.05, cache=EmbeddingCache(1 << 20)
    )
    texts = [f"request {i} about topic {i % 5}" for i in range(24)]
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = batcher.embed([texts[i]]).vectors[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = batcher.stats()
    assert stats.texts == len(texts) and stats.batches < len(texts) // 2
    direct = encoder.embed(texts).vectors
    # The batcher's batches differ from this one call's batch, and ONNX
    # Runtime's int8 kernels round differently by batch shape and CPU: on an
    # AMD EPYC a batch of 1, 3 or 5 short texts differs from a batch of 24 by
    # up to 4e-3 per component (cosine 0.9998), while 2, 8 and 24 agree
    # exactly. So: each caller gets its own text's vector (nearest to it of
    # all 24, cosine >= 0.999, the int8 fidelity bound), never a neighbour's.
    similarity = np.stack([results[i] for i in range(len(texts))]) @ direct.T
    for i in range(len(texts)):
        assert int(np.argmax(similarity[i])) == i
        assert similarity[i, i] >= 0.999
    # Repeats come from the cache, in input order, with their token counts.
    again = batcher.embed([texts[3], texts[1], texts[3]])
    assert batcher.stats().texts == len(texts)
    assert np.array_equal(again.vectors, np.stack([results[3], results[1], results[3]]))
    assert again.token_count == int(encoder.embed([texts[3], texts[1], texts[3]]).token_count)
    batcher.close()


class _SlowEncoder:
    """Stands in for the encoder (tested for real above) to hold the queue full."""

    model_id = "slow"
    dimension = 4

    def __init__(self) -> None:
        self.release = threading.Event()

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        self.release.wait(10)
        n = len(texts)
        return EmbedOutput(np.ones((n, 4), np.float32), n, np.ones(n, np.int64))


def test_full_queue_is_refused_and_recovers() -> None:
    slow = _SlowEncoder()
    batcher = BatchingEmbedder(slow, max_batch_size=2, max_delay_s=0, max_queue_texts=4)  # type: ignore[arg-type]
    first = batcher.submit(["a", "b"])
    time.sleep(0.05)  # the worker holds the first batch in the model
    queued = batcher.submit(["c", "d"])
    with pytest.raises(ResourceExhausted, match="queue is full"):
        batcher.submit(["e"])
    slow.release.set()
    assert first.result(5).vectors.shape == (2, 4) and queued.result(5).token_count == 2
    assert batcher.submit(["e"]).result(5).vectors.shape == (1, 4)
    batcher.close()


def test_embed_rpc_and_stats(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(embedding={"max_queue_texts": 300})
    with RagClient(server.target) as client:
        first = client.embed(["the same text", "another text"])
        second = client.embed(["the same text"])
        assert np.allclose(first[0], second[0])
        (model,) = client.stats().models
        with pytest.raises(RpcError) as info:
            client.embed(["x"] * 257)
        assert info.value.code == "INVALID_ARGUMENT" and "at most 256" in info.value.message
    from rag_grpc.pb import admin_pb2, admin_service_pb2_grpc

    with RagClient(server.target) as client:
        stub = admin_service_pb2_grpc.AdminServiceStub(client.channel)
        info_model = stub.Stats(admin_pb2.StatsRequest(), timeout=10).models[0]
    assert info_model.cache_hits >= 1 and info_model.cache_misses >= 2
    assert 0 < info_model.cache_hit_ratio < 1 and info_model.batches >= 1
    assert model == "sentence-transformers/all-MiniLM-L6-v2"
    assert (info_model.provider, info_model.variant) == ("CPUExecutionProvider", "int8")


@pytest.mark.slow
def test_embed_cli(server_process: Callable[..., ServerProcess], tmp_path: Path) -> None:
    proc = server_process()
    out = cli("embed", "first text", "second text", "--target", proc.target)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 384
    assert np.linalg.norm(rows[0]) == pytest.approx(1.0, abs=1e-4)
    lines = tmp_path / "texts.txt"
    lines.write_text("second text\nfirst text\n")
    from_file = cli("embed", "--file", str(lines), "--target", proc.target)
    swapped = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert np.allclose(swapped[0], rows[1], atol=1e-6) and np.allclose(
        swapped[1], rows[0], atol=1e-6
    )
    empty = cli("embed", "", "--target", proc.target)
    assert empty.returncode == 1 and "INVALID_ARGUMENT" in empty.stderr
    assert cli("embed", "--target", proc.target).returncode == 2
    proc.stop()


def test_length_buckets_cut_padding_and_keep_every_text(encoder: OnnxEncoder) -> None:
    from rag_grpc.embed.encoder import _buckets

    lengths = np.array([12] * 20 + [200] * 3 + [13] * 5 + [60] * 10)
    order = np.argsort(lengths, kind="stable")
    buckets = _buckets(order, lengths, batch_size=16)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(lengths)))
    assert all(len(b) <= 16 for b in buckets)
    widths = [(int(lengths[b].min()), int(lengths[b].max())) for b in buckets]
    # Short texts never pad to a long one's width (beyond the 8-text minimum).
    assert all(hi <= 1.3 * lo or len(b) <= 8 for (lo, hi), b in zip(widths, buckets, strict=True))
    assert max(hi for lo, hi in widths if lo <= 13) <= 13
    # Bucketed and one-at-a-time embeddings agree: a text's vector does not
    # depend on the other texts in its batch (int8 included).
    texts = ["short query"] * 3 + ["a much longer passage about many things " * 12] * 2
    together = encoder.embed(texts).vectors
    alone = np.stack([encoder.embed([t]).vectors[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-4)
