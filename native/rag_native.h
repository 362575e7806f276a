// The parts of the search core that must be native: an allowed-label filter
// functor, a small parallel-for, an exact-scan kernel, and k-NN with a
// per-call ef. Everything runs without the GIL; errors surface as C++
// exceptions that Cython turns into Python exceptions in the calling thread.
#pragma once

#include <hnswlib/hnswlib.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <queue>
#include <string>
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

// Greedy descent through the upper layers from the entry point; returns the
// (distance, id) where layer 0's beam search starts.
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

// int8 copies of the stored vectors, one scale per vector, for walking the
// graph: a visit reads 6 cache lines instead of 24 at d=384, and the graph
// walk is bound by those reads. Candidates are re-ranked with the exact
// float distance, so only the order of the walk is approximate. Inner
// product spaces only (ip, and cosine on normalised vectors).
class Int8Codes {
 public:
  explicit Int8Codes(size_t dim) : dim_(dim) {}

  void resize(size_t capacity) {
    codes_.resize(capacity * dim_);
    scales_.resize(capacity);
  }

  // Writes round(vector * 127 / max|vector|) to code; returns the factor back.
  static float quantize(const float* vector, size_t dim, int8_t* code) {
    float peak = 0;
    for (size_t i = 0; i < dim; i++) peak = std::max(peak, std::abs(vector[i]));
    float scale = peak > 0 ? 127.0f / peak : 1.0f;
    for (size_t i = 0; i < dim; i++) code[i] = static_cast<int8_t>(std::lrint(vector[i] * scale));
    return 1.0f / scale;
  }

  void encode(tableint id, const float* vector) {
    scales_[id] = quantize(vector, dim_, codes_.data() + size_t(id) * dim_);
  }

  // 1 - approximate dot product, hnswlib's inner-product distance.
  float distance(const int8_t* query, float query_scale, tableint id) const {
    const int8_t* code = codes_.data() + size_t(id) * dim_;
    int32_t dot = 0;
    for (size_t i = 0; i < dim_; i++) dot += int32_t(query[i]) * int32_t(code[i]);
    return 1.0f - float(dot) * query_scale * scales_[id];
  }

  const int8_t* code(tableint id) const { return codes_.data() + size_t(id) * dim_; }
  size_t dim() const { return dim_; }

 private:
  size_t dim_;
  std::vector<int8_t> codes_;
  std::vector<float> scales_;
};

inline void encode_ids(const Graph& g, Int8Codes& codes, const std::vector<tableint>& ids,
                       size_t threads) {
  parallel_for(ids.size(), threads, [&](size_t i) {
    codes.encode(ids[i], reinterpret_cast<const float*>(g.getDataByInternalId(ids[i])));
  });
}

// Codes for the given labels (after they were added) or for every element.
inline void encode_labels(const Graph& g, Int8Codes& codes, const uint64_t* labels, size_t n,
                          size_t threads) {
  std::vector<tableint> ids;
  ids.reserve(n);
  {
    std::lock_guard<std::mutex> guard(g.label_lookup_lock);
    for (size_t i = 0; i < n; i++) {
      auto found = g.label_lookup_.find(labels[i]);
      if (found != g.label_lookup_.end()) ids.push_back(found->second);
    }
  }
  encode_ids(g, codes, ids, threads);
}

inline void encode_all(const Graph& g, Int8Codes& codes, size_t threads) {
  std::vector<tableint> ids(g.cur_element_count);
  for (size_t i = 0; i < ids.size(); i++) ids[i] = static_cast<tableint>(i);
  encode_ids(g, codes, ids, threads);
}

