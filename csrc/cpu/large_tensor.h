// Output tensors of the CPU kernels. From LargeBuffer's 16 MiB up they get pages of their own
// (mmap), given back to the OS when the tensor dies; smaller ones come from ATen's allocator.
//
// Why: the ops' outputs at long sequences are 16 MiB tensors (one (B, H, L, D) block each of q,
// k, v, their gradients, the attention output ...). Through malloc, freeing the first of them
// raises glibc's mmap threshold to its size, and every later one lands on the brk heap, whose
// holes stay resident (see large_buffer.h): measured 246 MiB of peak resident memory added by
// a MultiheadAttention training step at L = 8192, E = 512, against 154 MiB actually live.
#pragma once

#include <ATen/core/Tensor.h>

namespace qkv_attention::cpu {

// at::empty(sizes, options) for a CPU tensor, contiguous.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace qkv_attention::cpu
