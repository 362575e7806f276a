# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# distutils: language = c++
"""VectorIndex: hnswlib's HNSW graph behind a Python class whose batch
operations run without the GIL on native threads.

Arguments are validated and made contiguous here, in Python; the work itself
happens in rag_native.h. Searches and adds share a reader lock (hnswlib's
add and search are safe together); resize and save take the writer lock.

A quantized index (the default for ip and cosine) keeps int8 codes in the
graph's records and its float32 vectors outside RAM where it can: in the
saved index file, memory-mapped, read only to re-rank each walk's beam
(vectors.h says why and how).

One file: a Cython extension compiles to one Python module
(rag_grpc.native._vector_index), and the class and its helpers share
nogil cdef functions and the C++ types from core.pxd, which a second .pyx
could only reach through another compiled module and its own .pxd. The
class is most of it; the helpers below it (file metadata and checks, the
finiteness test) serve only it.
"""

import hashlib
import json
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from cython.operator cimport dereference as deref
from libc.stdint cimport uint64_t
from libcpp.string cimport string
from libcpp.vector cimport vector

from core cimport (
    FloatStore,
    HierarchicalNSW,
    IndexFileSummary,
    InnerProductSpace,
    Int8Space,
    L2Space,
    SpaceInterface,
    add_batch,
    advise_huge_pages,
    check_index_file,
    default_threads,
    delete_labels,
    live_labels,
    load_graph,
    malloc_trim,
    map_file_vectors,
    memory_bytes,
    save_graph,
    search_batch,
    shared_mutex,
)

SPACES = ("ip", "l2", "cosine")
MISSING_LABEL = np.uint64(2**64 - 1)
FORMAT = "rag-grpc-hnsw-1"
# Filters allowing at most this many labels are answered by exact scan.
# Measured on the benchmark machine (bench/RESULTS.md): below it the scan is
# faster than the filtered graph walk and has recall 1.0.
DEFAULT_EXACT_THRESHOLD = 12_000
# A loaded index gets at most this much spare capacity, whatever its file
# claims (hnswlib allocates the whole capacity up front); add() grows it.
LOADED_SPARE_CAPACITY = 1024
# Sizes a meta file may state; beyond them the arithmetic on the graph's
# record sizes could overflow (and no model has such embeddings).
MAX_DIM = 1 << 16


