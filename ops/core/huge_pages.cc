#include "ops/core/huge_pages.h"

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace monolith {

#if defined(__linux__)

void* AllocateHugePages(size_t bytes) {
  const size_t size = RoundUpToHugePages(bytes);
  // Over-map by one huge page and trim, so the block starts on a 2 MiB
  // boundary: the kernel only backs whole aligned 2 MiB ranges with huge pages.
  void* raw = mmap(nullptr, size + kHugePageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePageBytes - 1) & ~(uintptr_t{kHugePageBytes} - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = start + size + kHugePageBytes - (aligned + size);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + size), tail);
#ifdef MADV_HUGEPAGE
  // Advice only: with THP off this fails harmlessly and we keep small pages.
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(aligned);
}

void FreeHugePages(void* p, size_t bytes) {
  if (p != nullptr) munmap(p, RoundUpToHugePages(bytes));
}

#else

void* AllocateHugePages(size_t bytes) {
  void* p = std::aligned_alloc(kHugePageBytes, RoundUpToHugePages(bytes));
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void FreeHugePages(void* p, size_t) { std::free(p); }

#endif

}  // namespace monolith
