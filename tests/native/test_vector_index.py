"""The native core against exact brute force on fresh seeded random data."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def exact(
    space: str, data: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
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


def build(space: str, data: np.ndarray, labels: np.ndarray, **kwargs: Any) -> VectorIndex:
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
    # ef=160: at ef=100 every space sits at 0.950-0.955 on this data (the
    # threads' insertion order varies the graph), too close to the bar.
    found, distances = index.search(queries, k=10, ef=160)
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
    one_labels, _ = index.search(queries[0], k=10, ef=160)  # a single [d] query
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


def test_exact_threshold_per_call_picks_the_plan(labelled) -> None:  # type: ignore[no-untyped-def]
    data, labels, queries = labelled
    allowed = labels[::4]
    mask = np.isin(labels, allowed)
    index = build("l2", data, labels, exact_threshold=0)
    truth, truth_distances = exact("l2", data[mask], labels[mask], queries, 10)
    # A per-call threshold above the allowed count scans them exactly: every
    # distance equals brute force's, whatever the index's own threshold.
    scanned, distances = index.search(
        queries, k=10, ef=10, allowed=allowed, exact_threshold=len(allowed)
    )
    assert recall(scanned, truth) == 1.0
    assert np.allclose(distances, truth_distances, atol=1e-3)
    # Below it, the filtered walk (ef 10: visibly inexact).
    walked, _ = index.search(queries, k=10, ef=10, allowed=allowed, exact_threshold=0)
    assert set(walked.ravel().tolist()) <= set(allowed.tolist())
    assert recall(walked, truth) < 1.0
    with pytest.raises(ValueError, match="exact_threshold"):
        index.search(queries, k=10, allowed=allowed, exact_threshold=-1)


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


@pytest.mark.parametrize("space", ["l2", "cosine"])  # float32 records; int8 codes
def test_concurrent_search_add_delete_stress(space: str) -> None:
    dim = 32
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4000, dim)).astype(np.float32)
    index = VectorIndex(dim, space, max_elements=64, M=12, ef_construction=64)
    assert index.quantized == (space == "cosine")
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
                found, distances = index.search(queries, k=10, ef=50, num_threads=2)
                assert not (set(found.ravel().tolist()) & gone)
                # Vectors met while their add is running get a real distance too.
                assert np.isfinite(distances).all() and (distances >= -1e-3).all()
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


def test_one_file_layout_for_both_record_kinds(tmp_path: Path, labelled) -> None:  # type: ignore[no-untyped-def]
    """Files keep hnswlib's float32 layout whichever way the index held its
    vectors, so either kind loads either file, with the same results."""
    data, labels, queries = labelled
    data = data / np.linalg.norm(data, axis=1, keepdims=True)
    int8, floats = build("ip", data, labels), build("ip", data, labels, quantized=False)
    int8.save(tmp_path / "int8.hnsw")
    floats.save(tmp_path / "floats.hnsw")
    header = struct.Struct("<QQQQQQiIQQQdQ")
    for name in ("int8", "floats"):
        fields = header.unpack_from((tmp_path / f"{name}.hnsw").read_bytes())
        assert fields[3] == 4 + 8 * 16 + 4 * DIM + 8  # float32 records of 48 dims, M=16
    for name, source in (("int8", int8), ("floats", floats)):
        expected = source.search(queries, k=10, ef=64)
        same_kind = VectorIndex.load(tmp_path / f"{name}.hnsw", quantized=source.quantized)
        again = same_kind.search(queries, k=10, ef=64)
        assert (again[0] == expected[0]).all() and np.allclose(again[1], expected[1], atol=1e-6)
        other = VectorIndex.load(tmp_path / f"{name}.hnsw", quantized=not source.quantized)
        truth, _ = exact("ip", data, labels, queries, 10)
        assert other.quantized != source.quantized
        found, distances = other.search(queries, k=10, ef=100)
        assert recall(found, truth) >= recall(source.search(queries, k=10, ef=100)[0], truth) - 0.02
        position = {int(label): i for i, label in enumerate(labels)}
        best = data[[position[int(x)] for x in found[:, 0]]]
        assert np.allclose(distances[:, 0], 1.0 - np.einsum("ij,ij->i", queries, best), atol=1e-5)


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


# -- saved files that lie --------------------------------------------------
#
# A forged index file with a matching meta file (a restored backup archive,
# say) must never crash the process: load() checks the graph itself. Each
# case below damages a real saved index, recomputes the meta file's size and
# checksum so only that check can notice, and loads it in a child process,
# where a crash shows as a signal instead of killing pytest.

FILE_DIM = 8
FILE_M = 8  # small M: more elements on upper levels (1 in 8) to damage
FILE_N = 1500
HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # hnswlib 0.8.0 saveIndex, 96 bytes

LOAD_AND_USE = """
import sys
import numpy as np
from rag_grpc.native import VectorIndex

