// Saved index files: checked before anything trusts them, loaded into a
// graph (with float32 records, or int8 records and the floats left in the
// file), written back in the same layout.
//
// The file is exactly what hnswlib 0.8.0's saveIndex writes for float32
// vectors, whichever way the index holds them in memory: one file per index
// (backups and renames stay as they were), readable by hnswlib itself, and
// its float32 vectors can be memory-mapped where they lie, one per record.
#pragma once

#include <hnswlib/hnswlib.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "vectors.h"

namespace rag {

constexpr uint64_t kMissingLabel = std::numeric_limits<uint64_t>::max();

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


// -- loading and saving -------------------------------------------------------

// Fills `g` (new, empty, made for the file's M and a capacity of at least
// its elements) from a file that check_index_file accepted, as hnswlib's
// loadIndex would, but from bytes already in memory and into either record
// layout: float32 records are copied, int8 ones encoded from the file's
// vectors (which the caller then maps with map_file_vectors).
inline void load_graph(Graph& g, const unsigned char* bytes, size_t dim, size_t threads) {
  using detail::read_at;
  const size_t elements = read_at<uint64_t>(bytes, 16);
  const size_t file_record = read_at<uint64_t>(bytes, 24);
  const size_t file_label = read_at<uint64_t>(bytes, 32);
  const size_t links0 = read_at<uint64_t>(bytes, 40);
  if (g.cur_element_count != 0 || elements > g.max_elements_ || links0 != g.offsetData_) {
    throw std::logic_error("load_graph needs an empty graph made for the file");
  }
  const bool quantized = g.data_size_ != dim * sizeof(float);
  const unsigned char* level0 = bytes + detail::kHeaderBytes;
  parallel_for(elements, threads, [&](size_t i) {
    const unsigned char* in = level0 + i * file_record;
    char* out = g.data_level0_memory_ + i * g.size_data_per_element_;
    std::memcpy(out, in, links0);
    if (quantized) {
      thread_local std::vector<float> vector;  // the file's copy need not be aligned
      vector.resize(dim);
      std::memcpy(vector.data(), in + links0, dim * sizeof(float));
      Int8Space::encode(vector.data(), dim, out + g.offsetData_);
      out[3] = 1;  // its float32 vector is in the file (see float_ready)
    } else {
      std::memcpy(out + g.offsetData_, in + links0, dim * sizeof(float));
      out[3] = 0;
    }
    std::memcpy(out + g.label_offset_, in + file_label, sizeof(labeltype));
  });
  g.label_lookup_.reserve(elements);
  size_t position = detail::kHeaderBytes + elements * file_record;
  for (size_t i = 0; i < elements; i++) {
    size_t list_bytes = read_at<uint32_t>(bytes, position);
    position += 4;
    g.element_levels_[i] = int(list_bytes / g.size_links_per_element_);
    g.linkLists_[i] = nullptr;
    if (list_bytes > 0) {
      g.linkLists_[i] = static_cast<char*>(std::malloc(list_bytes));
      if (g.linkLists_[i] == nullptr) throw std::bad_alloc();
      std::memcpy(g.linkLists_[i], bytes + position, list_bytes);
      position += list_bytes;
    }
    // Counted as it goes, so that the graph's destructor frees exactly the
    // lists allocated so far if a later allocation fails.
    g.cur_element_count = i + 1;
    g.label_lookup_[g.getExternalLabel(tableint(i))] = tableint(i);
    if (g.isMarkedDeleted(tableint(i))) g.num_deleted_ += 1;
  }
  g.maxlevel_ = read_at<int32_t>(bytes, 48);
  g.enterpoint_node_ = read_at<uint32_t>(bytes, 52);
  g.ef_construction_ = read_at<uint64_t>(bytes, 88);
}

// Points `store` at the float32 vectors of the first `elements` elements in
// a file that save_graph wrote for `g` or load_graph read into it (open as
// `fd`, file_bytes long): they lie one per record, after its links.
inline void map_file_vectors(const Graph& g, FloatStore& store, int fd, size_t file_bytes,
                             size_t elements, size_t dim) {
  size_t links0 = g.size_links_level0_;
  store.adopt(fd, file_bytes, detail::kHeaderBytes + links0,
              links0 + dim * sizeof(float) + sizeof(labeltype), elements);
}

// Writes the graph in hnswlib 0.8.0's float32 layout (what saveIndex writes
// for an index of float32 records), taking the vectors from `store` when the
// records hold int8 codes. Callers hold the writer lock: no add is running,
// so every float32 copy is written. Unlike saveIndex, a failed write throws.
inline void save_graph(const Graph& g, const FloatStore* store, size_t dim,
                       const std::string& location) {
  std::ofstream out(location, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot create " + location);
  const size_t links0 = g.size_links_level0_;
  const size_t vector_bytes = dim * sizeof(float);
  const uint64_t record_bytes = links0 + vector_bytes + sizeof(labeltype);
  const uint64_t label_offset = links0 + vector_bytes;
  const uint64_t data_offset = links0;
  const uint64_t level0_offset = 0;
  const uint64_t capacity = g.max_elements_;
  const uint64_t elements = g.cur_element_count;
  const uint64_t max_m = g.maxM_, max_m0 = g.maxM0_, m = g.M_, ef = g.ef_construction_;
  const int32_t max_level = g.maxlevel_;
  const uint32_t entry_point = g.enterpoint_node_;
  const double mult = g.mult_;
  auto put = [&](const void* data, size_t n) {
    out.write(static_cast<const char*>(data), std::streamsize(n));
  };
  put(&level0_offset, 8), put(&capacity, 8), put(&elements, 8), put(&record_bytes, 8);
  put(&label_offset, 8), put(&data_offset, 8), put(&max_level, 4), put(&entry_point, 4);
  put(&max_m, 8), put(&max_m0, 8), put(&m, 8), put(&mult, 8), put(&ef, 8);
  std::vector<char> record(record_bytes);
  for (tableint id = 0; id < elements; id++) {
    const char* in = g.data_level0_memory_ + size_t(id) * g.size_data_per_element_;
    std::memcpy(record.data(), in, links0);
    record[3] = 0;  // unused in hnswlib's files; our float_ready mark in memory
    const void* vector = store != nullptr ? static_cast<const void*>(store->vector(id))
                                          : static_cast<const void*>(in + g.offsetData_);
    std::memcpy(record.data() + links0, vector, vector_bytes);
    std::memcpy(record.data() + label_offset, in + g.label_offset_, sizeof(labeltype));
    put(record.data(), record.size());
  }
  for (tableint id = 0; id < elements; id++) {
    uint32_t list_bytes =
        g.element_levels_[id] > 0 ? uint32_t(g.size_links_per_element_ * g.element_levels_[id]) : 0;
    put(&list_bytes, 4);
    if (list_bytes) put(g.linkLists_[id], list_bytes);
  }
  out.close();
  if (!out) throw std::runtime_error("writing " + location + " failed");
}

}  // namespace rag
