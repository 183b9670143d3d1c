// Weights born in huge pages (flashserve/huge_pages.py): while the loader runs, torch's CPU
// allocations of 2 MiB or more get a mapping of their own whose start is 2 MiB-aligned and which is
// marked MADV_HUGEPAGE before anything touches it, so the loader's first writes fault in 2 MiB pages
// (one fault, one zeroing) instead of 512 small ones that would have to be collapsed afterwards.
// The last partial 2 MiB of each block stays in small pages: rounding it up would make the unused
// rest resident. Freed blocks are unmapped at once, so the loader's temporaries leave no heap behind.
//
// Installed as torch's CPU allocator on first use and kept (a DataPtr frees itself through its own
// deleter whichever allocator is current); off, it hands every request to the allocator it replaced.

#include <atomic>
#include <cstdint>
#include <cstring>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include "kernels.h"

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallPage = size_t(4) << 10;

struct Mapping {
  void* start;
  size_t length;
};

void unmap(void* context) {
  auto* mapping = static_cast<Mapping*>(context);
  munmap(mapping->start, mapping->length);
  delete mapping;
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
  return start;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  explicit HugePageAllocator(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (!on.load(std::memory_order_relaxed) || nbytes < kHugePage) return fallback_->allocate(nbytes);
    const size_t length = (nbytes + kSmallPage - 1) / kSmallPage * kSmallPage;
    void* start = map_aligned(length);
    if (start == nullptr) return fallback_->allocate(nbytes);
    return {start, new Mapping{start, length}, &unmap, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  std::atomic<bool> on{false};

 private:
  c10::Allocator* fallback_;
};

}  // namespace

bool allocate_in_huge_pages(bool on) {
  static HugePageAllocator* allocator = [] {
    auto* a = new HugePageAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(a, /*priority=*/UINT8_MAX);
    return a;
  }();
  return allocator->on.exchange(on);
}
