// The parts of the search core that must be native: an allowed-label filter
// functor, an exact-scan kernel, k-NN with a per-call ef (on float32 records,
// or on int8 codes with an exact re-rank of the beam), batched adds and
// deletes, and the memory an index holds. Everything runs without the GIL;
// errors surface as C++ exceptions that Cython turns into Python exceptions
// in the calling thread. Storage is in vectors.h, files in index_file.h.
// One header: these are the search paths of one graph (the filter, the two
// k-NN walks and the exact scan that search_batch chooses between share the
// descent, the result heaps and QueryDistances), and what is not search
// already lives in its own header.
#pragma once

#include <hnswlib/hnswlib.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <queue>
#include <string>
#include <utility>
#include <vector>

#include "index_file.h"
#include "parallel.h"
#include "vectors.h"

namespace rag {

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

// Every search reads level-0 records in random order; on 4 KB pages each
// read of a large index is also a TLB miss (1M records are 540 MB, 135k
// pages). Transparent huge pages are "madvise" on Debian's kernels, so the
// records ask for them: pages faulted in afterwards (loading, adding) are
// 2 MB where the kernel has them. Only the 2 MB-aligned interior is
// advised; the RAM cost is at most the untouched rest of a huge page.
inline void advise_huge_pages(const Graph& g) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  auto start = reinterpret_cast<uintptr_t>(g.data_level0_memory_);
  uintptr_t end = start + g.max_elements_ * g.size_data_per_element_;
  uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  uintptr_t last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
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

// Greedy descent through the upper layers from the entry point; returns the
// (distance, id) where layer 0's beam search starts. addPoint links a new
// element top level first, so a concurrent descent can meet it before it
// has any level-0 links: starting there, the beam search would find that
// one element and nothing else. Such elements are stepped over.
template <class Distance>
std::pair<float, tableint> descend(const Graph& g, Distance distance) {
  tableint current = g.enterpoint_node_;
  float best = distance(current);
  for (int level = g.maxlevel_; level > 0; level--) {
    for (bool moved = true; moved;) {
      moved = false;
      auto* links = reinterpret_cast<unsigned int*>(g.get_linklist(current, level));
      int count = g.getListCount(links);
      auto* neighbours = reinterpret_cast<tableint*>(links + 1);
      for (int i = 0; i < count; i++) {
        if (g.getListCount(g.get_linklist0(neighbours[i])) == 0) continue;
        float d = distance(neighbours[i]);
        if (d < best) {
          best = d;
          current = neighbours[i];
          moved = true;
        }
      }
    }
  }
  return {best, current};
}

// Graph k-NN with this call's ef (hnswlib's searchKnn reads one shared ef):
// greedy descent through the upper layers, then the base-layer beam search.
inline void knn(const Graph& g, const float* query, size_t k, size_t ef,
                hnswlib::BaseFilterFunctor* filter, uint64_t* labels, float* distances) {
  fill_missing(k, labels, distances);
  if (g.cur_element_count == 0) return;
  tableint current = descend(g, [&](tableint id) {
    return g.fstdistfunc_(query, g.getDataByInternalId(id), g.dist_func_param_);
  }).second;
  size_t beam = std::max(ef, k);
  auto top = (g.num_deleted_ == 0 && filter == nullptr)
                 ? g.searchBaseLayerST<true>(current, query, beam, filter)
                 : g.searchBaseLayerST<false>(current, query, beam, filter);
  while (top.size() > k) top.pop();
  write_results(g, top, labels, distances);
}

// One query's distances in a quantized index: `approx` on the int8 codes in
// the records (the walk: a visit reads 7 cache lines instead of 25 at
// d=384, and the walk is bound by those reads), `exact` on the float32
// vectors in the FloatStore (the re-rank of the beam, the exact scan). In a
// float32 index (store == nullptr) both are hnswlib's own distance.
class QueryDistances {
 public:
  QueryDistances(const Graph& g, const FloatStore* store, const float* query)
      : g_(g), store_(store), query_(query) {
    if (store_ != nullptr) {
      dim_ = store_->dim();
      code_.resize(dim_ + sizeof(float));
      Int8Space::encode(query, dim_, code_.data());
    }
  }

  float approx(tableint id) const {
    if (store_ == nullptr) return exact(id);
    return Int8Space::distance(code_.data(), g_.getDataByInternalId(id), &dim_);
  }

