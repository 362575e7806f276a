"""The native core against exact brute force on fresh seeded random data."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.native import MISSING_LABEL, VectorIndex

DIM = 48
N = 6000


def make_data(seed: int, n: int = N, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Clustered, like real embeddings, rather than uniform noise.
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    data = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return data.astype(np.float32)


def exact(space: str, data: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int):
    if space == "l2":
        dist = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    else:
        if space == "cosine":
            data = data / np.linalg.norm(data, axis=1, keepdims=True)
            queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        dist = 1.0 - queries @ data.T
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return labels[order], np.take_along_axis(dist, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def build(space: str, data: np.ndarray, labels: np.ndarray, **kwargs: int) -> VectorIndex:
    index = VectorIndex(DIM, space, max_elements=256, M=16, ef_construction=100, **kwargs)
    index.add(data, labels)
    return index


@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = make_data(11)
    labels = np.random.default_rng(12).choice(10**12, N, replace=False).astype(np.uint64)
    queries = make_data(13, n=200)
    return data, labels, queries


@pytest.mark.parametrize("space", ["ip", "l2", "cosine"])
def test_recall_against_brute_force(space: str, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    if space == "ip":  # inner product on unit vectors, as the retriever uses it
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index = build(space, data, labels)
    assert len(index) == N and index.max_elements >= N
    found, distances = index.search(queries, k=10, ef=100)
    truth, truth_dist = exact(space, data, labels, queries, 10)
    assert found.dtype == np.uint64 and distances.dtype == np.float32
    assert recall(found, truth) >= 0.95
    assert np.all(np.diff(distances, axis=1) >= -1e-5)  # best first
    # Reported distances are the true ones, in hnswlib's convention for the space.
    position = {int(label): i for i, label in enumerate(labels)}
    for row in range(len(queries)):
        _, own = exact(
            space,
            data[[position[int(x)] for x in found[row]]],
            found[row],
            queries[row : row + 1],
            10,
        )
        assert np.allclose(np.sort(distances[row]), own[0], atol=1e-4)
    assert recall(found[:, :1], truth[:, :1]) >= 0.9 and truth_dist.shape == (200, 10)
    one_labels, _ = index.search(queries[0], k=10, ef=100)  # a single [d] query
    assert one_labels.shape == (1, 10) and (one_labels[0] == found[0]).all()


@pytest.mark.parametrize("selectivity", [0.5, 0.1, 0.01, 0.001])
def test_filtered_recall(selectivity: float, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    rng = np.random.default_rng(int(selectivity * 1000))
    allowed = rng.choice(labels, max(1, int(N * selectivity)), replace=False)
    mask = np.isin(labels, allowed)
    # Exact scan below 100 allowed vectors, the graph walk with the filter above.
    index = build("l2", data, labels, exact_threshold=100)
    k = 10
    found, distances = index.search(queries, k=k, ef=100, allowed=allowed)
    truth, _ = exact("l2", data[mask], labels[mask], queries, min(k, int(mask.sum())))
    real = found[:, : truth.shape[1]]
    assert set(real.ravel().tolist()) <= set(allowed.tolist())
    assert recall(real, truth) >= (0.95 if len(allowed) > 100 else 1.0)
    if len(allowed) < k:
        assert (found[:, len(allowed) :] == MISSING_LABEL).all()
        assert np.isinf(distances[:, len(allowed) :]).all()


def test_int8_walk_matches_the_float_walk(labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    data = data / np.linalg.norm(data, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    int8 = build("ip", data, labels)
    floats = VectorIndex(DIM, "ip", max_elements=256, ef_construction=100, quantized=False)
    floats.add(data, labels)
    assert int8.quantized and not floats.quantized
    assert not VectorIndex(DIM, "l2").quantized  # l2 keeps the float walk
    truth, _ = exact("ip", data, labels, queries, 10)
    found, distances = int8.search(queries, k=10, ef=100)
    assert recall(found, truth) >= recall(floats.search(queries, k=10, ef=100)[0], truth) - 0.02
    # The distances returned are exact ones, not the int8 estimates.
    position = {int(label): i for i, label in enumerate(labels)}
    best = data[[position[int(x)] for x in found[:, 0]]]
    assert np.allclose(distances[:, 0], 1.0 - np.einsum("ij,ij->i", queries, best), atol=1e-5)


def test_deletes_and_replacements(labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    index = build("l2", data, labels)
    gone = labels[:500]
    assert index.delete(gone) == 500
    assert index.delete(gone[:10]) == 0  # already deleted: ignored
    assert index.delete(np.array([12345], np.uint64)) == 0  # unknown: ignored
    assert len(index) == N - 500
    found, _ = index.search(queries, k=20, ef=100)
    assert not set(found.ravel().tolist()) & set(gone.tolist())
    truth, _ = exact("l2", data[500:], labels[500:], queries, 10)
    assert recall(found[:, :10], truth) >= 0.95

    # Replace: label 600 moves onto query 0; a deleted label comes back.
    index.add(queries[:1], labels[600:601])
    index.add(queries[1:2], labels[:1])
    found, distances = index.search(queries[:2], k=1, ef=100)
    assert found[:, 0].tolist() == [labels[600], labels[0]]
    assert np.allclose(distances[:, 0], 0, atol=1e-4)
    assert len(index) == N - 499
    assert set(index.labels().tolist()) == set(labels[500:].tolist()) | {int(labels[0])}


def test_save_and_load_round_trip(tmp_path: Path, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    index = build("cosine", data, labels)
    index.delete(labels[:10])
    path = tmp_path / "vectors.hnsw"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert (loaded.dim, loaded.space, loaded.M, len(loaded)) == (DIM, "cosine", 16, N - 10)
    a = index.search(queries, k=10, ef=64)
    b = loaded.search(queries, k=10, ef=64)
    assert (a[0] == b[0]).all() and np.allclose(a[1], b[1])
    loaded.add(data[:1], np.array([7], np.uint64))  # a loaded index keeps growing
    assert len(loaded) == N - 9

    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="truncated"):
        VectorIndex.load(path)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged"):
        VectorIndex.load(path)
    with pytest.raises(ValueError, match="missing"):
        VectorIndex.load(tmp_path / "nothing.hnsw")
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_arguments() -> None:
    index = VectorIndex(4, "ip")
    vectors = np.eye(4, dtype=np.float32)
    index.add(vectors, np.arange(4))
    cases = [
        (ValueError, lambda: VectorIndex(4, "hamming")),
        (ValueError, lambda: VectorIndex(0)),
        (TypeError, lambda: index.add(vectors.astype(np.int32), np.arange(4))),
        (TypeError, lambda: index.add(vectors, np.array(["a", "b", "c", "d"]))),
        (TypeError, lambda: index.search(np.array([["a"] * 4]))),
        (ValueError, lambda: index.add(vectors, np.arange(3))),
        (ValueError, lambda: index.add(vectors[:, :3], np.arange(4))),
        (ValueError, lambda: index.add(vectors, np.array([1, 1, 2, 3]))),
        (ValueError, lambda: index.add(vectors, np.array([-1, 1, 2, 3]))),
        (ValueError, lambda: index.add(np.full((1, 4), np.nan, np.float32), [9])),
        (ValueError, lambda: index.search(vectors, k=0)),
        (ValueError, lambda: index.search(vectors, ef=0)),
        (ValueError, lambda: index.search(np.ones((2, 5), np.float32))),
        (ValueError, lambda: index.search(vectors, allowed=np.array([[1, 2]]))),
        (ValueError, lambda: index.resize(2)),
        (ValueError, lambda: index.search(vectors, num_threads=-1)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
    assert len(index) == 4
    assert index.search(vectors, k=1)[0][:, 0].tolist() == [0, 1, 2, 3]
    index.resize(1000)
    assert index.max_elements == 1000


def test_concurrent_search_add_delete_stress() -> None:
    dim = 32
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4000, dim)).astype(np.float32)
    index = VectorIndex(dim, "l2", max_elements=64, M=12, ef_construction=64)
    index.add(base[:2000], np.arange(2000))
    errors: list[BaseException] = []
    deleted: set[int] = set()
    deleted_lock = threading.Lock()
    stop = threading.Event()
    searches: list[int] = []

    def searcher(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                with deleted_lock:
                    gone = set(deleted)  # deletes that returned before this search began
                queries = base[r.integers(0, 2000, 16)]
                found, _ = index.search(queries, k=10, ef=50, num_threads=2)
                assert not (set(found.ravel().tolist()) & gone)
                searches.append(len(queries))
        except BaseException as exc:
            errors.append(exc)

    def writer(offset: int) -> None:
        try:
            for start in range(2000 + offset, 4000, 40):
                index.add(base[start : start + 20], np.arange(start, start + 20))
                victims = np.arange(start - 2000, start - 1990, dtype=np.uint64)
                index.delete(victims)
                with deleted_lock:
                    deleted.update(victims.tolist())
                # Replacements: existing labels get new vectors.
                index.add(base[start : start + 5] + 0.01, np.arange(start, start + 5))
        except BaseException as exc:
            errors.append(exc)

    searchers = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    writers = [threading.Thread(target=writer, args=(o,)) for o in (0, 20)]
    for t in searchers + writers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    stop.set()
    for t in searchers:
        t.join(timeout=60)
    assert not errors, errors[:3]
    live = index.labels()
    assert not set(live.tolist()) & deleted
    assert len(index) == len(live) == 4000 - len(deleted)
    assert len(deleted) == 1000 and sum(searches) >= 1000
    # Recall intact after the churn.
    kept = np.array(sorted(set(range(4000)) - deleted))
    queries = base[kept[:100]] + 0.001
    found, _ = index.search(queries, k=1, ef=64)
    assert (found[:, 0] == kept[:100]).mean() >= 0.97
