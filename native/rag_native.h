// The parts of the search core that must be native: an allowed-label filter
// functor, a small parallel-for, an exact-scan kernel, and k-NN with a
// per-call ef. Everything runs without the GIL; errors surface as C++
// exceptions that Cython turns into Python exceptions in the calling thread.
#pragma once

#include <hnswlib/hnswlib.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <queue>
#include <thread>
#include <utility>
#include <vector>

namespace rag {

using Graph = hnswlib::HierarchicalNSW<float>;
using hnswlib::labeltype;
using hnswlib::tableint;

constexpr uint64_t kMissingLabel = std::numeric_limits<uint64_t>::max();

// Allowed labels: a bitset when the labels are dense enough (the store's
// row ids are), a sorted array with binary search otherwise. Read-only after
// construction, so every search thread can share one.
class AllowedLabels : public hnswlib::BaseFilterFunctor {
 public:
  AllowedLabels(const uint64_t* labels, size_t n) {
    uint64_t max_label = 0;
    for (size_t i = 0; i < n; i++) max_label = std::max(max_label, labels[i]);
    dense_ = max_label / 64 < std::max<uint64_t>(n, 1u << 14);
    if (dense_) {
      bits_.assign(n ? max_label / 64 + 1 : 0, 0);
      for (size_t i = 0; i < n; i++) bits_[labels[i] >> 6] |= uint64_t{1} << (labels[i] & 63);
    } else {
      sorted_.assign(labels, labels + n);
      std::sort(sorted_.begin(), sorted_.end());
    }
  }

  bool operator()(labeltype label) override {
    if (dense_) {
      size_t word = label >> 6;
      return word < bits_.size() && ((bits_[word] >> (label & 63)) & 1);
    }
    return std::binary_search(sorted_.begin(), sorted_.end(), static_cast<uint64_t>(label));
  }

