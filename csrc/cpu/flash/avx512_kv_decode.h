// The decoding step over a quantized KV cache at the avx512 level (cpu/flash/decode.h): the two
// products of a chunk, computed straight from the stored codes. Each code row is read once,
// decoded and multiplied by its row's scale in registers, and used for every query row of the
// group: no dequantized copy of the chunk is written and read back, which made the step
// compute-bound at a quarter of the memory bandwidth (perf: dequantizing into the task's scratch
// took half the step, the dot products a third).
//
// The logical value of a code is float32(decode(code) * scale), the value the generic path
// (cpu/flash/dequantize.h) stores. Here the scale, the same for a whole row, is taken out of the
// sums: a score is (q . decoded codes) * scale, and a value row enters the output with weight
// p * scale. The results equal the generic path's to float32 rounding, not bitwise (one
// multiplication per key instead of one per element: an eighth of the work at D = 128).
// Nothing here is called unless cpu/flash/levels.cpp found AVX-512 on the CPU.
#pragma once

#include <cstdint>

#include "cpu/attention_kernel.h"

namespace qkv_attention::cpu::flash {

// scores[r * ld_scores + j] = q_r . value_j for r < M, j < n; q is M x D, rows contiguous.
// The chunks (QuantizedRows::rows) here have unit column stride.
void avx512_quantized_scores(const QuantizedChunk& keys, int64_t M, int64_t n, int64_t D,
                             const float* q, float* scores, int64_t ld_scores);

// out[r * ld_out + d] = sum_j p[r * ld_p + j] * value_j[d] for r < M, d < Dv (overwritten).
void avx512_quantized_values(const QuantizedChunk& values, int64_t M, int64_t n, int64_t Dv,
                             const float* p, int64_t ld_p, float* out, int64_t ld_out);

}  // namespace qkv_attention::cpu::flash