cdef class VectorIndex:
    """An HNSW index over float32 vectors with arbitrary uint64 labels.

    space: "ip" (distance 1 - dot), "l2" (squared euclidean) or "cosine"
    (vectors normalised on the way in, distance 1 - cosine).
    quantized: walk the graph on int8 codes and keep the float32 vectors,
    used to re-rank, out of the graph (ip and cosine; l2 is never quantized).
    """

    cdef HierarchicalNSW[float]* _graph
    cdef SpaceInterface[float]* _space
    cdef FloatStore* _store
    cdef shared_mutex* _rw
    cdef readonly int dim
    cdef readonly str space
    cdef public size_t exact_threshold
    cdef size_t _pending
    cdef object _add_lock

    def __cinit__(self):
        self._graph = NULL
        self._space = NULL
        self._store = NULL
        self._rw = new shared_mutex()
        self._pending = 0
        self._add_lock = threading.Lock()

    def __dealloc__(self):
        if self._graph != NULL:
            del self._graph
        if self._space != NULL:
            del self._space
        if self._store != NULL:
            del self._store  # unmaps the file and the anonymous vectors
        del self._rw
        # hnswlib frees its upper-level link lists and label map in many
        # small blocks that glibc keeps for reuse; a dropped index (a
        # compaction's old copy) should give its memory back to the system.
        malloc_trim(0)

    def __init__(self, int dim, str space="ip", size_t max_elements=1024, size_t M=16,
                 size_t ef_construction=200, size_t exact_threshold=DEFAULT_EXACT_THRESHOLD,
                 size_t random_seed=100, bint quantized=True):
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if M < 2 or M > 2048:
            raise ValueError(f"M must be between 2 and 2048, got {M}")
        if ef_construction < 1:
            raise ValueError("ef_construction must be at least 1")
        self._make_space(dim, space, quantized)
        self._graph = new HierarchicalNSW[float](
            self._space, max(max_elements, 1), M, ef_construction, random_seed, False
        )
        advise_huge_pages(deref(self._graph))
        if self._quantizes(quantized):
            self._store = new FloatStore(dim, self._graph.getMaxElements())
        self.exact_threshold = exact_threshold

    cdef bint _quantizes(self, bint quantized):
        # int8 codes for inner-product spaces; l2 keeps float32 records.
        return quantized and self.space != "l2"

    @property
    def quantized(self):
        """Whether searches walk the graph on int8 codes (then re-rank exactly)."""
        return self._store != NULL

    cdef _make_space(self, int dim, str space, bint quantized):
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
        self.dim = dim
        self.space = space
        if space == "l2":
            self._space = new L2Space(dim)
        elif self._quantizes(quantized):
            self._space = new Int8Space(dim)
        else:
            self._space = new InnerProductSpace(dim)

    # -- properties ----------------------------------------------------------

    def __len__(self):
        return self._graph.getCurrentElementCount() - self._graph.getDeletedCount()

    @property
    def slots(self):
        """Elements stored, deleted ones included (hnswlib keeps their slots
        until the index is rebuilt)."""
        return self._graph.getCurrentElementCount()

    @property
    def max_elements(self):
        """Capacity before the next automatic resize."""
        return self._graph.getMaxElements()

    @property
    def M(self):
        return self._graph.M_

    @property
    def ef_construction(self):
        return self._graph.ef_construction_

    @property
    def memory_bytes(self):
        """RAM this index holds, in bytes (an estimate from its structures):
        the graph, and float32 vectors not yet in a saved file. The page cache
        behind the mapped file is not counted; the kernel reclaims it."""
        cdef size_t total = 0
        with nogil:
            self._rw.lock_shared()
            try:
                total = memory_bytes(deref(self._graph), self._store, _CORES)
            finally:
                self._rw.unlock_shared()
        return total

    def labels(self):
        """Live labels as a uint64 array."""
        cdef vector[uint64_t] out
        self._rw.lock_shared()
        try:
            out = live_labels(deref(self._graph))
        finally:
            self._rw.unlock_shared()
        return np.asarray(<uint64_t[:out.size()]> out.data() if out.size() else [],
                          dtype=np.uint64).copy()

    # -- argument checks -----------------------------------------------------

    cdef object _vectors(self, vectors, str name):
        array = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
        if array.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point, got dtype {array.dtype}")
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape [n, {self.dim}] (or [{self.dim}]), got {np.shape(vectors)}"
            )
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=np.float32)
        cdef const float[:, ::1] view = array
        if not _all_finite(view):
            raise ValueError(f"{name} contain NaN or infinite values")
        if self.space == "cosine":
            norms = np.linalg.norm(array, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError(f"{name} contain a zero vector, which has no cosine direction")
            array = np.ascontiguousarray(array / norms, dtype=np.float32)
        return array

    @staticmethod
    def _labels(labels, str name):
        array = np.asarray(labels)
        if array.ndim == 0:
            array = array[None]
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
        if array.dtype.kind == "i" and (array < 0).any():
            raise ValueError(f"{name} must be non-negative")
        array = np.ascontiguousarray(array, dtype=np.uint64)
        if (array == MISSING_LABEL).any():
            raise ValueError(f"{name} must not use 2**64-1, which marks missing results")
        return array

    @staticmethod
    def _threads(int num_threads):
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = all cores), got {num_threads}")
        return num_threads or _CORES

    # -- writes --------------------------------------------------------------

    def add(self, vectors, labels, int num_threads=0):
        """Insert vectors float32 [n, dim] under labels uint64 [n]; an existing
        label is replaced (a deleted one comes back). The index grows as needed."""
        cdef const float[:, ::1] data = self._vectors(vectors, "vectors")
        cdef const uint64_t[::1] ids = self._labels(labels, "labels")
        cdef size_t n = data.shape[0]
        cdef size_t threads = self._threads(num_threads)
        if <size_t>ids.shape[0] != n:
            raise ValueError(f"got {n} vectors but {ids.shape[0]} labels")
        if n == 0:
            return
        if len(np.unique(np.asarray(ids))) != n:
            raise ValueError("labels must be unique within one add call")
        with self._add_lock:
            self._pending += n
            needed = self._graph.getCurrentElementCount() + self._pending
            if needed > self._graph.getMaxElements():
                self._resize(max(needed, 2 * self._graph.getMaxElements()))
        try:
            with nogil:
                self._rw.lock_shared()
                try:
                    add_batch(deref(self._graph), self._store, &data[0, 0], &ids[0], n, self.dim,
                              threads)
                finally:
                    self._rw.unlock_shared()
        finally:
            with self._add_lock:
                self._pending -= n

    def delete(self, labels):
        """Remove labels from all later results; unknown ones are ignored.
        Returns how many were deleted."""
        cdef const uint64_t[::1] ids = self._labels(labels, "labels")
        cdef size_t n = ids.shape[0]
        cdef size_t deleted = 0
        if n == 0:
            return 0
        with nogil:
            self._rw.lock_shared()
            try:
                deleted = delete_labels(deref(self._graph), &ids[0], n)
            finally:
                self._rw.unlock_shared()
        return deleted

    def resize(self, size_t max_elements):
        """Set the capacity; it cannot go below the elements already stored."""
        with self._add_lock:
            if max_elements < self._graph.getCurrentElementCount() + self._pending:
                raise ValueError(
                    f"cannot resize to {max_elements}: the index holds "
                    f"{self._graph.getCurrentElementCount()} elements"
                )
            self._resize(max_elements)

    cdef _resize(self, size_t max_elements):
        with nogil:
            self._rw.lock()
            try:
                self._graph.resizeIndex(max_elements)
                advise_huge_pages(deref(self._graph))
                if self._store != NULL:
                    self._store.resize(max_elements)
            finally:
                self._rw.unlock()

    # -- search --------------------------------------------------------------

    def search(self, queries, int k=10, int ef=100, allowed=None, int num_threads=0,
               exact_threshold=None):
        """Nearest labels per query: (uint64 [q, k], float32 [q, k]) in hnswlib's
        distance convention, best first; missing results are 2**64-1 / inf.

        allowed: None, or a uint64 array of the only labels that may be returned.
        exact_threshold: scan the allowed vectors exactly when there are at
        most this many (default: the index's exact_threshold).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if ef < 1:
            raise ValueError(f"ef must be at least 1, got {ef}")
        cdef const float[:, ::1] data = self._vectors(queries, "queries")
        cdef size_t nq = data.shape[0]
        cdef size_t threads = self._threads(num_threads)
        cdef const uint64_t[::1] permitted
        cdef const uint64_t* permitted_ptr = NULL
        cdef size_t n_permitted = 0
        cdef uint64_t placeholder = 0
        cdef size_t threshold = self.exact_threshold
        if exact_threshold is not None:
            if exact_threshold < 0:
                raise ValueError(f"exact_threshold must be >= 0, got {exact_threshold}")
            threshold = exact_threshold
        if allowed is not None:
            permitted = self._labels(allowed, "allowed")
            n_permitted = permitted.shape[0]
            permitted_ptr = &permitted[0] if n_permitted else &placeholder
        out_labels = np.empty((nq, k), dtype=np.uint64)
        out_distances = np.empty((nq, k), dtype=np.float32)
        cdef uint64_t[:, ::1] labels_view = out_labels
        cdef float[:, ::1] distances_view = out_distances
        if nq == 0:
            return out_labels, out_distances
        with nogil:
            self._rw.lock_shared()
            try:
                search_batch(deref(self._graph), &data[0, 0], nq, self.dim, k, ef,
                             permitted_ptr, n_permitted, threshold, threads,
                             &labels_view[0, 0], &distances_view[0, 0], self._store)
            finally:
                self._rw.unlock_shared()
        return out_labels, out_distances

    # -- files ---------------------------------------------------------------

    def save(self, path, bint remap=True):
        """Write the index to ``path`` (hnswlib 0.8.0's file layout, float32
        vectors) and its checksum and parameters to ``path.meta.json``, each
        through a temporary file and an atomic rename.

        remap: a quantized index then reads its float32 vectors from the saved
        file (memory-mapped) and frees the RAM that held them, unless an add
        ran meanwhile; pass False for a copy that will be moved or deleted.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        cdef string location = os.fsencode(tmp)
        cdef size_t elements = 0
        cdef size_t slots = 0
        cdef uint64_t batches = 0
        with nogil:
            self._rw.lock()
            try:
                save_graph(deref(self._graph), self._store, self.dim, location)
                # Counted under the same lock, so a delete racing the save
                # cannot make the description disagree with the file.
                elements = self._graph.getCurrentElementCount() - self._graph.getDeletedCount()
                slots = self._graph.getCurrentElementCount()
                if self._store != NULL:
                    batches = self._store.batches_written()
            finally:
                self._rw.unlock()
        _fsync(tmp)
        size = tmp.stat().st_size
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "space": self.space,
            "M": self.M,
            "ef_construction": self.ef_construction,
            "elements": elements,
            "bytes": size,
            "sha256": _sha256(tmp),
        }
        meta_path = _meta_path(path)
        meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
        meta_tmp.write_text(json.dumps(meta))
        _fsync(meta_tmp)
        # Opened before the rename, so the mapping below is of this file
        # whatever later takes its name.
        fd = os.open(tmp, os.O_RDONLY) if remap and self._store != NULL else -1
        try:
            # The data first, then its description: a crash in between leaves a
            # checksum mismatch that load() reports, never a silently wrong index.
            # Both files are on disk before either rename, and the directory
            # after them, so a power cut cannot bring back an old name.
            os.replace(tmp, path)
            os.replace(meta_tmp, meta_path)
            _fsync(path.parent)
            if fd >= 0:
                self._map_saved(fd, size, slots, batches)
        finally:
            if fd >= 0:
                os.close(fd)
        # Building leaves freed search heaps and link buffers in each build
        # thread's malloc arena (about 50 B per vector at 100k); a save,
        # rare and already slow, hands them back.
        malloc_trim(0)

    cdef _map_saved(self, int fd, size_t size, size_t slots, uint64_t batches):
        with nogil:
            self._rw.lock()
            try:
                # An add since the file was written changed vectors it lacks.
                if self._store.batches_written() == batches:
                    map_file_vectors(deref(self._graph), deref(self._store), fd, size, slots,
                                     self.dim)
            finally:
                self._rw.unlock()

    @staticmethod
    def load(path, exact_threshold=DEFAULT_EXACT_THRESHOLD, quantized=True):
        """Load an index written by save(); ValueError if it is missing,
        damaged, truncated, not ours, or holds a graph that could not be
        searched safely (check_index_file in index_file.h says what is
        checked). A quantized index maps the file's float32 vectors instead
        of reading them into RAM, so the file must stay as it is (save()
        replaces files by rename, never in place)."""
        path = Path(path)
        dim, space, M, expected_bytes, expected_sha256 = _read_meta(path)
        cdef VectorIndex index = VectorIndex.__new__(VectorIndex)
        index._make_space(dim, space, quantized)
        index.exact_threshold = exact_threshold
        cdef IndexFileSummary summary
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size != expected_bytes:
                    raise ValueError(f"index file {path} is missing or truncated")
                # One mapping serves the checksum, the graph check and the
                # load, without a second copy of the file in memory (mmap
                # refuses empty files).
                with (mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else _Empty()) as contents:
                    if hashlib.sha256(contents).hexdigest() != expected_sha256:
                        raise ValueError(f"index file {path} is damaged (checksum mismatch)")
                    problem = _check_graph(contents, dim, M, summary)
                    if problem:
                        raise ValueError(f"index file {path} holds an unusable graph: {problem}")
                    capacity = min(summary.capacity, 2 * summary.elements + LOADED_SPARE_CAPACITY)
                    index._load(contents, M, max(capacity, 1), quantized, fh.fileno())
        except OSError as exc:
            raise ValueError(f"index file {path} is missing or unreadable: {exc}") from None
        except (MemoryError, RuntimeError) as exc:
            # std::bad_alloc, std::runtime_error and the rest: all mean this
            # file cannot be used.
            raise ValueError(f"index file {path} cannot be loaded: {exc!r}") from None
        return index

    cdef _load(self, const unsigned char[::1] contents, size_t M, size_t capacity,
               bint quantized, int fd):
        # A method of its own so the memoryview on the mapping is released
        # before the mapping is closed.
        cdef const unsigned char* start = &contents[0]
        cdef size_t size = contents.shape[0]
        self._graph = new HierarchicalNSW[float](self._space, capacity, M, M, 100, False)
        advise_huge_pages(deref(self._graph))
        if self._quantizes(quantized):
            self._store = new FloatStore(self.dim, capacity)
        with nogil:
            load_graph(deref(self._graph), start, self.dim, _CORES)
            if self._store != NULL:
                map_file_vectors(deref(self._graph), deref(self._store), fd, size,
                                 self._graph.getCurrentElementCount(), self.dim)


