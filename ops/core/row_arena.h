// RowArena: dense, chunked storage for fixed-width table rows.
//
// Rows are numbered 0..size()-1 with no holes (the table moves the last row into
// a freed slot), so scans for expiry, export and capacity eviction walk memory
// linearly. Storage grows in fixed chunks instead of one doubling buffer: a row
// never moves when the arena grows, growth never needs 2x transient memory, and
// the slack is bounded by one chunk (plus, for big arenas, one slab).
//
// The first 2 MiB of chunks are separate small allocations, so a small table
// stays small. Past that, chunks are carved out of 2 MiB-aligned slabs backed
// by huge pages (huge_pages.h): big tables are read at random, and huge pages
// save a TLB miss on nearly every row. Not thread-safe: the shard's lock
// guards it.
#ifndef MONOLITH_OPS_CORE_ROW_ARENA_H_
#define MONOLITH_OPS_CORE_ROW_ARENA_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "ops/core/huge_pages.h"

namespace monolith {

class RowArena {
 public:
  static constexpr int kChunkShift = 8;  // 256 rows a chunk
  static constexpr size_t kChunkRows = size_t{1} << kChunkShift;

  explicit RowArena(size_t row_bytes)
      : row_bytes_(row_bytes),
        chunk_bytes_(kChunkRows * row_bytes),
        chunks_per_slab_(std::max<size_t>(1, kHugePageBytes / chunk_bytes_)),
        slab_bytes_(RoundUpToHugePages(chunks_per_slab_ * chunk_bytes_)) {}

  char* row(size_t i) { return chunks_[i >> kChunkShift] + (i & (kChunkRows - 1)) * row_bytes_; }
  const char* row(size_t i) const { return chunks_[i >> kChunkShift] + (i & (kChunkRows - 1)) * row_bytes_; }

  // Appends an uninitialised row and returns its number.
  size_t Append() {
    if (size_ == chunks_.size() * kChunkRows) AddChunk();
    return size_++;
  }

  // Drops the last row; frees a trailing chunk once it is two chunks behind, so
  // a table oscillating around a chunk boundary does not thrash the allocator.
  void PopBack() {
    --size_;
    if (chunks_.size() * kChunkRows >= size_ + 2 * kChunkRows) DropChunk();
  }

  void Clear() {
    while (!chunks_.empty()) DropChunk();
    size_ = 0;
  }

  size_t size() const { return size_; }
  size_t row_bytes() const { return row_bytes_; }
  size_t MemoryBytes() const {
    return small_.size() * chunk_bytes_ + slabs_.size() * slab_bytes_ + chunks_.capacity() * sizeof(char*);
  }

 private:
  // Frees a huge-page slab.
  struct SlabDeleter {
    size_t bytes;
    void operator()(char* p) const { FreeHugePages(p, bytes); }
  };

  // Chunk c < chunks_per_slab_ is a small allocation; chunk c beyond lives in
  // slab (c / chunks_per_slab_ - 1) at position c % chunks_per_slab_.
  void AddChunk() {
    const size_t c = chunks_.size();
    if (c < chunks_per_slab_) {
      small_.emplace_back(new char[chunk_bytes_]);
      chunks_.push_back(small_.back().get());
      return;
    }
    if (c % chunks_per_slab_ == 0) {
      slabs_.emplace_back(static_cast<char*>(AllocateHugePages(slab_bytes_)), SlabDeleter{slab_bytes_});
    }
    chunks_.push_back(slabs_.back().get() + (c % chunks_per_slab_) * chunk_bytes_);
  }

  // Chunks go in reverse order of creation, so a slab is freed with its first chunk.
  void DropChunk() {
    const size_t c = chunks_.size() - 1;
    chunks_.pop_back();
    if (c < chunks_per_slab_) {
      small_.pop_back();
    } else if (c % chunks_per_slab_ == 0) {
      slabs_.pop_back();
    }
  }

  size_t row_bytes_;
  size_t chunk_bytes_;
  size_t chunks_per_slab_;
  size_t slab_bytes_;
  size_t size_ = 0;
  std::vector<char*> chunks_;                             // chunk c starts at chunks_[c]
  std::vector<std::unique_ptr<char[]>> small_;            // owns chunks [0, chunks_per_slab_)
  std::vector<std::unique_ptr<char, SlabDeleter>> slabs_;  // owns the chunks after those
};

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_ROW_ARENA_H_