 private:
  bool dense_ = true;
  std::vector<uint64_t> bits_;
  std::vector<uint64_t> sorted_;
};

// fn(i) for i in [0, n) over up to `threads` threads (the caller is one of
// them). The first exception stops the remaining work and is rethrown here.
template <class Fn>
void parallel_for(size_t n, size_t threads, Fn fn) {
  threads = std::max<size_t>(1, std::min(threads, n));
  if (threads == 1) {
    for (size_t i = 0; i < n; i++) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_lock;
  auto worker = [&] {
    for (size_t i = next++; i < n; i = next++) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
        next = n;
      }
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; t++) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

inline size_t default_threads() {
  return std::max<size_t>(1, std::thread::hardware_concurrency());
}

inline void fill_missing(size_t k, uint64_t* labels, float* distances) {
  std::fill(labels, labels + k, kMissingLabel);
  std::fill(distances, distances + k, std::numeric_limits<float>::infinity());
}

// Writes a max-heap of (distance, internal id) out best first.
template <class Heap>
void write_results(const Graph& g, Heap& heap, uint64_t* labels, float* distances) {
  for (size_t i = heap.size(); i-- > 0;) {
    labels[i] = g.getExternalLabel(heap.top().second);
    distances[i] = heap.top().first;
    heap.pop();
  }
}

// Graph k-NN with this call's ef (hnswlib's searchKnn reads one shared ef):
// greedy descent through the upper layers, then the base-layer beam search.
inline void knn(const Graph& g, const float* query, size_t k, size_t ef,
                hnswlib::BaseFilterFunctor* filter, uint64_t* labels, float* distances) {
  fill_missing(k, labels, distances);
  if (g.cur_element_count == 0) return;
  tableint current = g.enterpoint_node_;
  float best = g.fstdistfunc_(query, g.getDataByInternalId(current), g.dist_func_param_);
  for (int level = g.maxlevel_; level > 0; level--) {
    for (bool moved = true; moved;) {
      moved = false;
      auto* links = reinterpret_cast<unsigned int*>(g.get_linklist(current, level));
      int count = g.getListCount(links);
      auto* neighbours = reinterpret_cast<tableint*>(links + 1);
      for (int i = 0; i < count; i++) {
        float d = g.fstdistfunc_(query, g.getDataByInternalId(neighbours[i]), g.dist_func_param_);
        if (d < best) {
          best = d;
          current = neighbours[i];
          moved = true;
        }
      }
    }
  }
  size_t beam = std::max(ef, k);
  auto top = (g.num_deleted_ == 0 && filter == nullptr)
                 ? g.searchBaseLayerST<true>(current, query, beam, filter)
                 : g.searchBaseLayerST<false>(current, query, beam, filter);
  while (top.size() > k) top.pop();
  write_results(g, top, labels, distances);
}

// Internal ids of the given labels that are present and not deleted.
inline std::vector<tableint> live_ids(const Graph& g, const uint64_t* labels, size_t n) {
  std::vector<tableint> ids;
  ids.reserve(n);
  std::lock_guard<std::mutex> guard(g.label_lookup_lock);
  for (size_t i = 0; i < n; i++) {
    auto found = g.label_lookup_.find(labels[i]);
    if (found != g.label_lookup_.end() && !g.isMarkedDeleted(found->second)) {
      ids.push_back(found->second);
    }
  }
  return ids;
}

// Exact k-NN of a batch over one candidate list, with the space's own SIMD
// distance. One query streams every
// candidate vector from memory (bandwidth-bound); a group of queries walks the
// candidates in blocks that stay in cache while each query of the group reads
// them, so memory traffic is paid once per group instead of once per query.
inline void exact_knn_batch(const Graph& g, const float* queries, size_t nq, size_t dim, size_t k,
                            const std::vector<tableint>& candidates, size_t threads,
                            uint64_t* labels, float* distances) {
  constexpr size_t kGroup = 16;   // queries sharing one pass over the candidates
  constexpr size_t kBlock = 64;   // candidates per block (~100 KB at d=384)
  size_t groups = (nq + kGroup - 1) / kGroup;
  parallel_for(groups, threads, [&](size_t group) {
    size_t first = group * kGroup;
    size_t count = std::min(kGroup, nq - first);
    std::vector<std::priority_queue<std::pair<float, tableint>>> heaps(count);
    for (size_t start = 0; start < candidates.size(); start += kBlock) {
      size_t end = std::min(start + kBlock, candidates.size());
      for (size_t q = 0; q < count; q++) {
        const float* query = queries + (first + q) * dim;
        auto& heap = heaps[q];
        for (size_t c = start; c < end; c++) {
          tableint id = candidates[c];
          float d = g.fstdistfunc_(query, g.getDataByInternalId(id), g.dist_func_param_);
          if (heap.size() < k) {
            heap.emplace(d, id);
          } else if (d < heap.top().first) {
            heap.pop();
            heap.emplace(d, id);
          }
        }
      }
    }
    for (size_t q = 0; q < count; q++) {
      fill_missing(k, labels + (first + q) * k, distances + (first + q) * k);
      write_results(g, heaps[q], labels + (first + q) * k, distances + (first + q) * k);
    }
  });
}

// A whole batch of queries [nq, dim] into preallocated [nq, k] outputs.
// allowed == nullptr means no filter. Filters that leave at most
// exact_threshold live labels are answered by exact scan (recall 1.0).
inline void search_batch(const Graph& g, const float* queries, size_t nq, size_t dim, size_t k,
                         size_t ef, const uint64_t* allowed, size_t n_allowed,
                         size_t exact_threshold, size_t threads, uint64_t* labels,
                         float* distances) {
  if (allowed == nullptr) {
    parallel_for(nq, threads, [&](size_t i) {
      knn(g, queries + i * dim, k, ef, nullptr, labels + i * k, distances + i * k);
    });
    return;
  }
  std::vector<tableint> candidates = live_ids(g, allowed, n_allowed);
  if (candidates.size() <= exact_threshold) {
    exact_knn_batch(g, queries, nq, dim, k, candidates, threads, labels, distances);
    return;
  }
  AllowedLabels filter(allowed, n_allowed);
  parallel_for(nq, threads, [&](size_t i) {
    knn(g, queries + i * dim, k, ef, &filter, labels + i * k, distances + i * k);
  });
}

// Adds (or replaces) n vectors; hnswlib's addPoint is safe to run in parallel.
inline void add_batch(Graph& g, const float* vectors, const uint64_t* labels, size_t n, size_t dim,
                      size_t threads) {
  parallel_for(n, threads, [&](size_t i) { g.addPoint(vectors + i * dim, labels[i], false); });
}

// Marks labels deleted; unknown or already deleted labels are skipped.
inline size_t delete_labels(Graph& g, const uint64_t* labels, size_t n) {
  size_t deleted = 0;
  for (size_t i = 0; i < n; i++) {
    tableint id;
    {
      std::lock_guard<std::mutex> guard(g.label_lookup_lock);
      auto found = g.label_lookup_.find(labels[i]);
      if (found == g.label_lookup_.end()) continue;
      id = found->second;
    }
    if (g.isMarkedDeleted(id)) continue;
    try {
      g.markDelete(labels[i]);
      deleted++;
    } catch (const std::runtime_error&) {
      // deleted concurrently by another writer: already the wanted state
    }
  }
  return deleted;
}

// Live labels, in internal-id order.
inline std::vector<uint64_t> live_labels(const Graph& g) {
  std::vector<uint64_t> out;
  out.reserve(g.cur_element_count - g.num_deleted_);
  for (tableint id = 0; id < g.cur_element_count; id++) {
    if (!g.isMarkedDeleted(id)) out.push_back(g.getExternalLabel(id));
  }
  return out;
}

}  // namespace rag
