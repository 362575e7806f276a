// Where a quantized index keeps its vectors: int8 codes inside hnswlib's
// level-0 records (Int8Space), the float32 originals outside them
// (FloatStore), read only to re-rank a walk's beam and for the exact scan.
//
// hnswlib stores each element's vector inside its level-0 record, between
// the links and the label. With float32 there, a 384-d record is 1,676
// bytes, and all of it stays in RAM. With int8 codes it is 528 bytes; the
// float32 copies live in a private mapping of the saved index file (pages
// come from the page cache when a re-rank touches them, and the kernel can
// reclaim them), or, for vectors added since the last save, in anonymous
// memory. Inner product only (ip, and cosine on normalised vectors): l2
// keeps float32 records.
#pragma once

#include <hnswlib/hnswlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace rag {

using Graph = hnswlib::HierarchicalNSW<float>;
using hnswlib::labeltype;
using hnswlib::tableint;

// Records of dim int8 codes then one float32 factor back to the vector's
// scale: round(v * 127 / max|v|) per vector. Graphs are built on these
// distances too, so addPoint never needs the float32 vector.
class Int8Space : public hnswlib::SpaceInterface<float> {
 public:
  explicit Int8Space(size_t dim) : dim_(dim) {}

  size_t get_data_size() override { return dim_ + sizeof(float); }
  hnswlib::DISTFUNC<float> get_dist_func() override { return &distance; }
  void* get_dist_func_param() override { return &dim_; }

  // Writes the code of `vector` (get_data_size() bytes) to `code`.
  static void encode(const float* vector, size_t dim, void* code) {
    auto* out = static_cast<int8_t*>(code);
    float peak = 0;
    for (size_t i = 0; i < dim; i++) peak = std::max(peak, std::abs(vector[i]));
    float scale = peak > 0 ? 127.0f / peak : 1.0f;
    for (size_t i = 0; i < dim; i++) out[i] = static_cast<int8_t>(std::lrint(vector[i] * scale));
    float back = 1.0f / scale;
    std::memcpy(out + dim, &back, sizeof back);
  }

  // 1 - approximate dot product: hnswlib's inner-product distance.
  static float distance(const void* a, const void* b, const void* param) {
    size_t dim = *static_cast<const size_t*>(param);
    auto* x = static_cast<const int8_t*>(a);
    auto* y = static_cast<const int8_t*>(b);
    int32_t dot = 0;
    for (size_t i = 0; i < dim; i++) dot += int32_t(x[i]) * int32_t(y[i]);
    float sx, sy;
    std::memcpy(&sx, x + dim, sizeof sx);
    std::memcpy(&sy, y + dim, sizeof sy);
    return 1.0f - float(dot) * sx * sy;
  }

 private:
  size_t dim_;
};

// A quantized record's float32 vector is written after addPoint has linked
// the element (hnswlib picks its id inside addPoint), so a concurrent search
// can meet it first. The link header's fourth byte, which hnswlib never
// uses (it zeroes it when it creates the record), says the copy is written;
// until then a search scores that element on its int8 code.
inline unsigned char* ready_byte(const Graph& g, tableint id) {
  return reinterpret_cast<unsigned char*>(g.get_linklist0(id)) + 3;
}
inline void mark_float_ready(const Graph& g, tableint id) {
  __atomic_store_n(ready_byte(g, id), 1, __ATOMIC_RELEASE);
}
inline bool float_ready(const Graph& g, tableint id) {
  return __atomic_load_n(ready_byte(g, id), __ATOMIC_ACQUIRE) != 0;
}

