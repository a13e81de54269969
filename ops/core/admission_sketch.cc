#include "ops/core/admission_sketch.h"

#include <algorithm>

#include "ops/core/hashing.h"

namespace monolith {

AdmissionSketch::AdmissionSketch(size_t width) : width_(width), counters_(width * kDepth, 0) {}

size_t AdmissionSketch::Cell(uint64_t hash, int row) const {
  // Re-mix per row so the rows are independent of each other and of the index
  // and shard bits taken from the same key hash.
  return row * width_ + (Mix64(hash + 0x632be59bd9b4e019ULL * (row + 1)) & (width_ - 1));
}

uint32_t AdmissionSketch::Estimate(uint64_t hash) const {
  if (width_ == 0) return 0;
  uint32_t m = kMaxCount;
  for (int r = 0; r < kDepth; ++r) m = std::min<uint32_t>(m, counters_[Cell(hash, r)]);
  return m;
}

uint32_t AdmissionSketch::Add(uint64_t hash) {
  if (width_ == 0) return 0;
  size_t cells[kDepth];
  uint32_t m = kMaxCount;
  for (int r = 0; r < kDepth; ++r) {
    cells[r] = Cell(hash, r);
    m = std::min<uint32_t>(m, counters_[cells[r]]);
  }
  const uint32_t next = std::min<uint32_t>(m + 1, kMaxCount);
  for (int r = 0; r < kDepth; ++r) {
    if (counters_[cells[r]] < next) counters_[cells[r]] = static_cast<uint16_t>(next);
  }
  if (++additions_ >= static_cast<int64_t>(width_ / 2)) Age();
  return next;
}

void AdmissionSketch::Age() {
  for (uint16_t& c : counters_) c >>= 1;
  additions_ = 0;
}

}  // namespace monolith
