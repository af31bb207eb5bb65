// A zero-initialised array for the attention kernels' temporaries (packed operands, partial
// sums, per-thread scratch); the large ones get pages straight from the OS (mmap), which go
// back to it when the buffer dies.
//
// Why not std::vector: glibc raises its mmap threshold to the size of any mmapped block that
// is freed (up to 32 MiB). Freeing one of our 16 MiB buffers made every later 16 MiB tensor of
// the training step come from the brk heap, whose freed holes are not given back: measured
// +45 MiB of peak resident memory for MultiheadAttention forward+backward at L = 8192, E = 512
// (and +140 MiB still resident afterwards). With its own pages a buffer leaves malloc alone.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define QKV_HAVE_MMAP 1
#endif

namespace qkv_attention::cpu {

template <typename T>
class LargeBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "LargeBuffer holds plain values");

 public:
  // From 16 MiB up (the sequence-sized buffers of long sequences). Smaller ones come from
  // malloc, whose heap reuses them call after call: mapping and unmapping fresh zeroed pages for
  // every call cost ~10% of a forward at L = 128.
  static constexpr size_t kMapFrom = size_t(16) << 20;  // bytes
#if defined(MAP_POPULATE)
  // The buffers are written at once: one call maps all their pages instead of a fault each.
  static constexpr int kPopulate = MAP_POPULATE;
#else
  static constexpr int kPopulate = 0;
#endif

  LargeBuffer() = default;
  explicit LargeBuffer(size_t count) { allocate(count); }
  LargeBuffer(const LargeBuffer&) = delete;
  LargeBuffer& operator=(const LargeBuffer&) = delete;
  LargeBuffer(LargeBuffer&& other) noexcept { swap(other); }
  LargeBuffer& operator=(LargeBuffer&& other) noexcept {
    LargeBuffer(std::move(other)).swap(*this);
    return *this;
  }
  ~LargeBuffer() { release(); }

  // Replaces the contents with `count` zeros.
  void assign_zeros(size_t count) {
    release();
    allocate(count);
  }
  void release() {
    if (data_ == nullptr) return;
#if QKV_HAVE_MMAP
    if (mapped_) {
      munmap(data_, bytes_);
    } else {
      std::free(data_);
    }
#else
    std::free(data_);
#endif
    data_ = nullptr;
    count_ = bytes_ = 0;
    mapped_ = false;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  void allocate(size_t count) {
    if (count == 0) return;
    bytes_ = count * sizeof(T);
#if QKV_HAVE_MMAP
    if (bytes_ >= kMapFrom) {
      void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | kPopulate, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      data_ = static_cast<T*>(p);  // anonymous pages are zero
      mapped_ = true;
      count_ = count;
      return;
    }
#endif
    data_ = static_cast<T*>(std::calloc(count, sizeof(T)));
    if (data_ == nullptr) throw std::bad_alloc();
    count_ = count;
  }
  void swap(LargeBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
    std::swap(bytes_, other.bytes_);
    std::swap(mapped_, other.mapped_);
  }

  T* data_ = nullptr;
  size_t count_ = 0, bytes_ = 0;
  bool mapped_ = false;
};

}  // namespace qkv_attention::cpu
