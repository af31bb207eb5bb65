// Whether tensors that are written in place can share elements, decided exactly.
//
// ATen's overlap checks (ATen/MemoryOverlap.h) answer "too hard" for tensors that are not
// dense: two interleaved halves of one K|V buffer, a slice of a longer cache, the same slice
// passed twice. A writer that accepted those unchecked could write one element twice or land
// one cache's write on the other's entries. Here "too hard" is settled: first by cheap
// sufficient conditions (different storages, disjoint address ranges, strides that nest), then,
// only when those cannot decide, by marking the elements of one tensor in a bitmap of the
// address range and testing the other's.
#pragma once

#include <ATen/core/Tensor.h>

namespace qkv_attention::cpu {

// Whether two elements of `t` share memory (a written tensor must own each element once).
bool has_repeated_elements(const at::Tensor& t);

// Whether an element of `a` and an element of `b` share memory.
bool share_elements(const at::Tensor& a, const at::Tensor& b);

}  // namespace qkv_attention::cpu
