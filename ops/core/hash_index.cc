#include "ops/core/hash_index.h"

#include "ops/core/hashing.h"

namespace monolith {

void HashIndex::Erase(int64_t key, uint64_t hash) {
  size_t hole = hash & mask_;
  while (slots_[hole].key != key || slots_[hole].row == kNoRow) hole = (hole + 1) & mask_;
  // Backward-shift: pull later members of the probe run into the hole whenever
  // their home slot does not lie cyclically in (hole, j].
  size_t j = hole;
  while (true) {
    j = (j + 1) & mask_;
    if (slots_[j].row == kNoRow) break;
    const size_t home = HashKey(slots_[j].key) & mask_;
    const bool home_in_gap = (hole <= j) ? (hole < home && home <= j) : (hole < home || home <= j);
    if (!home_in_gap) {
      slots_[hole] = slots_[j];
      hole = j;
    }
  }
  slots_[hole].row = kNoRow;
  --size_;
}

void HashIndex::Rehash(size_t new_slots) {
  Slots old;
  old.swap(slots_);
  slots_.assign(new_slots, Slot{0, kNoRow});
  mask_ = new_slots - 1;
  for (const Slot& s : old) {
    if (s.row == kNoRow) continue;
    size_t i = HashKey(s.key) & mask_;
    while (slots_[i].row != kNoRow) i = (i + 1) & mask_;
    slots_[i] = s;
  }
}

}  // namespace monolith
