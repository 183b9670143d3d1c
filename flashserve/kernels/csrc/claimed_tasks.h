// Work handed out a chunk at a time from a shared counter, for loops whose tasks cost alike but whose
// threads do not run alike: a static split (at::parallel_for's) gives each thread half of the range,
// and on a shared host either core may run slower for a while, so the first to finish waits for the
// other at the region's end.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

// Runs body(begin, end, next_begin) over chunks of [0, total) on the threads of one parallel region.
// Each thread claims its next chunk before it starts the one in hand, so the body knows where it
// goes next (next_begin, or -1 at the end) and can ask for that chunk's data while it computes.
template <typename Body>
void for_claimed_chunks(int64_t total, int64_t chunk, Body body) {
  std::atomic<int64_t> cursor{0};
  auto claim = [&] { return std::min(cursor.fetch_add(chunk, std::memory_order_relaxed), total); };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t begin = claim(); begin < total;) {
      const int64_t next = claim();
      body(begin, std::min(begin + chunk, total), next < total ? next : -1);
      begin = next;
    }
  });
}
