// cpu/sequence_schedule.h.
#include "cpu/sequence_schedule.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>

namespace qkv_attention::cpu {

void run_sequences(const std::vector<int64_t>& work,
                   const std::function<void(int64_t)>& run_sequence) {
  const int64_t count = int64_t(work.size());
  const int64_t total = std::accumulate(work.begin(), work.end(), int64_t(0));
  if (total == 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // A sequence with at least 1/(4 threads) of the work runs alone on all threads: shared out
  // one per thread, it alone would set the time of the whole batch.
  std::vector<int64_t> alone, shared;
  for (int64_t b = 0; b < count; ++b) {
    if (work[size_t(b)] == 0) continue;
    const bool large =
        threads == 1 || double(work[size_t(b)]) * 4.0 * double(threads) >= double(total);
    (large ? alone : shared).push_back(b);
  }
  for (const int64_t b : alone) run_sequence(b);
  if (shared.empty()) return;
  // Longest first (ties in order), so that the last sequences taken are short.
  std::stable_sort(shared.begin(), shared.end(),
                   [&](int64_t a, int64_t b) { return work[size_t(a)] > work[size_t(b)]; });
  std::atomic<int64_t> next{0};
  const int64_t n = int64_t(shared.size());
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next++; i < n; i = next++) run_sequence(shared[size_t(i)]);
    }
  });
}

}  // namespace qkv_attention::cpu