  float exact(tableint id) const {
    if (store_ == nullptr) {
      return g_.fstdistfunc_(query_, g_.getDataByInternalId(id), g_.dist_func_param_);
    }
    // An element whose add is still running may have no float32 copy yet.
    return float_ready(g_, id) ? store_->distance(query_, id) : approx(id);
  }

 private:
  const Graph& g_;
  const FloatStore* store_;
  const float* query_;
  size_t dim_ = 0;
  std::vector<int8_t> code_;
};

// k-NN walking the graph on int8 codes, then re-ranking the ef best
// candidates by exact distance, so only the order of the walk is approximate.
inline void knn_int8(const Graph& g, const FloatStore& store, const float* query, size_t k,
                     size_t ef, hnswlib::BaseFilterFunctor* filter, uint64_t* labels,
                     float* distances) {
  fill_missing(k, labels, distances);
  if (g.cur_element_count == 0) return;
  QueryDistances scores(g, &store, query);
  auto approx = [&](tableint id) { return scores.approx(id); };

  auto [best, current] = descend(g, approx);

  size_t beam = std::max(ef, k);
  size_t code_bytes = g.data_size_;
  bool check = g.num_deleted_ > 0 || filter != nullptr;
  auto allowed = [&](tableint id) {
    return !check || (!g.isMarkedDeleted(id) && (filter == nullptr || (*filter)(g.getExternalLabel(id))));
  };
  hnswlib::VisitedList* visited_list = g.visited_list_pool_->getFreeVisitedList();
  hnswlib::vl_type* visited = visited_list->mass;
  hnswlib::vl_type tag = visited_list->curV;
  using Entry = std::pair<float, tableint>;
  std::priority_queue<Entry> top;                                             // worst on top
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> frontier;  // best on top
  float bound = std::numeric_limits<float>::infinity();
  frontier.emplace(best, current);
  if (allowed(current)) {
    top.emplace(best, current);
    bound = best;
  }
  visited[current] = tag;
  while (!frontier.empty()) {
    Entry next = frontier.top();
    if (next.first > bound && top.size() == beam) break;
    frontier.pop();
    auto* links = reinterpret_cast<unsigned int*>(g.get_linklist0(next.second));
    int count = g.getListCount(links);
    auto* neighbours = reinterpret_cast<tableint*>(links + 1);
    for (int i = 0; i < count; i++) {
      // The whole code, so the dot product below finds it in cache.
      const char* code = g.getDataByInternalId(neighbours[i]);
      for (size_t line = 0; line < code_bytes; line += 64) _mm_prefetch(code + line, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(visited + neighbours[i]), _MM_HINT_T0);
    }
    for (int i = 0; i < count; i++) {
      tableint id = neighbours[i];
      if (visited[id] == tag) continue;
      visited[id] = tag;
      float d = approx(id);
      if (top.size() < beam || d < bound) {
        frontier.emplace(d, id);
        if (allowed(id)) {
          top.emplace(d, id);
          if (top.size() > beam) top.pop();
          bound = top.top().first;
        }
      }
    }
  }
  g.visited_list_pool_->releaseVisitedList(visited_list);

  std::priority_queue<Entry> exact;
  while (!top.empty()) {
    tableint id = top.top().second;
    top.pop();
    float d = scores.exact(id);
    if (exact.size() < k) {
      exact.emplace(d, id);
    } else if (d < exact.top().first) {
      exact.pop();
      exact.emplace(d, id);
    }
  }
  write_results(g, exact, labels, distances);
}

// Internal ids of the given labels that are present and not deleted, in
// increasing order: records are then read in address order, which the
// hardware prefetcher follows (10,000 random ones took twice as long). A
// bitset over the ids sorts them in one pass.
inline std::vector<tableint> live_ids(const Graph& g, const uint64_t* labels, size_t n) {
  std::vector<uint64_t> present((g.cur_element_count + 63) / 64, 0);
  size_t found_count = 0;
  {
    std::lock_guard<std::mutex> guard(g.label_lookup_lock);
    for (size_t i = 0; i < n; i++) {
      auto found = g.label_lookup_.find(labels[i]);
      if (found == g.label_lookup_.end() || g.isMarkedDeleted(found->second)) continue;
      tableint id = found->second;
      if (id / 64 >= present.size()) continue;  // added after the count was read
      uint64_t bit = uint64_t{1} << (id & 63);
      found_count += (present[id / 64] & bit) == 0;
      present[id / 64] |= bit;
    }
  }
  std::vector<tableint> ids;
  ids.reserve(found_count);
  for (size_t word = 0; word < present.size(); word++) {
    for (uint64_t bits = present[word]; bits != 0; bits &= bits - 1) {
      ids.push_back(static_cast<tableint>(word * 64 + __builtin_ctzll(bits)));
    }
  }
  return ids;
}

// Exact k-NN of a batch over one candidate list. One query streams every
// candidate vector from memory (bandwidth-bound); a group of queries walks
// the candidates in blocks that stay in cache while each query of the group
// reads them, so memory traffic is paid once per group instead of once per
// query. In a quantized index the pass reads the int8 codes (a quarter of
// the bytes; at 10 % of 20,000 vectors the float32 pass read 3 MB per query
// and ran from memory when other searches had evicted it) and keeps the
// `shortlist` best, which the float32 vectors then re-rank: the answer is the
// float32 one unless a true neighbour ranks below `shortlist` on the codes.
inline void exact_knn_batch(const Graph& g, const FloatStore* store, const float* queries,
                            size_t nq, size_t dim, size_t k,
                            const std::vector<tableint>& candidates, size_t threads,
                            uint64_t* labels, float* distances) {
  constexpr size_t kGroup = 16;   // queries sharing one pass over the candidates
  constexpr size_t kBlock = 64;   // candidates per block (~100 KB at d=384)
  const size_t shortlist = std::max<size_t>(10 * k, 100);
  // Below a few shortlists the second pass costs more than it saves.
  const bool two_pass = store != nullptr && candidates.size() > 4 * shortlist;
  const size_t keep = two_pass ? shortlist : k;
  using Entry = std::pair<float, tableint>;
  size_t groups = (nq + kGroup - 1) / kGroup;
  parallel_for(groups, threads, [&](size_t group) {
    size_t first = group * kGroup;
    size_t count = std::min(kGroup, nq - first);
    std::vector<QueryDistances> scores;
    scores.reserve(count);
    for (size_t q = 0; q < count; q++) scores.emplace_back(g, store, queries + (first + q) * dim);
    std::vector<std::priority_queue<Entry>> heaps(count);
    auto prefetch_codes = [&](size_t start) {
      // Candidates lie in random order: the next block's codes are fetched
      // while this block is scored, instead of one memory latency each.
      size_t end = std::min(start + kBlock, candidates.size());
      for (size_t c = start; c < end; c++) {
        const char* code = g.getDataByInternalId(candidates[c]);
        for (size_t line = 0; line < g.data_size_; line += 64) _mm_prefetch(code + line, _MM_HINT_T0);
      }
    };
    if (two_pass) prefetch_codes(0);
    for (size_t start = 0; start < candidates.size(); start += kBlock) {
      size_t end = std::min(start + kBlock, candidates.size());
      if (two_pass) prefetch_codes(end);
      for (size_t q = 0; q < count; q++) {
        auto& heap = heaps[q];
        for (size_t c = start; c < end; c++) {
          tableint id = candidates[c];
          float d = two_pass ? scores[q].approx(id) : scores[q].exact(id);
          if (heap.size() < keep) {
            heap.emplace(d, id);
          } else if (d < heap.top().first) {
            heap.pop();
            heap.emplace(d, id);
          }
        }
      }
    }
    for (size_t q = 0; q < count; q++) {
      if (two_pass) {
        std::priority_queue<Entry> exact;
        for (; !heaps[q].empty(); heaps[q].pop()) {
          tableint id = heaps[q].top().second;
          float d = scores[q].exact(id);
          if (exact.size() < k) {
            exact.emplace(d, id);
          } else if (d < exact.top().first) {
            exact.pop();
            exact.emplace(d, id);
          }
        }
        heaps[q] = std::move(exact);
      }
      fill_missing(k, labels + (first + q) * k, distances + (first + q) * k);
      write_results(g, heaps[q], labels + (first + q) * k, distances + (first + q) * k);
    }
  });
}

// A whole batch of queries [nq, dim] into preallocated [nq, k] outputs.
// allowed == nullptr means no filter. Filters that allow at most
// exact_threshold labels are answered by exact scan (recall 1.0).
// store: the float32 vectors of an index with int8 records, else nullptr.
inline void search_batch(const Graph& g, const float* queries, size_t nq, size_t dim, size_t k,
                         size_t ef, const uint64_t* allowed, size_t n_allowed,
                         size_t exact_threshold, size_t threads, uint64_t* labels,
                         float* distances, const FloatStore* store) {
  auto walk = [&](size_t i, hnswlib::BaseFilterFunctor* filter) {
    if (store != nullptr) {
      knn_int8(g, *store, queries + i * dim, k, ef, filter, labels + i * k, distances + i * k);
    } else {
      knn(g, queries + i * dim, k, ef, filter, labels + i * k, distances + i * k);
    }
  };
  if (allowed == nullptr) {
    parallel_for(nq, threads, [&](size_t i) { walk(i, nullptr); });
    return;
  }
  // More allowed labels than the threshold: the walk, without first looking
  // each label up (10,000 hash lookups in random order cost more than the
  // walk itself at 20,000 vectors). Allowed labels that are not live only
  // make the walk check a few more neighbours; they are never returned.
  if (n_allowed <= exact_threshold) {
    std::vector<tableint> candidates = live_ids(g, allowed, n_allowed);
    exact_knn_batch(g, store, queries, nq, dim, k, candidates, threads, labels, distances);
    return;
  }
  AllowedLabels filter(allowed, n_allowed);
  parallel_for(nq, threads, [&](size_t i) { walk(i, &filter); });
}

// Adds (or replaces) n vectors; hnswlib's addPoint is safe to run in
// parallel. With a store, the records get int8 codes and the store the
// float32 vectors, written under the label's lock as hnswlib's own
// addPoint(data, label, replace_deleted) takes it.
inline void add_batch(Graph& g, FloatStore* store, const float* vectors, const uint64_t* labels,
                      size_t n, size_t dim, size_t threads) {
  if (store == nullptr) {
    parallel_for(n, threads, [&](size_t i) { g.addPoint(vectors + i * dim, labels[i], false); });
    return;
  }
  struct CountBatch {
    FloatStore* store;
    ~CountBatch() { store->writes++; }
  } count{store};
  parallel_for(n, threads, [&](size_t i) {
    thread_local std::vector<int8_t> code;
    code.resize(g.data_size_);
    const float* vector = vectors + i * dim;
    Int8Space::encode(vector, dim, code.data());
    std::unique_lock<std::mutex> lock(g.getLabelOpMutex(labels[i]));
    tableint id = g.addPoint(code.data(), labels[i], -1);
    store->write(id, vector);
    mark_float_ready(g, id);
  });
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

// RAM the index holds, in bytes: an estimate from hnswlib's structures as
// 0.8.0 allocates them, for memory limits. Counted: the level-0 records in
// use, upper-level link lists, the per-slot lock and level arrays (built
// for the whole capacity), the label map, one visited list per search
// thread, and float32 vectors in anonymous memory. Not counted: the page
// cache behind the mapped index file, which the kernel reclaims as needed.
inline size_t memory_bytes(const Graph& g, const FloatStore* store, size_t search_threads) {
  constexpr size_t kMallocOverhead = 16;  // glibc's chunk header, rounded
  constexpr size_t kMapNodeBytes = 32;    // libstdc++ node: next, key, value, rounded
  const size_t elements = g.cur_element_count;
  const size_t capacity = g.max_elements_;
  size_t bytes = elements * g.size_data_per_element_;
  for (size_t i = 0; i < elements; i++) {
    if (g.element_levels_[i] > 0) {
      bytes += g.element_levels_[i] * g.size_links_per_element_ + 1 + kMallocOverhead;
    }
  }
  bytes += capacity * (sizeof(std::mutex) + sizeof(int)) + elements * sizeof(void*);
  bytes += Graph::MAX_LABEL_OPERATION_LOCKS * sizeof(std::mutex);
  {
    std::lock_guard<std::mutex> guard(g.label_lookup_lock);
    bytes += g.label_lookup_.size() * kMapNodeBytes + g.label_lookup_.bucket_count() * sizeof(void*);
  }
  bytes += search_threads * capacity * sizeof(hnswlib::vl_type);
  if (store != nullptr) bytes += store->ram_bytes(elements);
  return bytes;
}

}  // namespace rag
