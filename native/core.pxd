# C++ declarations: hnswlib's index (release 0.8.0 headers, fetched at build
# time) and the native helpers of our own in rag_native.h (search),
# vectors.h (int8 records, float32 store) and index_file.h (saved files).

from libc.stdint cimport uint64_t
from libcpp cimport bool
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "<shared_mutex>" namespace "std" nogil:
    cdef cppclass shared_mutex:
        shared_mutex()
        void lock()
        void unlock()
        void lock_shared()
        void unlock_shared()


cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)


cdef extern from "hnswlib/hnswlib.h" namespace "hnswlib" nogil:
    cdef cppclass SpaceInterface[T]:
        pass

    cdef cppclass InnerProductSpace(SpaceInterface[float]):
        InnerProductSpace(size_t dim)

    cdef cppclass L2Space(SpaceInterface[float]):
        L2Space(size_t dim)

    cdef cppclass HierarchicalNSW[T]:
        HierarchicalNSW(SpaceInterface[T]* space, size_t max_elements, size_t M,
                        size_t ef_construction, size_t random_seed,
                        bool allow_replace_deleted) except +
        void resizeIndex(size_t new_max_elements) except +
        size_t getMaxElements()
        size_t getCurrentElementCount()
        size_t getDeletedCount()
        size_t M_
        size_t ef_construction_


cdef extern from "rag_native.h" namespace "rag" nogil:
    ctypedef HierarchicalNSW[float] Graph
    cdef cppclass Int8Space(SpaceInterface[float]):
        Int8Space(size_t dim)
    cdef cppclass FloatStore:
        FloatStore(size_t dim, size_t capacity) except +
        void resize(size_t capacity) except +
        uint64_t batches_written()
    size_t default_threads()
    void advise_huge_pages(const Graph& graph)
    void search_batch(const Graph& graph, const float* queries, size_t nq, size_t dim, size_t k,
                      size_t ef, const uint64_t* allowed, size_t n_allowed,
                      size_t exact_threshold, size_t threads, uint64_t* labels,
                      float* distances, const FloatStore* store) except +
    void add_batch(Graph& graph, FloatStore* store, const float* vectors, const uint64_t* labels,
                   size_t n, size_t dim, size_t threads) except +
    size_t delete_labels(Graph& graph, const uint64_t* labels, size_t n) except +
    vector[uint64_t] live_labels(const Graph& graph) except +
    size_t memory_bytes(const Graph& graph, const FloatStore* store, size_t search_threads) except +
    cdef cppclass IndexFileSummary:
        size_t elements
        size_t capacity
    string check_index_file(const unsigned char* bytes, size_t size, size_t dim, size_t M,
                            IndexFileSummary& summary) except +
    void load_graph(Graph& graph, const unsigned char* bytes, size_t dim, size_t threads) except +
    void save_graph(const Graph& graph, const FloatStore* store, size_t dim,
                    const string& location) except +
    void map_file_vectors(const Graph& graph, FloatStore& store, int fd, size_t file_bytes,
                          size_t elements, size_t dim) except +
