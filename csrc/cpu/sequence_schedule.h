// How attention_varlen shares the sequences of a packed batch among the threads.
//
// Each sequence is one call of the blocked kernels, which parallelise over (head, query block)
// internally. A sequence with a large share of the batch's work runs alone, with every thread
// on its heads and blocks. The others (many short sequences, where the kernels' internal tasks
// would be too few or too small to share) run one per thread at a time, each inside with one
// thread, taken longest first from a shared counter so that the threads finish together. The
// split depends on the sequences' work and the thread count only, and no sequence's result
// depends on which thread runs it.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace qkv_attention::cpu {

// Runs run_sequence(b) once for every b with work[b] > 0 (work: e.g. heads x queries x keys).
void run_sequences(const std::vector<int64_t>& work,
                   const std::function<void(int64_t)>& run_sequence);

}  // namespace qkv_attention::cpu
