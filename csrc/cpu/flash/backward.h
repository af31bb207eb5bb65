// The blocked ("flash") attention backward on the CPU, templated like forward.h.
//
// It recomputes P = exp(s - logsumexp) block by block (no L x S tensor). The main pass runs one
// task per (batch, key/value head, group of key blocks): for each of its key blocks it owns dK
// and dV (dV = sum W^T dO, dK = scale * sum dS^T Q over the query heads that read this key/value
// head and over their query blocks) and adds dS K to its own partial dQ of each of those query
// heads; the partial dQs are summed in group order at the end. When one (batch, key/value head)
// is all there is, its key blocks are split into groups so that every core still has work.
// A second pass over the query blocks runs first only when the weights have a gradient of their
// own or a half-precision mask gradient needs an exact delta (see below).
// Each task owns its outputs and walks its loops in a fixed order, so the results are bitwise
// the same whatever the number of threads and whichever thread runs a task.
// The variants (cpu/attention_kernel.h): the logsumexp includes the sink, so the recomputed P
// does too; dS passes through the softcap's derivative 1 - tanh^2 before dQ and dK; the key
// blocks a block of queries cannot see by position (causality, the sliding window) are skipped
// from both sides; d loss / d sink_h = -sum over the rows of head h of exp(sink_h - lse) delta,
// summed per head in one fixed order.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/blocking.h"
#include "cpu/flash/dropout_bits.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/flash/operands.h"
#include "cpu/flash/row_masks.h"
#include "cpu/flash/score_terms.h"
#include "cpu/flash/workspace.h"

QKV_FLASH_LEVEL_BEGIN

