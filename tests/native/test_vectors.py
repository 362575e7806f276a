"""Where a quantized index keeps its vectors (native/vectors.h): int8 codes in
the graph, float32 copies memory-mapped from the saved file, read by re-rank,
filters and the exact scan, and released with the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rag_grpc.native import VectorIndex
from tests.native.brute_force import DIM, N, build, exact, recall


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


def test_quantized_vectors_leave_ram_when_saved(tmp_path: Path, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    index = build("cosine", data, labels)
    floats = build("cosine", data, labels, quantized=False)
    in_ram = index.memory_bytes
    # Before a save the float32 copies are in RAM beside the int8 records.
    assert in_ram > N * DIM * 4
    before = index.search(queries, k=10, ef=64)
    path = tmp_path / "vectors.hnsw"
    index.save(path)
    # Now they are read from the saved file: the RAM left is the graph with
    # int8 records, well under the float32 index's.
    assert index.memory_bytes <= in_ram - N * DIM * 4
    # int8 records (DIM + 4 bytes of vector) instead of float32 ones. (Not to
    # the byte: the two builds' upper levels differ a little, by thread timing.)
    assert floats.memory_bytes - index.memory_bytes >= 0.95 * N * (DIM * 4 - DIM - 4)
    assert str(path) in maps()
    after = index.search(queries, k=10, ef=64)
    assert (before[0] == after[0]).all() and np.array_equal(before[1], after[1])

    # Writes after the save: a new label goes to RAM, a replaced one too
    # (a private copy of the file's page); the saved file does not change.
    saved = path.read_bytes()
    mapped = index.memory_bytes
    index.add(queries[:1], np.array([7], np.uint64))
    index.add(queries[1:2], labels[5:6])
    assert path.read_bytes() == saved
    found, distances = index.search(queries[:2], k=1, ef=64)
    assert found[:, 0].tolist() == [7, labels[5]] and np.allclose(distances, 0, atol=1e-5)
    assert index.memory_bytes >= mapped + 2 * DIM * 4
    index.save(path)  # maps the new file; the old one is released
    loaded = VectorIndex.load(path)
    assert loaded.quantized and len(loaded) == N + 1
    a, b = index.search(queries, k=10, ef=64), loaded.search(queries, k=10, ef=64)
    assert (a[0] == b[0]).all() and np.allclose(a[1], b[1], atol=1e-6)


def test_save_without_remap_keeps_vectors_in_ram(tmp_path: Path, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    index = build("ip", data, labels)
    in_ram = index.memory_bytes
    index.save(tmp_path / "copy.hnsw", remap=False)
    assert index.memory_bytes == in_ram and str(tmp_path / "copy.hnsw") not in maps()
    (tmp_path / "copy.hnsw").unlink()  # a copy moved away: the index does not notice
    assert (index.search(queries, k=5)[0] == index.search(queries, k=5)[0]).all()


def test_filters_and_exact_scan_read_the_mapped_vectors(tmp_path: Path, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    data = data / np.linalg.norm(data, axis=1, keepdims=True)
    index = build("ip", data, labels, exact_threshold=100)
    index.save(tmp_path / "vectors.hnsw")
    loaded = VectorIndex.load(tmp_path / "vectors.hnsw", exact_threshold=100)
    rng = np.random.default_rng(3)
    for size in (50, 2000):  # exact scan, then the filtered walk
        allowed = rng.choice(labels, size, replace=False)
        mask = np.isin(labels, allowed)
        truth, truth_dist = exact("ip", data[mask], labels[mask], queries, 10)
        for source in (index, loaded):
            found, distances = source.search(queries, k=10, ef=100, allowed=allowed)
            assert set(found.ravel().tolist()) <= set(allowed.tolist())
            assert recall(found, truth) >= (1.0 if size <= 100 else 0.95)
            if size <= 100:  # exact float32 distances, from the file
                assert np.allclose(distances, truth_dist, atol=1e-5)


def test_dropped_index_releases_its_mapping(tmp_path: Path, labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, _ = labelled
    path = tmp_path / "vectors.hnsw"
    build("ip", data, labels).save(path)
    loaded = VectorIndex.load(path)
    assert str(path) in maps()
    # Compaction: a new index from the live half, saved over the old file.
    compacted = build("ip", data[::2], labels[::2])
    compacted.save(path)
    assert maps().count(str(path)) == 2  # the old file (deleted) and the new one
    del loaded
    # (Only this test's file: other tests' servers in this process may still
    # hold mappings of their own until they are collected.)
    mine = [line for line in maps().splitlines() if str(path) in line]
    assert len(mine) == 1 and "(deleted)" not in mine[0]
    del compacted
    assert str(path) not in maps()


def maps() -> str:
    """The files this process has mapped, one line per mapping."""
    return Path("/proc/self/maps").read_text()
