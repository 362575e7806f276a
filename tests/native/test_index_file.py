"""Saved index files (native/index_file.h): a round trip, one layout for both
record kinds, and forged files refused without crashing the process. One
file past 400 lines: most of it is the table of 21 forged-file damages, each a
few lines, applied to the one graph the module saves and parses once."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rag_grpc.native import VectorIndex
from tests.native.brute_force import DIM, N, build, exact, make_data, recall


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
