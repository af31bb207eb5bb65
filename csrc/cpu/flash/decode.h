// Split-KV ("flash-decoding") forward for few queries against many keys: the decoding step of
// text generation, where one query row per head meets the whole key/value history. The keys are
// cut into chunks of kDecodeChunk; one task per (batch, key/value head, chunk) reads its chunk of
// K and V once, in place (only the chunk is repacked, in the task's own scratch), for all the
// query heads of its group and all their query rows, and leaves a partial output and its
// logsumexp. The partials are then merged exactly, in chunk order:
//   lse = log (exp(sink) + sum_c exp(lse_c)),   out = sum_c exp(lse_c - lse) * out_c,
// the sink term only with attention sinks: it enters once, here. Only the chunks holding keys
// that some query row may see (causality, the sliding window) are read: a window of W keys over
// a long cache reads about W keys per row.
// A quantized cache's chunk is dequantized into the task's scratch as it is read (the same
// buffers a chunk of another dtype is converted into), or at the avx512 level multiplied
// straight from its codes (cpu/flash/avx512_kv_decode.h): no dequantized copy of the cache
// exists.
// The chunking depends on the shape only, so results are bitwise the same for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/attention_kernel.h"
#include "cpu/flash/blocking.h"
#include "cpu/flash/dropout_bits.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/flash/operands.h"
#include "cpu/flash/row_masks.h"
#include "cpu/flash/score_terms.h"
#include "cpu/flash/workspace.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/flash/avx512_kv_decode.h"
#endif

QKV_FLASH_LEVEL_BEGIN

constexpr int64_t kDecodeChunk = 256;  // keys per task
constexpr int64_t kDecodeMaxQueries = 16;

// Whether the forward takes the split-KV path: few queries, enough keys for several chunks,
// and no weights to return (the weights path wants whole rows).
template <typename T>
bool use_split_kv(const AttentionForwardParams<T>& p) {
  return p.weights == nullptr && p.q_len >= 1 && p.q_len <= kDecodeMaxQueries &&
         p.kv_len > 2 * kDecodeChunk && p.head_dim > 0;
}

