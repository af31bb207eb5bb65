// Quantized KV caches (int8, float8 e4m3fn, float8 e5m2): the writer that quantizes new key and
// value rows as they enter a cache. The attention kernels read such a cache through
// cpu/attention_kernel.h's QuantizedRows and dequantize it block by block (cpu/flash/dequantize.h).
//
// Per row x (one cached position of one key/value head, D elements):
//   s = max_d |x_d| / top            (float32; top = 127 int8, 448 e4m3fn, 57344 e5m2)
//   stored_d = round-to-nearest-even(x_d / s), saturated to [-top, top]   (x_d / s in float32)
// and the row reads back as stored_d * s. s = 0 (an all-zero row, or one so small that s
// underflows) stores zeros and scale 0. A row holding inf or NaN stores zeros and scale NaN: it
// reads back as NaN, as no finite code and scale can hold it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "cpu/attention_kernel.h"

namespace qkv_attention::cpu {

// The quantized storage of a cache dtype; nullopt for a dtype that is not one (float caches).
std::optional<CacheStorage> quantized_storage_of(at::ScalarType dtype);

// The largest magnitude a code of `storage` holds: 127 (int8), 448 (e4m3fn), 57344 (e5m2).
float quantized_top(CacheStorage storage);

// Quantizes rows (H, N, D) of a floating dtype into stored (H, N, D) of int8, float8_e4m3fn or
// float8_e5m2 and their scales (H, N) of float32, written in place (any strides; the three
// tensors must not overlap). Rows are independent: the result is the same for any thread count.
void quantize_rows(const at::Tensor& rows, const at::Tensor& stored, const at::Tensor& scales);

}  // namespace qkv_attention::cpu