// k-NN walking the graph on int8 codes, then re-ranking the ef best
// candidates by exact distance.
inline void knn_int8(const Graph& g, const Int8Codes& codes, const float* query, size_t k,
                     size_t ef, hnswlib::BaseFilterFunctor* filter, uint64_t* labels,
                     float* distances) {
  fill_missing(k, labels, distances);
  if (g.cur_element_count == 0) return;
  size_t dim = codes.dim();
  std::vector<int8_t> qcode(dim);
  float qscale = Int8Codes::quantize(query, dim, qcode.data());
  auto approx = [&](tableint id) { return codes.distance(qcode.data(), qscale, id); };

  auto [best, current] = descend(g, approx);

  size_t beam = std::max(ef, k);
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
      // The whole code (dim bytes), so the dot product below finds it in cache.
      const char* code = reinterpret_cast<const char*>(codes.code(neighbours[i]));
      for (size_t line = 0; line < dim; line += 64) _mm_prefetch(code + line, _MM_HINT_T0);
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
    float d = g.fstdistfunc_(query, g.getDataByInternalId(id), g.dist_func_param_);
    if (exact.size() < k) {
      exact.emplace(d, id);
    } else if (d < exact.top().first) {
      exact.pop();
      exact.emplace(d, id);
    }
  }
  write_results(g, exact, labels, distances);
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
                         float* distances, const Int8Codes* codes) {
  auto walk = [&](size_t i, hnswlib::BaseFilterFunctor* filter) {
    if (codes != nullptr) {
      knn_int8(g, *codes, queries + i * dim, k, ef, filter, labels + i * k, distances + i * k);
    } else {
      knn(g, queries + i * dim, k, ef, filter, labels + i * k, distances + i * k);
    }
  };
  if (allowed == nullptr) {
    parallel_for(nq, threads, [&](size_t i) { walk(i, nullptr); });
    return;
  }
  std::vector<tableint> candidates = live_ids(g, allowed, n_allowed);
  if (candidates.size() <= exact_threshold) {
    exact_knn_batch(g, queries, nq, dim, k, candidates, threads, labels, distances);
    return;
  }
  AllowedLabels filter(allowed, n_allowed);
  parallel_for(nq, threads, [&](size_t i) { walk(i, &filter); });
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

// -- checking a saved index before hnswlib's loader reads it -----------------
//
// hnswlib's loadIndex trusts its file: it allocates whatever capacity the
// header claims and searches follow stored neighbour ids without bounds
// checks, so one forged file (a restored backup, say) could crash the whole
// process. check_index_file reads the file's bytes the way loadIndex and
// saveIndex (hnswlib 0.8.0, hnswalg.h) lay them out and accepts only a graph
// that hnswlib can load and walk without leaving its buffers:
//
//   header (96 bytes): offsetLevel0_ u64, max_elements_ u64, cur_element_count
//     u64, size_data_per_element_ u64, label_offset_ u64, offsetData_ u64,
//     maxlevel_ i32, enterpoint_node_ u32, maxM_ u64, maxM0_ u64, M_ u64,
//     mult_ f64, ef_construction_ u64
//   level 0: cur_element_count records of size_data_per_element_ bytes, each
//     [u16 count, u8 flags, u8 unused, maxM0_ x u32 neighbour ids,
//      dim x f32 vector, u64 label]
//   upper levels: per element a u32 byte size, then level x [u32 count,
//     maxM_ x u32 neighbour ids]
//
// Every count read here is bounded by the file's size before it sizes
// anything. Returns "" when the file is sound, else what is wrong with it.

struct IndexFileSummary {
  size_t elements = 0;  // cur_element_count: stored vectors, deleted included
  size_t capacity = 0;  // max_elements_ as the file claims it
};

namespace detail {

constexpr size_t kHeaderBytes = 96;
// hnswlib draws a level as int(-ln(u) * mult) with mult = 1/ln(M) <= 1.45 and
// u >= ~2^-62 (two draws of its 31-bit engine), so a real index stays under 64.
constexpr int kMaxLevel = 64;

template <class T>
T read_at(const unsigned char* bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes + offset, sizeof(T));
  return value;
}

// The element's neighbour list at `list` (u32 header, then ids) must hold at
// most max_count ids, each naming a stored element present at this level.
inline std::string check_links(const unsigned char* list, size_t max_count, int level,
                               const std::vector<int>& levels, size_t element) {
  size_t count = read_at<uint16_t>(list, 0);
  if (count > max_count) {
    return "element " + std::to_string(element) + " has " + std::to_string(count) +
           " neighbours at level " + std::to_string(level) + ", at most " +
           std::to_string(max_count) + " allowed";
  }
  for (size_t j = 0; j < count; j++) {
    uint32_t id = read_at<uint32_t>(list, 4 + 4 * j);
    // A search that steps to a neighbour at this level reads that
    // neighbour's list for the same level next.
    if (id >= levels.size() || levels[id] < level) {
      return "element " + std::to_string(element) + " links at level " + std::to_string(level) +
             " to element " + std::to_string(id) +
             (id >= levels.size() ? ", past the " + std::to_string(levels.size()) + " stored"
                                  : ", which has no level " + std::to_string(level));
    }
  }
  return "";
}

}  // namespace detail