path, dim = sys.argv[1], int(sys.argv[2])
queries = np.random.default_rng(0).standard_normal((32, dim)).astype(np.float32)
for quantized in (True, False):
    try:
        index = VectorIndex.load(path, quantized=quantized)
    except ValueError as exc:
        print("ValueError:", exc)
        sys.exit(3)
    labels = index.labels()
    index.search(queries, k=10, ef=50)
    index.search(queries, k=10, ef=50, allowed=labels[::3])
    # Writes walk the loaded graph too: new labels, and one replaced.
    index.add(queries[:4], np.arange(10**9, 10**9 + 4))
    index.add(queries[4:5], labels[:1])
    index.search(queries, k=10, ef=50)
print("used", index.max_elements)
"""


@dataclass
class SavedGraph:
    """A saved index's bytes with hnswlib's layout read back from them."""

    data: bytes
    elements: int
    record_bytes: int
    label_offset: int
    links_bytes: int  # one upper-level list: u32 count + maxM ids
    max_level: int
    entry_point: int
    levels: list[int]
    upper: list[int]  # where each element's upper-level lists start

    @classmethod
    def parse(cls, data: bytes) -> SavedGraph:
        fields = HEADER.unpack_from(data)
        elements, record_bytes, label_offset = fields[2], fields[3], fields[4]
        max_level, entry_point, max_m = fields[6], fields[7], fields[8]
        links_bytes = 4 + 4 * max_m
        levels, upper = [], []
        position = HEADER.size + elements * record_bytes
        for _ in range(elements):
            (size,) = struct.unpack_from("<I", data, position)
            levels.append(size // links_bytes)
            upper.append(position + 4)
            position += 4 + size
        assert position == len(data)
        return cls(
            data, elements, record_bytes, label_offset, links_bytes, max_level,
            entry_point, levels, upper,
        )  # fmt: skip

    def record(self, element: int) -> int:
        return HEADER.size + element * self.record_bytes

    def upper_list(self, element: int, level: int) -> int:
        return self.upper[element] + (level - 1) * self.links_bytes

    def count(self, offset: int) -> int:
        return int(struct.unpack_from("<H", self.data, offset)[0])

    def linked(self, level: int) -> int:
        """An element with at least one neighbour at this level."""
        for element in range(self.elements):
            if self.levels[element] >= level:
                offset = self.record(element) if level == 0 else self.upper_list(element, level)
                if self.count(offset):
                    return element
        raise AssertionError(f"no element has links at level {level}")


def put(data: bytearray, offset: int, fmt: str, *values: object) -> bytearray:
    struct.pack_into(fmt, data, offset, *values)
    return data


def header_field(data: bytearray, index: int, value: object) -> bytearray:
    fields = list(HEADER.unpack_from(data))
    fields[index] = value
    HEADER.pack_into(data, 0, *fields)
    return data


def bottom_level_element(g: SavedGraph) -> int:
    return g.levels.index(0)


# Each damage takes the parsed graph and a copy of its bytes and returns the
# forged bytes; DAMAGES pairs it with what the error must say.


def level0_id_past_the_end(g: SavedGraph, d: bytearray) -> bytearray:
    return put(d, g.record(g.linked(0)) + 4, "<I", g.elements)


def level0_count_over_max_m0(g: SavedGraph, d: bytearray) -> bytearray:
    return put(d, g.record(g.linked(0)), "<H", 0xFFFF)


def upper_id_past_the_end(g: SavedGraph, d: bytearray) -> bytearray:
    return put(d, g.upper_list(g.linked(1), 1) + 4, "<I", 2**31)


def upper_count_over_max_m(g: SavedGraph, d: bytearray) -> bytearray:
    return put(d, g.upper_list(g.linked(1), 1), "<H", FILE_M + 1)


def upper_link_to_a_lower_element(g: SavedGraph, d: bytearray) -> bytearray:
    # hnswlib keeps no level-1 list for that element: a NULL pointer.
    return put(d, g.upper_list(g.linked(1), 1) + 4, "<I", bottom_level_element(g))


def level_above_the_top(g: SavedGraph, d: bytearray) -> bytearray:
    # A level-0 element claims top level + 1 levels of empty lists.
    position = g.upper[bottom_level_element(g)] - 4
    size = (g.max_level + 1) * g.links_bytes
    return d[:position] + struct.pack("<I", size) + bytes(size) + d[position + 4 :]


def ragged_link_list_size(g: SavedGraph, d: bytearray) -> bytearray:
    position = g.upper[bottom_level_element(g)] - 4
    return d[:position] + struct.pack("<I", 4) + bytes(4) + d[position + 4 :]


def link_list_size_past_the_end(g: SavedGraph, d: bytearray) -> bytearray:
    # The last element claims one level more, with no bytes left for it.
    assert g.levels[-1] < g.max_level
    return put(d, g.upper[-1] - 4, "<I", (g.levels[-1] + 1) * g.links_bytes)


def entry_point_past_the_end(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 7, g.elements + 100)


def entry_point_below_the_top(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 7, bottom_level_element(g))


def top_level_out_of_range(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 6, 1000)


def more_elements_than_capacity(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 1, g.elements - 1)


def more_elements_than_the_file_holds(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(header_field(d, 1, 2**40), 2, 2**40)


def record_size(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 3, g.record_bytes + 4)


def other_m(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 10, FILE_M * 2)


def level_multiplier(g: SavedGraph, d: bytearray) -> bytearray:
    return header_field(d, 11, float("nan"))


def truncated_body(g: SavedGraph, d: bytearray) -> bytearray:
    return d[:-3]


def header_only(g: SavedGraph, d: bytearray) -> bytearray:
    return d[: HEADER.size]


def shorter_than_a_header(g: SavedGraph, d: bytearray) -> bytearray:
    return d[:50]


def empty(g: SavedGraph, d: bytearray) -> bytearray:
    return bytearray()


def duplicate_labels(g: SavedGraph, d: bytearray) -> bytearray:
    first, second = g.record(0) + g.label_offset, g.record(1) + g.label_offset
    d[second : second + 8] = d[first : first + 8]
    return d


DAMAGES: list[tuple[Callable[[SavedGraph, bytearray], bytearray], str]] = [
    (level0_id_past_the_end, "past the"),
    (level0_count_over_max_m0, "neighbours at level 0"),
    (upper_id_past_the_end, "past the"),
    (upper_count_over_max_m, "neighbours at level 1"),
    (upper_link_to_a_lower_element, "which has no level 1"),
    (level_above_the_top, "whole number of levels"),
    (ragged_link_list_size, "whole number of levels"),
    (link_list_size_past_the_end, "ends inside"),
    (entry_point_past_the_end, "entry point"),
    (entry_point_below_the_top, "not the top level"),
    (top_level_out_of_range, "top level"),
    (more_elements_than_capacity, "exceed the capacity"),
    (more_elements_than_the_file_holds, "do not fit"),
    (record_size, "record layout"),
    (other_m, "link sizes"),
    (level_multiplier, "level multiplier"),
    (truncated_body, "ends inside"),
    (header_only, "do not fit"),
    (shorter_than_a_header, "shorter than"),
    (empty, "shorter than"),
    (duplicate_labels, "stored twice"),
]


@pytest.fixture(scope="module")
def saved_graph(tmp_path_factory: pytest.TempPathFactory) -> SavedGraph:
    data = make_data(21, n=FILE_N, dim=FILE_DIM)
    index = VectorIndex(FILE_DIM, "l2", max_elements=64, M=FILE_M, ef_construction=64)
    # One thread: the test below builds the same graph again and compares.
    index.add(data, np.arange(FILE_N) * 7 + 3, num_threads=1)
    index.delete(np.arange(20) * 7 + 3)  # deletion marks live in the link headers
    path = tmp_path_factory.mktemp("graph") / "vectors.hnsw"
    index.save(path)
    graph = SavedGraph.parse(path.read_bytes())
    assert graph.max_level >= 2 and graph.levels[graph.entry_point] == graph.max_level
    return graph


def write_index(path: Path, data: bytes, meta_from: Path) -> None:
    """Write ``data`` as an index file whose meta file vouches for it."""
    meta = json.loads(Path(f"{meta_from}.meta.json").read_text())
    meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_bytes(data)
    Path(f"{path}.meta.json").write_text(json.dumps(meta))


def load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOAD_AND_USE, str(path), str(FILE_DIM)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def graph_file(saved_graph: SavedGraph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sound") / "vectors.hnsw"
    # The meta file as save() wrote it, for write_index to start from.
    index = VectorIndex(FILE_DIM, "l2", M=FILE_M)
    index.save(path)
    write_index(path, saved_graph.data, path)
    return path


def test_sound_file_loads_and_searches_the_same(graph_file: Path, tmp_path: Path) -> None:
    data = make_data(21, n=FILE_N, dim=FILE_DIM)
    index = VectorIndex(FILE_DIM, "l2", max_elements=64, M=FILE_M, ef_construction=64)
    # Built as saved_graph's was, on one thread: a parallel build's graph
    # depends on how the threads interleave (this failed once under load).
    index.add(data, np.arange(FILE_N) * 7 + 3, num_threads=1)
    index.delete(np.arange(20) * 7 + 3)
    loaded = VectorIndex.load(graph_file)
    queries = make_data(22, n=50, dim=FILE_DIM)
    expected, distances = index.search(queries, k=10, ef=50)
    found, found_distances = loaded.search(queries, k=10, ef=50)
    assert (found == expected).all() and np.allclose(found_distances, distances)
    assert len(loaded) == FILE_N - 20
    child = load_in_child(graph_file)
    assert child.returncode == 0, child.stdout + child.stderr
    # A capacity is not data: a file claiming a huge one loads with room for
    # twice its elements (hnswlib would allocate all of it up front).
    huge = header_field(bytearray(graph_file.read_bytes()), 1, 2**62)
    write_index(tmp_path / "huge.hnsw", bytes(huge), graph_file)
    child = load_in_child(tmp_path / "huge.hnsw")
    assert child.returncode == 0, child.stdout + child.stderr
    assert int(child.stdout.split()[-1]) <= 2 * FILE_N + 1024 + 5


@pytest.mark.parametrize("damage, complaint", DAMAGES, ids=[d[0].__name__ for d in DAMAGES])
def test_damaged_graph_is_refused(
    damage: Callable[[SavedGraph, bytearray], bytearray],
    complaint: str,
    saved_graph: SavedGraph,
    graph_file: Path,
    tmp_path: Path,
) -> None:
    path = tmp_path / "forged.hnsw"
    write_index(path, bytes(damage(saved_graph, bytearray(saved_graph.data))), graph_file)
    child = load_in_child(path)
    assert child.returncode == 3, f"rc {child.returncode}\n{child.stdout}{child.stderr}"
    assert str(path) in child.stdout and complaint in child.stdout, child.stdout


def test_random_damage_never_crashes(
    saved_graph: SavedGraph, graph_file: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("RAG_FUZZ_SEED", "20261130"))
    print(f"fuzz seed {seed} (set RAG_FUZZ_SEED to replay)")
    rng = np.random.default_rng(seed)
    g = saved_graph
    # The bytes that steer a walk: the header, each record's link list and
    # label, the upper-level sizes and lists; vectors only change distances.
    graph = np.zeros(len(g.data), bool)
    graph[: HEADER.size] = True
    records = HEADER.size + np.arange(g.elements) * g.record_bytes
    for field_start, field_end in ((0, 4 + 8 * FILE_M), (g.label_offset, g.record_bytes)):
        graph[(records[:, None] + np.arange(field_start, field_end)).ravel()] = True
    graph[HEADER.size + g.elements * g.record_bytes :] = True
    candidates = np.flatnonzero(graph)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(50):
        data = np.frombuffer(g.data, np.uint8).copy()
        where = rng.choice(candidates, int(rng.integers(1, 9)), replace=False)
        data[where] ^= rng.integers(1, 256, len(where)).astype(np.uint8)
        path = tmp_path / f"fuzz{trial}.hnsw"
        write_index(path, data.tobytes(), graph_file)
        child = load_in_child(path)
        assert child.returncode in (0, 3), (
            f"seed {seed} trial {trial} bytes {where.tolist()}: rc {child.returncode}\n"
            f"{child.stdout}{child.stderr}"
        )
        outcomes["loaded" if child.returncode == 0 else "refused"] += 1
        path.unlink()
    print(outcomes)
    assert outcomes["refused"] > 0  # the damage reached the checks
