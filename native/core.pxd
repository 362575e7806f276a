# C++ declarations: hnswlib's index (release 0.8.0 headers, fetched at build
# time) and the native helpers of our own in rag_native.h.

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
        HierarchicalNSW(SpaceInterface[T]* space, const string& location, bool nmslib,
                        size_t max_elements, bool allow_replace_deleted) except +
        void resizeIndex(size_t new_max_elements) except +
        void saveIndex(const string& location) except +
        size_t getMaxElements()
        size_t getCurrentElementCount()
        size_t getDeletedCount()
        size_t M_
        size_t ef_construction_
        size_t data_size_


cdef extern from "rag_native.h" namespace "rag" nogil:
    ctypedef HierarchicalNSW[float] Graph
    cdef cppclass Int8Codes:
        Int8Codes(size_t dim)
        void resize(size_t capacity) except +
    size_t default_threads()
    void search_batch(const Graph& graph, const float* queries, size_t nq, size_t dim, size_t k,
                      size_t ef, const uint64_t* allowed, size_t n_allowed,
                      size_t exact_threshold, size_t threads, uint64_t* labels,
                      float* distances, const Int8Codes* codes) except +
    void encode_labels(const Graph& graph, Int8Codes& codes, const uint64_t* labels, size_t n,
                       size_t threads) except +
    void encode_all(const Graph& graph, Int8Codes& codes, size_t threads) except +
    void add_batch(Graph& graph, const float* vectors, const uint64_t* labels, size_t n,
                   size_t dim, size_t threads) except +
    size_t delete_labels(Graph& graph, const uint64_t* labels, size_t n) except +
    vector[uint64_t] live_labels(const Graph& graph) except +
    cdef cppclass IndexFileSummary:
        size_t elements
        size_t capacity
    string check_index_file(const unsigned char* bytes, size_t size, size_t dim, size_t M,
                            IndexFileSummary& summary) except +