template <typename T, class Ops>
void flash_decode(const AttentionForwardParams<T>& p) {
  using Acc = typename Ops::acc_t;
  using Elem = typename Ops::b_elem;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const int64_t B = p.batch, H = p.heads, L = p.q_len, S = p.kv_len;
  const int64_t D = p.head_dim, Dv = p.value_dim;
  const int64_t Hkv = p.kv_heads, G = p.group_size();
  const int64_t M = G * L;  // rows of one task: the group's query heads x their query rows
  const bool dropout = p.dropout_p > 0;
  const DropoutKey dropout_key = DropoutKey::make(p.seed, p.offset, p.dropout_p);
  const RowMasks<T, Acc> masks(p);
  const ScoreTerms<T, Acc> terms(p);
  // The chunks first_chunk .. first_chunk + chunks hold every key some row may see.
  const int64_t Sc = kDecodeChunk;
  int64_t first_chunk = 0, last_chunk = 0;
  terms.band().key_blocks(0, L, Sc, first_chunk, last_chunk);
  const int64_t chunks = last_chunk - first_chunk;

  // K read in place when it already is Acc with unit column stride; V too when the level's GEMM
  // takes a plain row-major B. Quantized K and V are dequantized chunk by chunk.
  constexpr bool kSameType = std::is_same_v<T, Acc>;
  const bool key_in_place = kSameType && !p.quantized_key.quantized() && p.key_strides.col == 1;
  const bool value_in_place = kSameType && Ops::kPlainB && !p.quantized_value.quantized() &&
                              p.value_strides.col == 1 && p.value_strides.row >= Dv;
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kFromCodes = std::is_same_v<Acc, float>;
#else
  constexpr bool kFromCodes = false;
#endif
  const bool key_from_codes =
      kFromCodes && p.quantized_key.quantized() && (p.key_strides.col == 1 || D <= 1);
  const bool value_from_codes =
      kFromCodes && p.quantized_value.quantized() && (p.value_strides.col == 1 || Dv <= 1);

  const int64_t value_ld = Ops::packed_ld(Dv);
  const int64_t vp_size = Ops::packed_size(Sc, Dv);
  // Per slot: query rows (M x D), scores (M x Sc), converted K and V chunks, the partial output
  // (M x Dv), per-row max and sum, gathered masks (2 x Sc), keep bits.
  const int64_t slot_size =
      M * D + M * Sc + Sc * D + Sc * Dv + M * Dv + 2 * M + 2 * Sc + keep_cells<Acc>(Sc);
  // Partial outputs, (B, H, L, chunks, Dv), and their logsumexps, (B, H, L, chunks).
  LargeBuffer<Acc> part_out(size_t(std::max<int64_t>(B * H * L * chunks * Dv, 1)));
  LargeBuffer<Acc> part_lse(size_t(std::max<int64_t>(B * H * L * chunks, 1)));

  TaskPool pool(B * Hkv * chunks);
  Scratch<Acc> scratch(pool.slots(), slot_size);
  LargeBuffer<Elem> panels(size_t(pool.slots() * vp_size));
  pool.run([&](int64_t task, int64_t slot) {
    const int64_t kv_bh = task / chunks, c = task % chunks;  // c counts from first_chunk
    const int64_t b = kv_bh / Hkv, hkv = kv_bh % Hkv, h0 = hkv * G;
    const int64_t j0 = (first_chunk + c) * Sc, nk = std::min(Sc, S - j0);
    Acc* q_buf = scratch.slot(slot);
    Acc* scores = q_buf + M * D;
    Acc* k_buf = scores + M * Sc;
    Acc* v_buf = k_buf + Sc * D;
    Acc* out = v_buf + Sc * Dv;
    Acc* row_max = out + M * Dv;
    Acc* row_sum = row_max + M;
    Acc* gathered = row_sum + M;
    uint64_t* keep = keep_bits_at(gathered + 2 * Sc);
    Elem* vp = panels.data() + slot * vp_size;

    // (G, L, D): the query rows of the group, as Acc.
    const Strides4& qs = p.query_strides;
    for (int64_t r = 0; r < M; ++r) {
      const int64_t h = h0 + r / L, i = r % L;
      convert_row<Ops>(p.query + b * qs.batch + h * qs.head + i * qs.row, qs.col, D, q_buf + r * D);
    }
    // Scores = Q K^T over the chunk as dot products: K is read once, in place when it is
    // already Acc (a transposed copy would cost a strided gather per element).
    const Strides4& ks = p.key_strides;
    const Acc* key_rows = k_buf;
    int64_t key_ld = D;
    if constexpr (kSameType) {
      if (key_in_place) {
        key_rows = reinterpret_cast<const Acc*>(p.key + b * ks.batch + hkv * ks.head + j0 * ks.row);
        key_ld = ks.row;
      }
    }
    if (key_from_codes) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kFromCodes) {
        avx512_quantized_scores(p.quantized_key.rows(ks, b, hkv, j0), M, nk, D, q_buf, scores, Sc);
      }
#endif
    } else {
      if (!key_in_place) load_rows<Ops>(p.key, p.quantized_key, ks, b, hkv, j0, nk, D, k_buf);
      Ops::dot_scores(M, nk, D, q_buf, key_rows, key_ld, scores, Sc);
    }

    // Masked scores, then P = exp(s - m) per row; a row that sees no key of the chunk has l = 0.
    for (int64_t r = 0; r < M; ++r) {
      const int64_t h = h0 + r / L, i = r % L, row = (b * H + h) * L + i;
      Acc* s_row = scores + r * Sc;
      MaskSegment<T, Acc> segments[AttentionInputs<T>::kMasks];
      RowScores<Acc> rs = terms.row(b, h, i, j0, nk);
      const int count = masks.segments(b, h, i, j0, nk, segments, gathered, rs.bias, rs.valid);
      const Acc m = Ops::prepare_row(s_row, nk, rs, segments, count);
      row_max[r] = m == kNegInf ? Acc(0) : m;  // exp relative to a finite value
      if (dropout) Ops::keep_bits(dropout_key, uint64_t(row * S + j0), nk, keep);
      row_sum[r] = Ops::exp_row(s_row, nk, row_max[r], dropout ? keep : nullptr);
    }

    // Out = P V over the chunk; V read once, in place when the GEMM can take it as it is.
    const Strides4& vs = p.value_strides;
    const Elem* value_b = nullptr;
    int64_t value_b_ld = value_ld;
    if constexpr (kSameType && Ops::kPlainB) {
      if (value_in_place) {
        value_b =
            reinterpret_cast<const Elem*>(p.value + b * vs.batch + hkv * vs.head + j0 * vs.row);
        value_b_ld = vs.row;
      }
    }
    if (value_from_codes) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kFromCodes) {
        avx512_quantized_values(p.quantized_value.rows(vs, b, hkv, j0), M, nk, Dv, scores, Sc, out,
                                Dv);
      }
