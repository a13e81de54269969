// RowArena: dense, chunked storage for fixed-width table rows.
//
// Rows are numbered 0..size()-1 with no holes (the table moves the last row into
// a freed slot), so scans for expiry, export and capacity eviction walk memory
// linearly. Storage grows in fixed chunks instead of one doubling buffer: a row
// never moves when the arena grows, growth never needs 2x transient memory, and
// the slack is bounded by one chunk. Not thread-safe: the shard's lock guards it.
#ifndef MONOLITH_OPS_CORE_ROW_ARENA_H_
#define MONOLITH_OPS_CORE_ROW_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace monolith {

class RowArena {
 public:
  static constexpr int kChunkShift = 8;  // 256 rows a chunk
  static constexpr size_t kChunkRows = size_t{1} << kChunkShift;

  explicit RowArena(size_t row_bytes) : row_bytes_(row_bytes) {}

  char* row(size_t i) { return chunks_[i >> kChunkShift].get() + (i & (kChunkRows - 1)) * row_bytes_; }
  const char* row(size_t i) const {
    return chunks_[i >> kChunkShift].get() + (i & (kChunkRows - 1)) * row_bytes_;
  }

  // Appends an uninitialised row and returns its number.
  size_t Append() {
    if (size_ == chunks_.size() * kChunkRows) {
      chunks_.emplace_back(new char[kChunkRows * row_bytes_]);
    }
    return size_++;
  }

  // Drops the last row; frees a trailing chunk once it is two chunks behind, so
  // a table oscillating around a chunk boundary does not thrash the allocator.
  void PopBack() {
    --size_;
    if (chunks_.size() * kChunkRows >= size_ + 2 * kChunkRows) chunks_.pop_back();
  }

  void Clear() {
    chunks_.clear();
    size_ = 0;
  }

  size_t size() const { return size_; }
  size_t row_bytes() const { return row_bytes_; }
  size_t MemoryBytes() const { return chunks_.size() * kChunkRows * row_bytes_ + chunks_.capacity() * sizeof(void*); }

 private:
  size_t row_bytes_;
  size_t size_ = 0;
  std::vector<std::unique_ptr<char[]>> chunks_;
};

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_ROW_ARENA_H_
