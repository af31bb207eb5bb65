// Output tensors with pages of their own from 16 MiB up (see large_tensor.h).
#include "cpu/large_tensor.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/safe_numerics.h>

#include <new>

#include "cpu/large_buffer.h"

namespace qkv_attention::cpu {
namespace {

#if QKV_HAVE_MMAP
// A c10 allocator whose every block is one anonymous mapping. The mapping's length travels in
// the DataPtr's context, which the deleter frees with it.
class MappedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, nullptr, &unmap, c10::Device(c10::DeviceType::CPU)};
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | LargeBuffer<char>::kPopulate, -1, 0);
    if (data == MAP_FAILED) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "qkv_attention: could not map ", bytes,
                       " bytes for an output tensor");
    }
    return {data, new Mapping{data, bytes}, &unmap, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Mapping {
    void* data;
    size_t bytes;
  };
  static void unmap(void* context) {
    if (context == nullptr) return;
    const Mapping* mapping = static_cast<Mapping*>(context);
    munmap(mapping->data, mapping->bytes);
    delete mapping;
  }
};
#endif

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if QKV_HAVE_MMAP
  // The byte count, computed without wrapping: a product that overflows goes to at::empty,
  // which raises for it (the ops' size checks normally reject such sizes first).
  uint64_t bytes = options.dtype().itemsize();
  bool overflows = false;
  for (const int64_t size : sizes) {
    overflows = overflows || size < 0 || c10::mul_overflows(bytes, uint64_t(size), &bytes);
  }
  if (!overflows && bytes >= LargeBuffer<char>::kMapFrom) {
    static MappedAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()),
                                     c10::MemoryFormat::Contiguous);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace qkv_attention::cpu