template <typename T, class Ops>
void flash_backward(const AttentionBackwardParams<T>& p) {
  using Acc = typename Ops::acc_t;
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  const int64_t B = p.batch, H = p.heads, L = p.q_len, S = p.kv_len;
  const int64_t D = p.head_dim, Dv = p.value_dim, BH = B * H;
  const int64_t Hkv = p.kv_heads, group = p.group_size(), BHkv = B * Hkv;
  Acc* grad_scores = p.grad_scores;
  if (BH == 0) return;
  const bool sink_grad = p.sinks != nullptr && p.grad_sinks != nullptr;
  if (L == 0 || S == 0) {  // nothing attends to anything: all gradients are zero
    if (sink_grad) std::fill(p.grad_sinks, p.grad_sinks + H, Acc(0));
    std::fill(p.grad_query, p.grad_query + BH * L * D, T(0));
    std::fill(p.grad_key, p.grad_key + BHkv * S * D, T(0));
    std::fill(p.grad_value, p.grad_value + BHkv * S * Dv, T(0));
    return;
  }
  const Blocking blocking = backward_blocking(p);
  const int64_t Bq = blocking.queries, Bk = blocking.keys;
  const int64_t query_blocks = ceil_div(L, Bq), key_blocks = ceil_div(S, Bk);

  // A operands (rows of Q and dO) and B operands (K, Q, dO per block; K^T and V^T are packed
  // per key block by the task that owns it, so they never exist for the whole sequence).
  LargeBuffer<Acc> key_storage, value_storage, query_storage, grad_out_storage;
  const RowsView<Acc> query_rows =
      operand_rows<Ops>(p.query, p.query_strides, B, H, L, D, query_storage);
  const RowsView<Acc> grad_out_rows =
      operand_rows<Ops>(p.grad_output, p.grad_output_strides, B, H, L, Dv, grad_out_storage);
  const RowsView<Acc> key_rows = operand_rows<Ops>(p.key, p.key_strides, B, Hkv, S, D, key_storage);
  const RowsView<Acc> value_rows =
      operand_rows<Ops>(p.value, p.value_strides, B, Hkv, S, Dv, value_storage);
  const auto keys = BOperands<Ops>::row_blocks(key_rows, B, Hkv, S, D, Bk);
  const auto queries = BOperands<Ops>::row_blocks(query_rows, B, H, L, D, Bq);
  const auto grad_outs = BOperands<Ops>::row_blocks(grad_out_rows, B, H, L, Dv, Bq);

  // K^T and V^T of one key block of key/value head kv_bh, packed as B operands (ld = panel_ld).
  using Elem = typename Ops::b_elem;
  const int64_t panel_ld = Ops::packed_ld(Bk);
  const int64_t kt_size = Ops::packed_size(D, Bk), vt_size = Ops::packed_size(Dv, Bk);
  auto pack_key_block = [&](int64_t kv_bh, int64_t kb, Elem* kt, Elem* vt) {
    const int64_t b = kv_bh / Hkv, h = kv_bh % Hkv, j0 = kb * Bk, nk = std::min(Bk, S - j0);
    Ops::pack_b(key_rows.rows(b, h, j0), 1, key_rows.ld, D, nk, kt, panel_ld);
    Ops::pack_b(value_rows.rows(b, h, j0), 1, value_rows.ld, Dv, nk, vt, panel_ld);
  };

  const Acc scale = static_cast<Acc>(p.scale);
  const ScoreTerms<T, Acc> terms(p);
  const KeyBand& band = terms.band();
  const bool capped = terms.softcap();
  const Acc kept_scale = static_cast<Acc>(kept_scale_of(p.dropout_p));
  const bool dropout = p.dropout_p > 0;
  const DropoutKey dropout_key = DropoutKey::make(p.seed, p.offset, p.dropout_p);
  const RowMasks<T, Acc> masks(p);
  const Acc* logsumexp = p.logsumexp;

  // Per row: the logsumexp (+inf for a row that saw no key, so that its P is 0), and
  // delta = sum_j P_ij dP'_ij = dO_i . O_i (+ the weights' own gradient term, below).
  LargeBuffer<Acc> lse2(size_t(BH * L)), delta(size_t(BH * L));
  at::parallel_for(0, BH * L, 256, [&](int64_t begin, int64_t end) {
    std::vector<Acc> o_row(size_t(std::max<int64_t>(Dv, 1)));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L, i = row % L, b = bh / H, h = bh % H;
      const Acc lse = logsumexp[row];
      lse2[row] = lse == -kInf ? kInf : lse;
      int64_t ld = 0;
      const Acc* o = rows_as_acc<Ops>(p.output, p.output_strides, b, h, i, 1, Dv, o_row.data(), ld);
      const Acc* d_o = grad_out_rows.rows(b, h, i);
      Acc sum = 0;
      for (int64_t d = 0; d < Dv; ++d) sum += o[d] * d_o[d];
      delta[row] = sum;
    }
  });

  // Scratch per thread: scores/P, dP/dS, W (Bq x Bk each); the dK and dV accumulators; per-row
  // sums; gathered masks and the grad_weights row; with a softcap its derivative (Bq x Bk);
  // keep bits.
  const int64_t cap_cells = capped ? Bq * Bk : 0;
  const int64_t slot_floats =
      3 * Bq * Bk + Bk * D + Bk * Dv + Bq + 3 * Bk + cap_cells + keep_cells<Acc>(Bk);
  struct Block {  // one slot's buffers
    Acc *scores, *grad_p, *weights, *dk, *dv, *row_extra, *gathered, *gw_row, *cap_grad;
    uint64_t* keep;
  };
  auto carve = [&](Acc* base) {
    Block blk;
    blk.scores = base;                   // Bq x Bk
    blk.grad_p = blk.scores + Bq * Bk;   // Bq x Bk
    blk.weights = blk.grad_p + Bq * Bk;  // Bq x Bk
    blk.dk = blk.weights + Bq * Bk;      // Bk x D
    blk.dv = blk.dk + Bk * D;            // Bk x Dv
    blk.row_extra = blk.dv + Bk * Dv;    // Bq
    blk.gathered = blk.row_extra + Bq;   // 2 x Bk
    blk.gw_row = blk.gathered + 2 * Bk;  // Bk
    blk.cap_grad = blk.gw_row + Bk;      // Bq x Bk, with a softcap
    blk.keep = keep_bits_at(blk.cap_grad + cap_cells);
    return blk;
  };

  // Masked scores of rows i0 .. i0 + nq against the first nc keys of block kb, then
  // P = exp(s - lse) (times the keep bits when `apply_keep`), in blk.scores; with a softcap and
  // `cap_grad`, its derivative in blk.cap_grad. Returns nc (the keys past it are hidden from
  // all these rows by position).
  // Only columns c0 .. nc are computed (c0 <= nc; the caller knows the keys before c0 hidden
  // from all these rows).
  auto probabilities = [&](Block& blk, int64_t bh, int64_t i0, int64_t nq, int64_t kb, int64_t c0,
                           const Elem* kt, bool apply_keep, bool cap_grad) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t j0 = kb * Bk, nk = band.columns(i0, nq, j0, std::min(Bk, S - j0));
    const int64_t width = nk - c0;
    Ops::gemm(nq, width, D, query_rows.rows(b, h, i0), query_rows.ld, 1,
              kt + c0 * Ops::kColumnStride, panel_ld, blk.scores + c0, Bk, false);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r, row = bh * L + i;
      Acc* s_row = blk.scores + r * Bk + c0;
      MaskSegment<T, Acc> segments[AttentionInputs<T>::kMasks];
      RowScores<Acc> rs = terms.row(b, h, i, j0 + c0, width);
      if (cap_grad && capped) rs.cap_grad = blk.cap_grad + r * Bk + c0;
      const int count =
          masks.segments(b, h, i, j0 + c0, width, segments, blk.gathered, rs.bias, rs.valid);
      Ops::prepare_row(s_row, width, rs, segments, count);
      if (apply_keep) Ops::keep_bits(dropout_key, uint64_t(row * S + j0 + c0), width, blk.keep);
      Ops::exp_row(s_row, width, lse2[row], apply_keep ? blk.keep : nullptr);
    }
    return nk;
  };

  // The grad_weights row (b, h, i) over keys j0 .. j0 + nk, as Acc, in blk.gw_row.
  auto grad_weights_row = [&](Block& blk, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nk) {
    const Strides4& gs = p.grad_weights_strides;
    convert_row<Ops>(p.grad_weights + b * gs.batch + h * gs.head + i * gs.row + j0 * gs.col, gs.col,
                     nk, blk.gw_row);
  };

  // Runs body(task, block scratch, K^T panel, V^T panel) for tasks [0, count): the scratch and
  // the panels are allocated once per pool slot, not per task.
  auto run_with_panels = [&](int64_t count, const auto& body) {
    TaskPool pool(count);
    Scratch<Acc> scratch(pool.slots(), slot_floats);
    LargeBuffer<Elem> panels(size_t(pool.slots() * (kt_size + vt_size)));
    pool.run([&](int64_t task, int64_t slot) {
      Block blk = carve(scratch.slot(slot));
      Elem* kt = panels.data() + slot * (kt_size + vt_size);
      body(task, blk, kt, kt + kt_size);
    });
  };

  // A second look at delta, per query block, recomputing P:
  //  - when the weights have a gradient of their own, delta also carries sum_j W_ij gW_ij;
  //  - when a mask gradient (dS itself, summed over broadcast dimensions) is asked for, delta
  //    is recomputed as sum_j W_ij dP_ij instead of dO . O, with dP from the same GEMM as the
  //    main pass, so that the rows of dS sum to 0 up to that GEMM's rounding alone: for a half
  //    type the output was rounded (an error of 2^-9 |delta| per row for a scalar mask, summed
  //    over every row), and in any dtype dO . O and dO V^T sum in different orders (a
  //    one-key row, whose dS is exactly 0, would otherwise get a few ulps).
  const bool exact_delta = grad_scores != nullptr;
  if (p.grad_weights || exact_delta) {
    run_with_panels(BH * query_blocks, [&](int64_t task, Block& blk, Elem* kt, Elem* vt) {
      const int64_t bh = task / query_blocks, qb = task % query_blocks;
      const int64_t b = bh / H, h = bh % H, i0 = qb * Bq, nq = std::min(Bq, L - i0);
      std::fill(blk.row_extra, blk.row_extra + nq, Acc(0));
      int64_t first_block = 0, last_block = 0;
      band.key_blocks(i0, nq, Bk, first_block, last_block);
      for (int64_t kb = first_block; kb < last_block; ++kb) {
        // (This rarely needed pass packs K^T and V^T again for each query block.)
        pack_key_block(b * Hkv + h / group, kb, kt, vt);
        // P * keep in blk.scores; with exact_delta, dP = dO V^T in blk.grad_p.
        const int64_t j0 = kb * Bk, nk = probabilities(blk, bh, i0, nq, kb, 0, kt, dropout, false);
        if (exact_delta) {
          Ops::gemm(nq, nk, Dv, grad_out_rows.rows(b, h, i0), grad_out_rows.ld, 1, vt, panel_ld,
                    blk.grad_p, Bk, false);
        }
        for (int64_t r = 0; r < nq; ++r) {
          Acc* dp_row = blk.grad_p + r * Bk;
          if (!exact_delta) std::fill(dp_row, dp_row + nk, Acc(0));
          if (p.grad_weights) {
            grad_weights_row(blk, b, h, i0 + r, j0, nk);
            for (int64_t j = 0; j < nk; ++j) dp_row[j] += blk.gw_row[j];
          }
          const Acc* s_row = blk.scores + r * Bk;
          Acc sum = 0;
          for (int64_t j = 0; j < nk; ++j) sum += s_row[j] * dp_row[j];
          blk.row_extra[r] += sum;
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        Acc& d = delta[bh * L + i0 + r];
        d = (exact_delta ? Acc(0) : d) + blk.row_extra[r] * kept_scale;
      }
    });
  }

  // d loss / d sink_h = -sum over the rows (b, i) of head h of p_sink delta, p_sink =
  // exp(sink_h - lse): per head, in (b, i) order.
  if (sink_grad) {
    at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        const Acc sink = terms.sink(h);
        Acc sum = 0;
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = 0; i < L; ++i) {
            const int64_t row = (b * H + h) * L + i;
            sum += std::exp(sink - lse2[row]) * delta[row];
          }
        }
        p.grad_sinks[h] = -sum;
      }
    });
  }

  // The main pass: one task per (batch, key/value head, group of key blocks). For each of its
  // key blocks it owns dK and dV, summing over the query heads that read the key/value head and
  // over their query blocks, in a fixed order; dQ goes to the group's partial sum of each of
  // those query heads.
  const int64_t groups = key_groups(BHkv, key_blocks);
  // With one group and float gradients, dQ is accumulated in the output itself.
  constexpr bool kGradIsAcc = std::is_same_v<T, Acc>;
  const bool dq_in_place = kGradIsAcc && groups == 1;
  LargeBuffer<Acc> dq_partial(dq_in_place ? 0 : size_t(BH * groups * L * D));
  auto dq_of = [&](int64_t bh, int64_t g) -> Acc* {
    if constexpr (kGradIsAcc) {
      if (dq_in_place) return reinterpret_cast<Acc*>(p.grad_query) + bh * L * D;
    }
    return dq_partial.data() + (bh * groups + g) * L * D;
  };
  run_with_panels(BHkv * groups, [&](int64_t task, Block& blk, Elem* kt, Elem* vt) {
    const int64_t kv_bh = task / groups, g = task % groups;
    const int64_t b = kv_bh / Hkv, first_head = (kv_bh % Hkv) * group;
    for (int64_t h = first_head; h < first_head + group; ++h) {
      Acc* dq = dq_of(b * H + h, g);
      std::fill(dq, dq + L * D, Acc(0));
    }
    // Key blocks g, g + groups, ...: interleaved, so that causal groups get equal work.
    for (int64_t kb = g; kb < key_blocks; kb += groups) {
      const int64_t j0 = kb * Bk, nk = std::min(Bk, S - j0);
      std::fill(blk.dk, blk.dk + nk * D, Acc(0));
      std::fill(blk.dv, blk.dv + nk * Dv, Acc(0));
      // The query blocks with a row that may see one of these keys (causality, the window).
      int64_t first_row = 0, last_row = 0;
      band.rows_seeing(j0, nk, L, first_row, last_row);
      const int64_t first_qb = first_row / Bq;
      const int64_t last_qb = last_row > first_row ? ceil_div(last_row, Bq) : first_qb;
      if (last_qb > first_qb) pack_key_block(kv_bh, kb, kt, vt);
      for (int64_t h = first_head; h < first_head + group; ++h) {
        const int64_t bh = b * H + h;
        Acc* dq = dq_of(bh, g);
        if (grad_scores) {  // the rows of the query blocks that see none of these keys
          auto zero_rows = [&](int64_t from, int64_t to) {
            for (int64_t i = from; i < to; ++i) {
              Acc* row = grad_scores + (bh * L + i) * S + j0;
              std::fill(row, row + nk, Acc(0));
            }
          };
          zero_rows(0, std::min(first_qb * Bq, L));
          zero_rows(std::min(last_qb * Bq, L), L);
        }
        for (int64_t qb = first_qb; qb < last_qb; ++qb) {
          const int64_t i0 = qb * Bq, nq = std::min(Bq, L - i0);
          const Acc* d_o = grad_out_rows.rows(b, h, i0);
          // Keys c0 .. nc: from the vector boundary (16 keys) at or before the first key the
          // block's first row may see (a window's lower edge), up to the last row's last key
          // (causality, the window's upper edge).
          const int64_t nc0 = band.columns(i0, nq, j0, nk);
          const int64_t c0 = std::min(std::max<int64_t>(band.begin(i0) - j0, 0) / 16 * 16, nc0);
          const int64_t nc = probabilities(blk, bh, i0, nq, kb, c0, kt, false, true);
          const int64_t width = nc - c0;
          // dP = dO V^T (+ grad_weights), then W = P * keep * kept_scale and
          // dS = P * (dP * keep * kept_scale - delta).
          Ops::gemm(nq, width, Dv, d_o, grad_out_rows.ld, 1, vt + c0 * Ops::kColumnStride, panel_ld,
                    blk.grad_p + c0, Bk, false);
          // Without dropout the weights are P itself (the kept scale is 1).
          Acc* w = dropout ? blk.weights : nullptr;
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = i0 + r, row = bh * L + i;
            Acc* dp_row = blk.grad_p + r * Bk + c0;
            if (p.grad_weights) {
              grad_weights_row(blk, b, h, i, j0 + c0, width);
              for (int64_t j = 0; j < width; ++j) dp_row[j] += blk.gw_row[j];
            }
            if (dropout) Ops::keep_bits(dropout_key, uint64_t(row * S + j0 + c0), width, blk.keep);
            Ops::softmax_grad_row(blk.scores + r * Bk + c0, dp_row, dropout ? blk.keep : nullptr,
                                  kept_scale, delta[row], width, w ? w + r * Bk + c0 : nullptr,
                                  dp_row);
            if (grad_scores) {  // d loss / d score, before the softcap's derivative
              Acc* out = grad_scores + row * S + j0;
              std::fill(out, out + c0, Acc(0));
              std::copy(dp_row, dp_row + width, out + c0);
              std::fill(out + nc, out + nk, Acc(0));
            }
            if (capped) {  // d loss / d raw score
              const Acc* cap_row = blk.cap_grad + r * Bk + c0;
              for (int64_t j = 0; j < width; ++j) dp_row[j] *= cap_row[j];
            }
          }
          if (width == 0) continue;
          const Acc* weights = (dropout ? blk.weights : blk.scores) + c0;
          const Acc* grad_s = blk.grad_p + c0;
          Ops::gemm(width, Dv, nq, weights, 1, Bk, grad_outs.at(bh, qb), grad_outs.ld(),
                    blk.dv + c0 * Dv, Dv, true);  // dV += W^T dO
          Ops::gemm(width, D, nq, grad_s, 1, Bk, queries.at(bh, qb), queries.ld(), blk.dk + c0 * D,
                    D, true);  // dK += dS^T Q
          Ops::gemm(nq, D, width, grad_s, Bk, 1, keys.at(kv_bh, kb) + c0 * keys.ld(), keys.ld(),
                    dq + i0 * D, D, true);  // dQ += dS K
        }
      }
      for (int64_t r = 0; r < nk; ++r) {
        Ops::from_acc(blk.dk + r * D, D, scale, p.grad_key + (kv_bh * S + j0 + r) * D);
        Ops::from_acc(blk.dv + r * Dv, Dv, Acc(1), p.grad_value + (kv_bh * S + j0 + r) * Dv);
      }
    }
  });

  // dQ = scale * (sum of the groups' partial sums, in group order).
  at::parallel_for(0, BH * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L, i = row % L;
      Acc* first = dq_of(bh, 0) + i * D;
      for (int64_t g = 1; g < groups; ++g) {
        const Acc* part = dq_of(bh, g) + i * D;
        for (int64_t d = 0; d < D; ++d) first[d] += part[d];
      }
      Ops::from_acc(first, D, scale, p.grad_query + row * D);
    }
  });
}

QKV_FLASH_LEVEL_END
