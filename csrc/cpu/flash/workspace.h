// Work sharing and scratch memory of the blocked kernels: a pool that hands out tasks, and
// per-thread scratch carved from one allocation per call.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/flash/blocking.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/flash/tile_state.h"
#include "cpu/large_buffer.h"

QKV_FLASH_LEVEL_BEGIN

// Runs fn(task, slot) for every task in [0, tasks): the threads take tasks one at a time from a
// shared counter (so uneven tasks, e.g. causal ones, balance), and `slot` < slots() names the
// running thread's scratch. Which thread runs a task never changes what the task computes. Each
// thread releases its AMX tiles (tile_state.h) when it has no task left.
class TaskPool {
 public:
  explicit TaskPool(int64_t tasks)
      : tasks_(tasks),
        slots_(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks))) {}

  int64_t slots() const { return slots_; }

  template <typename F>
  void run(const F& fn) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, slots_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        for (int64_t task = next++; task < tasks_; task = next++) fn(task, slot);
      }
      release_amx_tiles();  // when this thread's GEMMs ran on AMX tiles
    });
  }

 private:
  int64_t tasks_, slots_;
};

// Per-thread scratch; every slot starts on a 64-byte boundary, so that what BLAS sees of a
// slot is aligned the same way whichever thread runs a task.
template <typename Acc>
class Scratch {
 public:
  static constexpr int64_t kAlign = 64 / int64_t(sizeof(Acc));
  Scratch(int64_t slots, int64_t per_slot)
      : per_slot_(round_up(std::max<int64_t>(per_slot, 1), kAlign)),
        storage_(size_t(slots * per_slot_ + kAlign)) {}
  Acc* slot(int64_t s) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(storage_.data());
    const uintptr_t aligned = (base + 63) & ~uintptr_t(63);
    return reinterpret_cast<Acc*>(aligned) + s * per_slot_;
  }

 private:
  int64_t per_slot_;
  LargeBuffer<Acc> storage_;
};

// Where the keep bits start in a slot: the first 8-byte boundary at or after `p`.
template <typename Acc>
uint64_t* keep_bits_at(Acc* p) {
  const uintptr_t address = (reinterpret_cast<uintptr_t>(p) + 7) & ~uintptr_t(7);
  return reinterpret_cast<uint64_t*>(address);
}

// Acc cells that hold the keep bits of Bk keys, with room for the alignment.
template <typename Acc>
int64_t keep_cells(int64_t Bk) {
  return (ceil_div(Bk, 64) * 8 + 8 + int64_t(sizeof(Acc)) - 1) / int64_t(sizeof(Acc));
}

QKV_FLASH_LEVEL_END