inline std::string check_index_file(const unsigned char* bytes, size_t size, size_t dim, size_t M,
                                    IndexFileSummary& summary) {
  using detail::read_at;
  using std::to_string;
  static_assert(sizeof(std::atomic<size_t>) == 8 && sizeof(tableint) == 4 &&
                    sizeof(labeltype) == 8,
                "the file layout below is hnswlib 0.8.0's on a 64-bit machine");
  if (size < detail::kHeaderBytes) return "shorter than hnswlib's header";
  const size_t offset_level0 = read_at<uint64_t>(bytes, 0);
  const size_t capacity = read_at<uint64_t>(bytes, 8);
  const size_t elements = read_at<uint64_t>(bytes, 16);
  const size_t record_bytes = read_at<uint64_t>(bytes, 24);
  const size_t label_offset = read_at<uint64_t>(bytes, 32);
  const size_t data_offset = read_at<uint64_t>(bytes, 40);
  const int max_level = read_at<int32_t>(bytes, 48);
  const uint32_t entry_point = read_at<uint32_t>(bytes, 52);
  const size_t max_m = read_at<uint64_t>(bytes, 56);
  const size_t max_m0 = read_at<uint64_t>(bytes, 64);
  const size_t m = read_at<uint64_t>(bytes, 72);
  const double mult = read_at<double>(bytes, 80);
  const size_t ef_construction = read_at<uint64_t>(bytes, 88);

  // Parameters: what hnswlib's constructor derives from dim and M.
  if (m != M || max_m != M || max_m0 != 2 * M) {
    return "link sizes M=" + to_string(m) + " maxM=" + to_string(max_m) + " maxM0=" +
           to_string(max_m0) + " do not match M=" + to_string(M);
  }
  const size_t links0_bytes = 4 + 4 * max_m0;
  const size_t links_bytes = 4 + 4 * max_m;
  if (offset_level0 != 0 || data_offset != links0_bytes ||
      label_offset != links0_bytes + 4 * dim || record_bytes != label_offset + 8) {
    return "record layout (" + to_string(record_bytes) + " bytes, vector at " +
           to_string(data_offset) + ", label at " + to_string(label_offset) +
           ") does not fit " + to_string(dim) + "-d float32 vectors with M=" + to_string(M);
  }
  // mult sets the level of every vector added later; a wild one would make
  // addPoint allocate absurd or negative link lists.
  if (!(std::abs(mult * std::log(double(M)) - 1.0) < 1e-6)) {
    return "level multiplier " + to_string(mult) + " is not 1/ln(M)";
  }
  if (ef_construction < M) {  // hnswlib stores max(ef_construction, M)
    return "ef_construction " + to_string(ef_construction) + " is below M=" + to_string(M);
  }

  // Element count against the capacity, the id width and the file's size.
  if (elements > capacity) {
    return to_string(elements) + " elements exceed the capacity " + to_string(capacity);
  }
  if (elements >= std::numeric_limits<tableint>::max()) {
    return to_string(elements) + " elements do not fit hnswlib's 32-bit ids";
  }
  const size_t body = size - detail::kHeaderBytes;
  // Each element takes its record plus at least the u32 size of its upper levels.
  if (elements > body / (record_bytes + 4)) {
    return to_string(elements) + " elements of " + to_string(record_bytes) +
           " bytes do not fit in the file's " + to_string(size) + " bytes";
  }

  if (elements > 0 && (max_level < 0 || max_level > detail::kMaxLevel)) {
    return "top level " + to_string(max_level) + " is out of range";
  }

  // Upper-level link lists: sizes, levels, and where each one starts.
  std::vector<int> levels(elements);
  std::vector<size_t> upper(elements, 0);
  size_t position = detail::kHeaderBytes + elements * record_bytes;
  for (size_t i = 0; i < elements; i++) {
    if (size - position < 4) return "ends inside the link lists of element " + to_string(i);
    size_t list_bytes = read_at<uint32_t>(bytes, position);
    position += 4;
    size_t level = list_bytes / links_bytes;
    if (list_bytes % links_bytes != 0 || int(level) > max_level) {
      return "element " + to_string(i) + " has " + to_string(list_bytes) +
             " bytes of upper-level links, not a whole number of levels up to " +
             to_string(max_level);
    }
    if (size - position < list_bytes) {
      return "ends inside the link lists of element " + to_string(i);
    }
    levels[i] = int(level);
    upper[i] = position;
    position += list_bytes;
  }
  if (position != size) {
    return to_string(size - position) + " bytes follow the last link list";
  }

  // The entry point: where every search starts, on the top level.
  if (elements == 0) {
    if (max_level != -1 || entry_point != std::numeric_limits<uint32_t>::max()) {
      return "an empty index has entry point " + to_string(entry_point) + " and top level " +
             to_string(max_level);
    }
  } else if (entry_point >= elements) {
    return "entry point " + to_string(entry_point) + " is past the " + to_string(elements) +
           " stored elements";
  } else if (levels[entry_point] != max_level) {
    return "entry point " + to_string(entry_point) + " has level " +
           to_string(levels[entry_point]) + ", not the top level " + to_string(max_level);
  }

  // Neighbour lists on every level, and the labels.
  std::vector<uint64_t> labels(elements);
  for (size_t i = 0; i < elements; i++) {
    const unsigned char* record = bytes + detail::kHeaderBytes + i * record_bytes;
    std::string error = detail::check_links(record, max_m0, 0, levels, i);
    for (int level = 1; error.empty() && level <= levels[i]; level++) {
      error = detail::check_links(bytes + upper[i] + (level - 1) * links_bytes, max_m, level,
                                  levels, i);
    }
    if (!error.empty()) return error;
    labels[i] = read_at<uint64_t>(record, label_offset);
  }
  std::sort(labels.begin(), labels.end());
  auto twin = std::adjacent_find(labels.begin(), labels.end());
  if (twin != labels.end()) return "label " + to_string(*twin) + " is stored twice";
  if (!labels.empty() && labels.back() == kMissingLabel) {
    return "label 2**64-1 is stored, which marks missing results";
  }
  summary.elements = elements;
  summary.capacity = capacity;
  return "";
}

}  // namespace rag