// float32 vectors by internal id. Ids below base_count_ read the saved
// index file through a private mapping (MAP_PRIVATE: replacing one copies
// its page, the file never changes); the rest an anonymous mapping sized to
// the capacity, whose pages take RAM only once written. Pointers change only
// in resize() and adopt(), which callers run under the index's writer lock.
class FloatStore {
 public:
  FloatStore(size_t dim, size_t capacity)
      : dim_(dim), vector_bytes_(dim * sizeof(float)), inner_product_(dim) {
    tail_bytes_ = tail_size(capacity);
    void* tail = mmap(nullptr, tail_bytes_, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (tail == MAP_FAILED) throw std::bad_alloc();
    tail_ = static_cast<char*>(tail);
  }
  FloatStore(const FloatStore&) = delete;
  FloatStore& operator=(const FloatStore&) = delete;
  ~FloatStore() {
    munmap(tail_, tail_bytes_);
    release_base();
  }

  size_t dim() const { return dim_; }

  const float* vector(tableint id) const {
    return reinterpret_cast<const float*>(
        id < base_count_ ? base_ + size_t(id) * base_stride_ : tail_ + size_t(id) * vector_bytes_);
  }

  // hnswlib's SIMD inner-product distance to the stored vector.
  float distance(const float* query, tableint id) const {
    return inner_product_fn_(query, vector(id), &dim_);
  }

  void write(tableint id, const float* vector) {
    if (id < base_count_) copied_ += vector_bytes_;  // a private copy of the file's page
    std::memcpy(const_cast<float*>(this->vector(id)), vector, vector_bytes_);
  }

  void resize(size_t capacity) {
    size_t bytes = tail_size(capacity);
    void* tail = mremap(tail_, tail_bytes_, bytes, MREMAP_MAYMOVE);
    if (tail == MAP_FAILED) throw std::bad_alloc();
    tail_ = static_cast<char*>(tail);
    tail_bytes_ = bytes;
  }

  // Reads ids below `count` from now on from the open file `fd` (file_bytes
  // long), whose vector i starts at offset + i * stride, and hands the
  // anonymous pages that held them back to the kernel.
  void adopt(int fd, size_t file_bytes, size_t offset, size_t stride, size_t count) {
    if (count > 0 && (offset + (count - 1) * stride + vector_bytes_ > file_bytes)) {
      throw std::runtime_error("the index file is too short for its vectors");
    }
    void* map = nullptr;
    if (count > 0) {
      map = mmap(nullptr, file_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      if (map == MAP_FAILED) {
        throw std::runtime_error(std::string("cannot map the index file: ") + std::strerror(errno));
      }
      // A re-rank reads scattered vectors: read-ahead would only fill the
      // page cache with neighbours nobody asked for.
      madvise(map, file_bytes, MADV_RANDOM);
    }
    release_base();
    base_map_ = static_cast<char*>(map);
    base_map_bytes_ = count > 0 ? file_bytes : 0;
    base_ = base_map_ + offset;
    base_stride_ = stride;
    base_count_ = count;
    copied_ = 0;
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    size_t drop = std::min(tail_bytes_, count * vector_bytes_ / page * page);
    if (drop > 0) madvise(tail_, drop, MADV_DONTNEED);
  }

  // RAM these vectors hold (anonymous pages), not the file's page cache.
  size_t ram_bytes(size_t elements) const {
    return (elements > base_count_ ? elements - base_count_ : 0) * vector_bytes_ + copied_.load();
  }

  // Counts add batches (finished or failed), so save() can tell whether
  // the vectors changed between writing a file and mapping it.
  std::atomic<uint64_t> writes{0};
  uint64_t batches_written() const { return writes.load(); }

 private:
  size_t tail_size(size_t capacity) const {
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    size_t bytes = std::max<size_t>(capacity, 1) * vector_bytes_;
    return (bytes + page - 1) / page * page;
  }

  void release_base() {
    if (base_map_ != nullptr) munmap(base_map_, base_map_bytes_);
    base_map_ = nullptr;
    base_map_bytes_ = 0;
  }

  size_t dim_;
  size_t vector_bytes_;
  hnswlib::InnerProductSpace inner_product_;
  hnswlib::DISTFUNC<float> inner_product_fn_ = inner_product_.get_dist_func();
  char* tail_ = nullptr;
  size_t tail_bytes_ = 0;
  char* base_map_ = nullptr;
  size_t base_map_bytes_ = 0;
  const char* base_ = nullptr;
  size_t base_stride_ = 0;
  size_t base_count_ = 0;
  std::atomic<size_t> copied_{0};
};

}  // namespace rag
