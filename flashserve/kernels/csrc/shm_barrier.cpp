// The meeting point of the shared-memory collectives (distributed/shm_collectives.py): each rank of
// one machine announces that its data is in its slot of a shared region, then waits until every rank
// has. The data itself is copied and summed by torch on both sides of this call.
//
// Ordering (C++ memory model): the announcement is a release store of the rank's sequence number, so
// the slot's bytes written before it are visible to a rank whose acquire load reads that number.

#include <chrono>
#include <sched.h>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void spin_pause() { _mm_pause(); }
#else
static inline void spin_pause() {}
#endif

#include "kernels.h"

namespace {
constexpr int64_t kFlagStride = 8;  // int64s per rank: one 64-byte line each, so ranks do not share a line
constexpr double kSpinBeforeYieldS = 50e-6;  // spin this long, then give the core away between looks
}  // namespace

void shm_arrive_and_wait(const at::Tensor& flags, int64_t rank, int64_t world, int64_t seq, double timeout_s) {
  TORCH_CHECK(flags.scalar_type() == at::kLong && flags.is_contiguous(), "flags: contiguous int64");
  TORCH_CHECK(flags.numel() >= world * kFlagStride && rank >= 0 && rank < world, "flags too short for world");
  int64_t* f = flags.data_ptr<int64_t>();
  __atomic_store_n(&f[rank * kFlagStride], seq, __ATOMIC_RELEASE);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int64_t r = 0; r < world; ++r) {
    int64_t* other = &f[r * kFlagStride];
    for (uint64_t spins = 1; __atomic_load_n(other, __ATOMIC_ACQUIRE) < seq; ++spins) {
      spin_pause();
      if (spins % 64 != 0) continue;
      const double waited = std::chrono::duration<double>(clock::now() - start).count();
      if (waited > timeout_s) {
        throw std::runtime_error("shared-memory collective: rank " + std::to_string(r) + " did not arrive within " +
                                 std::to_string(timeout_s) + " s (it died or hangs)");
      }
      if (waited > kSpinBeforeYieldS) sched_yield();
    }
  }
}