#endif
    } else if (value_b == nullptr) {
      load_rows<Ops>(p.value, p.quantized_value, vs, b, hkv, j0, nk, Dv, v_buf);
      if constexpr (Ops::kPlainB) {
        value_b = reinterpret_cast<const Elem*>(v_buf);
        value_b_ld = Dv;
      } else {
        Ops::pack_b(v_buf, Dv, 1, nk, Dv, vp, value_ld);
        value_b = vp;
      }
    }
    if (!value_from_codes) Ops::gemm(M, Dv, nk, scores, Sc, 1, value_b, value_b_ld, out, Dv, false);

    // The chunk's partial output (normalised by its own sum) and logsumexp.
    for (int64_t r = 0; r < M; ++r) {
      const int64_t h = h0 + r / L, i = r % L, row = (b * H + h) * L + i;
      const Acc l = row_sum[r];
      Acc* dst = part_out.data() + (row * chunks + c) * Dv;
      if (l == Acc(0)) {
        std::fill(dst, dst + Dv, Acc(0));
        part_lse[row * chunks + c] = kNegInf;
        continue;
      }
      for (int64_t d = 0; d < Dv; ++d) dst[d] = out[r * Dv + d] / l;
      part_lse[row * chunks + c] = row_max[r] + std::log(l);
    }
  });

  // Merge, per query row, in chunk order, the sink first. NaN in any chunk's logsumexp gives
  // NaN out.
  const Acc kept_scale = static_cast<Acc>(kept_scale_of(p.dropout_p));
  at::parallel_for(0, B * H * L, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const Acc* lse = part_lse.data() + row * chunks;
      const Acc sink = terms.sink(row / L % H);
      Acc top = sink;
      bool nan = false;
      for (int64_t c = 0; c < chunks; ++c) {
        nan = nan || std::isnan(lse[c]);
        top = lse[c] > top ? lse[c] : top;
      }
      T* out_row = p.output + row * Dv;
      if (top == kNegInf && !nan) {  // no chunk saw a key, and no sink
        std::fill(out_row, out_row + Dv, T(0));
        p.logsumexp[row] = kNegInf;
        continue;
      }
      Acc total = sink == kNegInf ? Acc(0) : std::exp(sink - top);
      for (int64_t c = 0; c < chunks; ++c) total += std::exp(lse[c] - top);
      const Acc row_lse = nan ? std::numeric_limits<Acc>::quiet_NaN() : top + std::log(total);
      if (chunks == 0) {  // only the sink: no value
        std::fill(out_row, out_row + Dv, T(0));
        p.logsumexp[row] = row_lse;
        continue;
      }
      Acc* acc = part_out.data() + row * chunks * Dv;  // chunk 0's slot gathers the sum
      const Acc w0 = std::exp(lse[0] - row_lse);
      for (int64_t d = 0; d < Dv; ++d) acc[d] *= w0;
      for (int64_t c = 1; c < chunks; ++c) {
        const Acc w = std::exp(lse[c] - row_lse);
        const Acc* part = acc + c * Dv;
        for (int64_t d = 0; d < Dv; ++d) acc[d] += w * part[d];
      }
      Ops::from_acc(acc, Dv, kept_scale, out_row);
      p.logsumexp[row] = row_lse;
    }
  });
}

QKV_FLASH_LEVEL_END
