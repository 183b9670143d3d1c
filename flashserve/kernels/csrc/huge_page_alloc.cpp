// Weights born in huge pages (flashserve/huge_pages.py): while the loader runs, torch's CPU
// allocations of 2 MiB or more get a mapping of their own whose start is 2 MiB-aligned and which is
// marked MADV_HUGEPAGE before anything touches it, so the loader's first writes fault in 2 MiB pages
// (one fault, one zeroing) instead of 512 small ones that would have to be collapsed afterwards.
// The last partial 2 MiB of each block stays in small pages: rounding it up would make the unused
// rest resident. Blocks freed while it is on wait for a request of their size; the rest are unmapped,
// so the loader's temporaries leave no heap behind.
//
// Installed as torch's CPU allocator on first use and kept (a DataPtr frees itself through its own
// deleter whichever allocator is current); off, it hands every request to the allocator it replaced.

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include "kernels.h"

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallPage = size_t(4) << 10;

// The mappings made here, by start: a DataPtr's context is its data pointer, as torch's raw
// allocation interface requires, so the length to unmap is looked up. While the allocator is on,
// a freed mapping is kept for the next request of the same length instead of unmapped: the
// loader's temporaries come in the same sizes layer after layer, and a fresh mapping would fault
// all its pages in again (measured: packing the 1.5B model 2.7 -> 4.1-4.5 s without this).
std::mutex mappings_mutex;
std::unordered_map<void*, size_t> mappings;
std::unordered_multimap<size_t, void*> idle;  // freed while on, by length
bool keep_freed = false;
c10::DeleterFnPtr fallback_raw_deleter = nullptr;

// Releases `start` if it is one of ours (kept idle while on, unmapped otherwise); false otherwise.
bool release_if_ours(void* start) {
  size_t length = 0;
  {
    std::lock_guard<std::mutex> lock(mappings_mutex);
    auto it = mappings.find(start);
    if (it == mappings.end()) return false;
    length = it->second;
    if (keep_freed) {
      idle.emplace(length, start);
      return true;
    }
    mappings.erase(it);
  }
  munmap(start, length);
  return true;
}

void release(void* start) { release_if_ours(start); }

// What torch's raw_deallocate calls, for a block from either allocator.
void free_any(void* p) {
  if (!release_if_ours(p) && fallback_raw_deleter != nullptr) fallback_raw_deleter(p);
}

// An idle mapping of exactly `length` bytes, or nullptr.
void* reuse(size_t length) {
  std::lock_guard<std::mutex> lock(mappings_mutex);
  auto it = idle.find(length);
  if (it == idle.end()) return nullptr;
  void* start = it->second;
  idle.erase(it);
  return start;
}

// Sets whether freed mappings are kept; turning it off unmaps those kept.
void set_keep_freed(bool keep) {
  std::vector<std::pair<size_t, void*>> drop;
  {
    std::lock_guard<std::mutex> lock(mappings_mutex);
    keep_freed = keep;
    if (keep) return;
    drop.assign(idle.begin(), idle.end());
    idle.clear();
    for (const auto& [length, start] : drop) mappings.erase(start);
  }
  for (const auto& [length, start] : drop) munmap(start, length);
}

// `length` bytes at a 2 MiB boundary, advised for huge pages; nullptr if the system refuses.
void* map_aligned(size_t length) {
  const size_t reserve = length + kHugePage;
  auto* base = static_cast<char*>(mmap(nullptr, reserve, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  char* start = base + (kHugePage - reinterpret_cast<uintptr_t>(base) % kHugePage) % kHugePage;
  if (start > base) munmap(base, start - base);
  char* end = start + length;
  if (end < base + reserve) munmap(end, base + reserve - end);
  madvise(start, length, MADV_HUGEPAGE);  // advice only: refused, the pages are small ones
  std::lock_guard<std::mutex> lock(mappings_mutex);
  mappings.emplace(start, length);
  return start;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  explicit HugePageAllocator(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (!on.load(std::memory_order_relaxed) || nbytes < kHugePage) return fallback_->allocate(nbytes);
    const size_t length = (nbytes + kSmallPage - 1) / kSmallPage * kSmallPage;
    void* start = reuse(length);
    if (start == nullptr) start = map_aligned(length);
    if (start == nullptr) return fallback_->allocate(nbytes);
    return {start, start, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return fallback_raw_deleter ? &free_any : nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  std::atomic<bool> on{false};

 private:
  c10::Allocator* fallback_;
};

}  // namespace

bool allocate_in_huge_pages(bool on) {
  static HugePageAllocator* allocator = [] {
    c10::Allocator* fallback = c10::GetCPUAllocator();
    fallback_raw_deleter = fallback->raw_deleter();
    auto* a = new HugePageAllocator(fallback);
    c10::SetCPUAllocator(a, /*priority=*/UINT8_MAX);
    return a;
  }();
  set_keep_freed(on);
  return allocator->on.exchange(on);
}
