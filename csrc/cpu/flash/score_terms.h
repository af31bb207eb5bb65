// What turns one query row's dot products into scores besides the masks (row_masks.h): the
// scale, the softcap, ALiBi's distance penalty and the keys hidden by position (causality and
// the sliding window, blocking.h's KeyBand); and the row's attention sink. See
// cpu/attention_kernel.h for the definitions.
#pragma once

#include <cstdint>
#include <limits>

#include "cpu/attention_kernel.h"
#include "cpu/flash/blocking.h"
#include "cpu/flash/level_namespace.h"

QKV_FLASH_LEVEL_BEGIN

// One query row over a run of keys j0 .. j0 + n, as Ops::prepare_row applies it.
template <typename Acc>
struct RowScores {
  Acc scale = 1;
  Acc bias = 0;       // broadcast additive masks (row_masks.h adds to it)
  int64_t first = 0;  // keys [first, valid) of the run are not hidden by position
  int64_t valid = 0;  // (a broadcast bool mask that forbids the row sets it to 0)
  Acc softcap = 0;    // > 0: raw -> softcap * tanh(raw / softcap)
  Acc slope = 0;      // ALiBi: score -= slope * |distance - t| for key j0 + t
  Acc distance = 0;   // i + o - j0
  // The backward's d score / d raw = 1 - tanh^2(raw / softcap) per key, written when softcap > 0
  // and this is set.
  Acc* cap_grad = nullptr;
};

template <typename T, typename Acc>
class ScoreTerms {
 public:
  explicit ScoreTerms(const AttentionInputs<T>& p)
      : p_(p),
        band_(KeyBand::of(p)),
        scale_(static_cast<Acc>(p.scale)),
        softcap_(static_cast<Acc>(p.softcap)) {}

  const KeyBand& band() const { return band_; }
  bool softcap() const { return softcap_ > Acc(0); }

  // Row i of (b, h) over keys j0 .. j0 + n.
  RowScores<Acc> row(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) const {
    RowScores<Acc> r;
    r.scale = scale_;
    r.first = band_.first_in(i, j0, n);
    r.valid = band_.valid_in(i, j0, n);
    r.softcap = softcap_;
    if (p_.alibi_slopes != nullptr) {
      r.slope = static_cast<Acc>(p_.alibi_slopes[b * p_.alibi_batch_stride + h]);
      r.distance = static_cast<Acc>(i + p_.causal_offset - j0);
    }
    return r;
  }

  bool has_sinks() const { return p_.sinks != nullptr; }
  // Query head h's sink logit; -inf (no term) without sinks.
  Acc sink(int64_t h) const {
    return p_.sinks != nullptr ? static_cast<Acc>(p_.sinks[h])
                               : -std::numeric_limits<Acc>::infinity();
  }

 private:
  const AttentionInputs<T>& p_;
  KeyBand band_;
  Acc scale_, softcap_;
};

QKV_FLASH_LEVEL_END