def _read_meta(path):
    """The (dim, space, M, file size, sha256) that ``path``'s meta file
    states; ValueError if it is missing or not ours."""
    meta_path = _meta_path(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta_path} is missing or unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} does not describe a {FORMAT} index")
    dim, space, M = meta.get("dim"), meta.get("space"), meta.get("M")
    if not (_is_int(dim) and 1 <= dim <= MAX_DIM and space in SPACES
            and _is_int(M) and 2 <= M <= 2048 and _is_int(meta.get("bytes"))
            and isinstance(meta.get("sha256"), str)):
        raise ValueError(
            f"{meta_path} has a missing or out-of-range dim, space, M, bytes or sha256"
        )
    return dim, space, M, meta["bytes"], meta["sha256"]


cdef str _check_graph(const unsigned char[::1] contents, size_t dim, size_t M,
                      IndexFileSummary& summary):
    # A function of its own so the memoryview on the mapping is released
    # before the mapping is closed.
    cdef size_t size = contents.shape[0]
    cdef const unsigned char* start = &contents[0] if size else NULL
    cdef string problem
    try:
        with nogil:
            problem = check_index_file(start, size, dim, M, summary)
    except MemoryError:
        return "too large to check in memory"
    return problem.decode()


class _Empty(bytes):
    """b"" as a context manager, standing in for the mapping of an empty file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


cdef size_t _CORES = default_threads()


cdef bint _all_finite(const float[:, ::1] view) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef float value
    for i in range(view.shape[0]):
        for j in range(view.shape[1]):
            value = view[i, j]
            # NaN fails the comparison with itself; infinities exceed FLT_MAX.
            if value != value or value > 3.4028234663852886e38 or value < -3.4028234663852886e38:
                return False
    return True


def _meta_path(path):
    return path.with_name(path.name + ".meta.json")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
