// HashIndex: an open-addressing (linear probing) map from int64 key to row number.
//
// It is the only place that knows how keys are found; it owns no embedding data.
// Every int64 value is a legal key (INT64_MIN, -1, 0, ...), so emptiness is
// marked in the row field, never by reserving a key. Deletion uses backward
// shifting rather than tombstones, so probe lengths do not degrade on a table
// whose rows keep expiring. Not thread-safe: the owning shard's lock guards it.
#ifndef MONOLITH_OPS_CORE_HASH_INDEX_H_
#define MONOLITH_OPS_CORE_HASH_INDEX_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ops/core/huge_pages.h"

namespace monolith {

class HashIndex {
 public:
  static constexpr uint32_t kNoRow = 0xFFFFFFFFu;

  HashIndex() { Rehash(kMinSlots); }

  // Returns the row of `key`, or kNoRow. `hash` must be HashKey(key).
  uint32_t Find(int64_t key, uint64_t hash) const {
    size_t i = hash & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.row == kNoRow) return kNoRow;
      if (s.key == key) return s.row;
      i = (i + 1) & mask_;
    }
  }

  // Hints the CPU to fetch the slot `hash` starts probing at.
  void Prefetch(uint64_t hash) const { __builtin_prefetch(&slots_[hash & mask_]); }

  // Inserts a key that is not present.
  void Insert(int64_t key, uint64_t hash, uint32_t row) {
    if ((size_ + 1) * 4 > slots_.size() * 3) Rehash(slots_.size() * 2);
    size_t i = hash & mask_;
    while (slots_[i].row != kNoRow) i = (i + 1) & mask_;
    slots_[i].key = key;
    slots_[i].row = row;
    ++size_;
  }

  // Points an existing key at another row (rows move when the arena compacts).
  void SetRow(int64_t key, uint64_t hash, uint32_t row) {
    size_t i = hash & mask_;
    while (slots_[i].key != key || slots_[i].row == kNoRow) i = (i + 1) & mask_;
    slots_[i].row = row;
  }

  // Removes a present key.
  void Erase(int64_t key, uint64_t hash);

  size_t size() const { return size_; }
  size_t num_slots() const { return slots_.size(); }
  size_t MemoryBytes() const {
    const size_t bytes = slots_.capacity() * sizeof(Slot);
    return bytes >= HugePageAllocator<Slot>::kMinBytes ? RoundUpToHugePages(bytes) : bytes;
  }

  // Drops every key and shrinks back to the minimum size.
  void Clear() {
    Slots().swap(slots_);
    size_ = 0;
    Rehash(kMinSlots);
  }
  // Sizes the index for `n` keys up front (used by bulk import).
  void Reserve(size_t n) {
    size_t want = kMinSlots;
    while (n * 4 > want * 3) want *= 2;
    if (want > slots_.size()) Rehash(want);
  }

 private:
  // Packed to 12 bytes: the index is ~15% of a table's memory at dim 16, and x86
  // and ARMv8 load unaligned words at full speed.
  struct __attribute__((packed)) Slot {
    int64_t key;
    uint32_t row;
  };
  static constexpr size_t kMinSlots = 16;
  // A big index is probed at random: huge pages (when it is big) spare a TLB miss.
  using Slots = std::vector<Slot, HugePageAllocator<Slot>>;

  void Rehash(size_t new_slots);

  Slots slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_HASH_INDEX_H_
