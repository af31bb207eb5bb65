// The blocked ("flash") attention forward on the CPU, templated over the element type T and a
// set of building blocks Ops (vec_ops.h, or the avx512 level's set in level_kernels.h).
//
// Per task = (batch*head, block of Bq queries): for each block of Bk keys, the Bq x Bk scores (a
// GEMM against the prepacked K^T panel), masks, then an online softmax (running max m and sum l
// per row, the output accumulator rescaled when m grows) and O += P V (a GEMM). Only Bq x Bk
// scores exist at a time; the logsumexp m + log(l) is saved for the backward. Key blocks that
// causality or the sliding window hide from a whole block of queries are skipped (blocking.h's
// KeyBand). With attention sinks, every row's softmax starts from its sink: m = sink, l = 1
// (the sink's exp), no value. When the weights are requested, the whole (Bq x S) rows of
// scores are computed once into them, and the output is multiplied from the weights; averaged
// over the heads, a task runs one block of queries of every head of a batch entry and sums
// their rows, so no per-head (B, H, L, S) tensor exists. With grouped-query attention the query
// heads of a group read the same packed key/value panels.
//
// A quantized key or value (a KV cache of int8 or float8) is dequantized block by block into the
// packed K^T and V panels (dequantize.h); a bfloat16 one is packed straight from its rows where
// the op set takes them (the AMX set).
//
// Few queries against many keys take the split-KV path of decode.h instead.
//
// Dropout: element n = ((b * H + h) * L + i) * S + j of the Philox stream (cpu/philox.h), the
// numbering _attention_dropout_mask uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/attention_kernel.h"
#include "cpu/flash/blocking.h"
#include "cpu/flash/decode.h"
#include "cpu/flash/dropout_bits.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/flash/operands.h"
#include "cpu/flash/row_masks.h"
#include "cpu/flash/score_terms.h"
#include "cpu/flash/workspace.h"

QKV_FLASH_LEVEL_BEGIN

template <typename T, class Ops>
void flash_forward(const AttentionForwardParams<T>& p) {
  using Acc = typename Ops::acc_t;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const int64_t B = p.batch, H = p.heads, L = p.q_len, S = p.kv_len;
  const int64_t D = p.head_dim, Dv = p.value_dim, BH = B * H;
  const int64_t Hkv = p.kv_heads, group = p.group_size();
  Acc* logsumexp = p.logsumexp;
  if (BH == 0 || L == 0) return;
  if (S == 0) {  // no key at all: every row is empty (its logsumexp is the sink, if any)
    std::fill(p.output, p.output + BH * L * Dv, T(0));
    const ScoreTerms<T, Acc> terms(p);
    for (int64_t bh = 0; bh < BH; ++bh) {
      std::fill(logsumexp + bh * L, logsumexp + (bh + 1) * L, terms.sink(bh % H));
    }
    return;
  }
  // Few queries, many keys: the split-KV path. Also from a second chunk of keys on: there it
  // reads K in place and packs V chunk by chunk, where the blocked path below would pack K^T and
  // V whole for a handful of rows (one query, H 8 / Hkv 2, S 512, one thread: 48 us against
  // SDPA's 37, the packing a third of it).
  const bool few_queries = p.weights == nullptr && L <= kDecodeMaxQueries && S > kDecodeChunk;
  if (use_split_kv(p) || few_queries) return flash_decode<T, Ops>(p);
  const Blocking blocking = forward_blocking<Ops>(p);
  const int64_t Bq = blocking.queries, Bk = blocking.keys;
  const int64_t query_blocks = ceil_div(L, Bq), key_blocks = ceil_div(S, Bk);

  // K^T and V per key block, as the GEMMs' B operands (a quantized cache's rows dequantized
  // block by block into them).
  auto key_blocks_of = [&] {
    if (p.quantized_key.quantized()) {
      return BOperands<Ops>::quantized_blocks(p.quantized_key, p.key_strides, B, Hkv, S, D, Bk,
                                              /*transposed=*/true);
    }
    if constexpr (packs_bf16_rows<Ops, T>()) {
      if (p.key_strides.col == 1) {
        return BOperands<Ops>::bf16_blocks(p.key, p.key_strides, B, Hkv, S, D, Bk,
                                           /*transposed=*/true);
      }
    }
    LargeBuffer<Acc> key_storage;  // released once packed
    const RowsView<Acc> key_rows =
        operand_rows<Ops>(p.key, p.key_strides, B, Hkv, S, D, key_storage);
    return BOperands<Ops>::transposed_blocks(key_rows, B, Hkv, S, D, Bk);
  };
  const auto key_t = key_blocks_of();
  LargeBuffer<Acc> value_storage;  // what the value blocks may view
  auto value_blocks_of = [&] {
    if (p.quantized_value.quantized()) {
      return BOperands<Ops>::quantized_blocks(p.quantized_value, p.value_strides, B, Hkv, S, Dv, Bk,
                                              /*transposed=*/false);
    }
    if constexpr (packs_bf16_rows<Ops, T>()) {
      if (p.value_strides.col == 1) {
        return BOperands<Ops>::bf16_blocks(p.value, p.value_strides, B, Hkv, S, Dv, Bk,
                                           /*transposed=*/false);
      }
    }
    return BOperands<Ops>::row_blocks(
        operand_rows<Ops>(p.value, p.value_strides, B, Hkv, S, Dv, value_storage), B, Hkv, S, Dv,
        Bk);
  };
  const auto values = value_blocks_of();

  const Acc kept_scale = static_cast<Acc>(kept_scale_of(p.dropout_p));
  const bool dropout = p.dropout_p > 0;
  const DropoutKey dropout_key = DropoutKey::make(p.seed, p.offset, p.dropout_p);
  const RowMasks<T, Acc> masks(p);
  const ScoreTerms<T, Acc> terms(p);
  const KeyBand& band = terms.band();

  // Per slot: scores (Bq x Bk), output accumulator (Bq x Dv), query rows (Bq x D), row max, row
  // sum and block max (Bq each), gathered masks (2 x Bk), keep bits. With weights requested,
  // also the rows' scores as Acc (Bq x S) unless they live in the weights output itself (per
  // head and T == Acc); averaged over the heads, also the running sum over the heads (Bq x S).
  constexpr bool kWeightsInPlace = std::is_same_v<T, Acc>;
  // With an op set that multiplies bfloat16 A operands (the AMX set), the online softmax writes
  // P as bfloat16 (Bq x Bk more, after the keep bits), which the P V GEMM reads as it is.
  constexpr bool kBf16Probabilities = requires { Ops::kTakesBf16A; };
  const bool average = p.weights != nullptr && p.average_weights;
  const int64_t block_size = Bq * Bk + Bq * Dv + Bq * D + 3 * Bq + 2 * Bk + keep_cells<Acc>(Bk) +
                             (kBf16Probabilities ? ceil_div(Bq * Bk, 2) : 0);
  const int64_t weights_cells = p.weights == nullptr ? 0
                                : average            ? 2 * Bq * S
                                : kWeightsInPlace    ? 0
                                                     : Bq * S;
  // Tasks are (batch*head, block of queries); with averaged weights (batch, block of queries),
  // the task running the heads in order, so that the sum over the heads has one order whatever
  // the thread count.
  const int64_t row_groups = average ? B : BH;
  TaskPool pool(row_groups * query_blocks);
  Scratch<Acc> scratch(pool.slots(), block_size + weights_cells);

  // One query head's block of queries i0 .. i0 + nq: its output rows and logsumexp, and with
  // rows given, its weights (after dropout) in rows (nq x S, row stride S).
  auto attend_block = [&](int64_t bh, int64_t i0, int64_t nq, Acc* slot, Acc* rows) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t kv_bh = b * Hkv + h / group;  // the key/value head this query head reads
    Acc* scores = slot;
    Acc* out_acc = scores + Bq * Bk;
    Acc* q_buf = out_acc + Bq * Dv;
    Acc* row_max = q_buf + Bq * D;
    Acc* row_sum = row_max + Bq;
    Acc* block_max = row_sum + Bq;
    Acc* gathered = block_max + Bq;
    uint64_t* keep = keep_bits_at(gathered + 2 * Bk);
    // P as bfloat16 (Bq x Bk), with kBf16Probabilities.
    uint16_t* probs = reinterpret_cast<uint16_t*>(gathered + 2 * Bk + keep_cells<Acc>(Bk));

    int64_t ldq = 0;
    const Acc* q = rows_as_acc<Ops>(p.query, p.query_strides, b, h, i0, nq, D, q_buf, ldq);
    // The softmax starts from the sink (m = sink, l = exp(sink - m) = 1) or from nothing.
    const Acc sink = terms.sink(h);
    std::fill(row_max, row_max + nq, sink);
    std::fill(row_sum, row_sum + nq, sink == kNegInf ? Acc(0) : Acc(1));
    std::fill(out_acc, out_acc + nq * Dv, Acc(0));
    int64_t first_block = 0, last_block = 0;  // the key blocks these rows see
    band.key_blocks(i0, nq, Bk, first_block, last_block);

    // Scores of keys c0 .. nc of block kb for every row, masked, into dst + c0 (dst: the
    // block's first column, row stride ld); row maxima to block_max. Returns nc (keys past it
    // are hidden from all rows by position).
    auto block_scores = [&](int64_t kb, int64_t c0, Acc* dst, int64_t ld) {
      const int64_t j0 = kb * Bk, nc = band.columns(i0, nq, j0, std::min(Bk, S - j0));
      Ops::gemm(nq, nc - c0, D, q, ldq, 1, key_t.at(kv_bh, kb) + c0 * Ops::kColumnStride,
                key_t.ld(), dst + c0, ld, false);
      for (int64_t r = 0; r < nq; ++r) {
        MaskSegment<T, Acc> segments[AttentionInputs<T>::kMasks];
        RowScores<Acc> row = terms.row(b, h, i0 + r, j0 + c0, nc - c0);
        const int count =
            masks.segments(b, h, i0 + r, j0 + c0, nc - c0, segments, gathered, row.bias, row.valid);
        block_max[r] = Ops::prepare_row(dst + r * ld + c0, nc - c0, row, segments, count);
      }
      return nc;
    };

    // Weights requested: the (nq x S) rows exist anyway, so the scores are computed once, into
    // them: softmax over whole rows, then out = W V from there, instead of an online softmax
    // and a second pass for the weights.
    if (rows != nullptr) {
      for (int64_t kb = 0; kb < key_blocks; ++kb) {
        const int64_t j0 = kb * Bk, nk = std::min(Bk, S - j0);
        const bool seen = kb >= first_block && kb < last_block;
        const int64_t nc = seen ? block_scores(kb, 0, rows + j0, S) : 0;
        for (int64_t r = 0; r < nq; ++r) {
          Acc* hidden = rows + r * S + j0;
          std::fill(hidden + nc, hidden + nk, kNegInf);
          if (nc > 0 && block_max[r] > row_max[r]) row_max[r] = block_max[r];
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t row = bh * L + i0 + r;
        Acc* w = rows + r * S;
        // row_max started from the sink; the sink's exp starts the sum.
        const Acc m_use = row_max[r] == kNegInf ? Acc(0) : row_max[r];
        Acc l = sink == kNegInf ? Acc(0) : std::exp(sink - m_use);
        for (int64_t j0 = 0; j0 < S; j0 += Bk) {  // block by block: the keep bits of Bk keys
          const int64_t nk = std::min(Bk, S - j0);
          if (dropout) Ops::keep_bits(dropout_key, uint64_t(row * S + j0), nk, keep);
          l += Ops::exp_row(w + j0, nk, m_use, dropout ? keep : nullptr);
        }
        // A row with l = 0 saw no key and has no sink: zero weights (exp of -inf), zero output,
        // lse -inf. With a sink but no key: zero weights and output, lse = sink.
        logsumexp[row] = l == Acc(0) ? kNegInf : m_use + std::log(l);
        Ops::from_acc(w, S, l == Acc(0) ? Acc(0) : kept_scale / l, w);
      }
      for (int64_t kb = first_block; kb < last_block; ++kb) {
        const int64_t j0 = kb * Bk, nk = std::min(Bk, S - j0);
        Ops::gemm(nq, Dv, nk, rows + j0, S, 1, values.at(kv_bh, kb), values.ld(), out_acc, Dv,
                  true);
      }
      for (int64_t r = 0; r < nq; ++r) {
        Ops::from_acc(out_acc + r * Dv, Dv, Acc(1), p.output + (bh * L + i0 + r) * Dv);
      }
      return;
    }

    for (int64_t kb = first_block; kb < last_block; ++kb) {
      // Keys before the first row's window are hidden from every row: the block is taken from
      // the vector boundary (16 keys) at or before the first key a row may see, so that a
      // window's first block costs its visible part only.
      const int64_t j0 = kb * Bk, c0 = std::max<int64_t>(band.begin(i0) - j0, 0) / 16 * 16;
      const int64_t nk = block_scores(kb, c0, scores, Bk), width = nk - c0;
      if (width <= 0) continue;
      for (int64_t r = 0; r < nq; ++r) {
        const Acc m_old = row_max[r];
        const Acc m_new = block_max[r] > m_old ? block_max[r] : m_old;
        // exp is taken relative to a finite value, 0 while the row has seen only -inf.
        const Acc m_use = m_new == kNegInf ? Acc(0) : m_new;
        const Acc alpha = m_old == kNegInf ? Acc(0) : std::exp(m_old - m_use);
        if (dropout) {
          Ops::keep_bits(dropout_key, uint64_t((bh * L + i0 + r) * S + j0 + c0), width, keep);
        }
        Acc sum;
        if constexpr (kBf16Probabilities) {
          sum = Ops::exp_row_bf16(scores + r * Bk + c0, width, m_use, dropout ? keep : nullptr,
                                  probs + r * Bk);
        } else {
          sum = Ops::exp_row(scores + r * Bk + c0, width, m_use, dropout ? keep : nullptr);
        }
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = m_new;
        if (alpha != Acc(1)) {
          Acc* o = out_acc + r * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
        }
      }
      if constexpr (kBf16Probabilities) {
        Ops::gemm_bf16_a(nq, Dv, width, probs, Bk, values.at(kv_bh, kb) + c0 * values.ld(),
                         values.ld(), out_acc, Dv, true);
      } else {
        Ops::gemm(nq, Dv, width, scores + c0, Bk, 1, values.at(kv_bh, kb) + c0 * values.ld(),
                  values.ld(), out_acc, Dv, true);
      }
    }

    // out = acc / l (times the dropout scale); logsumexp = m + log(l). A row with l = 0 saw no
    // key and has no sink: zeros and -inf (with a sink and no key: l = 1, zeros and the sink).
    // NaN in l (a NaN score) gives NaN out.
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t row = bh * L + i0 + r;
      const Acc l = row_sum[r];
      T* out_row = p.output + row * Dv;
      if (l == Acc(0)) {
        std::fill(out_row, out_row + Dv, T(0));
        logsumexp[row] = kNegInf;
        continue;
      }
      const Acc m_use = row_max[r] == kNegInf ? Acc(0) : row_max[r];
      Ops::from_acc(out_acc + r * Dv, Dv, kept_scale / l, out_row);
      logsumexp[row] = m_use + std::log(l);
    }
  };

  pool.run([&](int64_t task, int64_t slot) {
    // Causal: the longest tasks (last query blocks) first, so the tail of the run is short.
    const int64_t qb = query_blocks - 1 - task / row_groups, group_index = task % row_groups;
    const int64_t i0 = qb * Bq, nq = std::min(Bq, L - i0);
    Acc* block_scratch = scratch.slot(slot);
    Acc* rows = block_scratch + block_size;  // (nq x S), when weights are requested
    if (!average) {
      const int64_t bh = group_index;
      if (p.weights == nullptr) return attend_block(bh, i0, nq, block_scratch, nullptr);
      if constexpr (kWeightsInPlace) {
        rows = reinterpret_cast<Acc*>(p.weights + (bh * L + i0) * S);
      }
      attend_block(bh, i0, nq, block_scratch, rows);
      if constexpr (!kWeightsInPlace) {
        for (int64_t r = 0; r < nq; ++r) {
          Ops::from_acc(rows + r * S, S, Acc(1), p.weights + (bh * L + i0 + r) * S);
        }
      }
      return;
    }
    // Averaged weights (B, L, S): the heads' rows summed in head order, then divided by H.
    const int64_t b = group_index;
    Acc* head_sum = rows + Bq * S;
    for (int64_t h = 0; h < H; ++h) {
      attend_block(b * H + h, i0, nq, block_scratch, h == 0 ? head_sum : rows);
      if (h == 0) continue;
      for (int64_t n = 0; n < nq * S; ++n) head_sum[n] += rows[n];
    }
    // Divided, not multiplied by 1/H: torch's mean, to the last bit where the sums agree.
    for (int64_t n = 0; n < nq * S; ++n) head_sum[n] /= Acc(H);
    for (int64_t r = 0; r < nq; ++r) {
      Ops::from_acc(head_sum + r * S, S, Acc(1), p.weights + (b * L + i0 + r) * S);
    }
  });
}
QKV_FLASH_LEVEL_END
