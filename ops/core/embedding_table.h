// EmbeddingTable: the collisionless embedding hash table, in plain C++.
//
// One row per distinct int64 key, holding the embedding, the fused optimizer's
// slots, the last event time the key was seen and the version of the last
// change. Around that: a frequency filter (min_count, counted in a fixed-size
// sketch), expiry on event time, a capacity bound with least-recently-seen
// eviction, and change tracking for sparse deltas.
//
// This layer knows nothing of TensorFlow: errors are std::invalid_argument, and
// parallelism comes in through a ParallelFor callback. It must not allocate
// per-key heap objects (memory is a product feature: see docs/benchmarks.md).
//
// Thread safety: keys are split over `num_shards` shards by hash. Each shard's
// `mu` guards everything in that shard (index, rows, sketch, deletion log);
// lookups take it shared, mutations exclusive. Whole-table operations (export,
// import, delta export) take every shard's lock in shard order, so they see
// one consistent snapshot and cannot deadlock with each other. The two
// table-wide counters are atomics.
#ifndef MONOLITH_OPS_CORE_EMBEDDING_TABLE_H_
#define MONOLITH_OPS_CORE_EMBEDDING_TABLE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "ops/core/admission_sketch.h"
#include "ops/core/hash_index.h"
#include "ops/core/initializers.h"
#include "ops/core/optimizers.h"
#include "ops/core/row_arena.h"

namespace monolith {

struct TableConfig {
  std::string name = "table";  // used in error messages only
  int dim = 0;
  OptimizerConfig optimizer;
  InitializerConfig initializer;
  int64_t min_count = 1;        // occurrences before a key gets a row
  int64_t expire_after = -1;    // seconds of event time; < 0 means never
  int64_t capacity = -1;        // most rows; < 0 means unbounded
  int num_shards = 0;           // a power of two; 0 picks one from capacity
  int64_t admission_counters = int64_t{1} << 22;  // sketch size when min_count > 1
};

// Runs fn(0) .. fn(num_tasks - 1), possibly in parallel, and returns when all
// are done. The TF kernels pass the op's intra-op thread pool.
using ParallelFor = std::function<void(int64_t num_tasks, const std::function<void(int64_t)>& fn)>;
void SerialFor(int64_t num_tasks, const std::function<void(int64_t)>& fn);

// Event times for a batch: one per key, or a single one for all keys, or none.
struct Timestamps {
  const int64_t* data = nullptr;
  int64_t size = 0;
  int64_t at(int64_t i) const { return size == 1 ? data[0] : data[i]; }
};

// Caller-owned buffers an export is written into, sized by the callback.
struct SnapshotBuffers {
  int64_t* keys;       // [n]
  float* values;       // [n, dim]
  float* slots;        // [n, slot_width]
  int64_t* last_seen;  // [n]
  int64_t* versions;   // [n]
  uint16_t* sketch;    // [sketch_size]
  int64_t* meta;       // [meta_size]
};
struct SnapshotSizes {
  int64_t rows, sketch, meta;
};

// The same tensors, read-only, for import.
struct SnapshotView {
  SnapshotSizes sizes;
  const int64_t* keys;
  const float* values;
  const float* slots;
  const int64_t* last_seen;
  const int64_t* versions;
  const uint16_t* sketch;
  const int64_t* meta;
};

// Rows changed after some version, and keys deleted after it.
struct DeltaBuffers {
  int64_t* keys;     // [rows]
  float* values;     // [rows, dim]
  int64_t* deleted;  // [deleted]
};

class EmbeddingTable {
 public:
  // Throws std::invalid_argument naming the table and the bad setting.
  explicit EmbeddingTable(const TableConfig& config);
  ~EmbeddingTable();

  const TableConfig& config() const { return config_; }
  int dim() const { return config_.dim; }
  int slot_width() const { return slot_width_; }
  int num_shards() const { return static_cast<int>(shards_.size()); }

  // Serving lookup: copies each key's row into out[i * dim]; zeros for keys
  // without a row. Never changes the table.
  void Find(const int64_t* keys, int64_t n, float* out, const ParallelFor& pf) const;

  // Training lookup: counts occurrences toward admission, creates rows for
  // keys that reach min_count (evicting least-recently-seen rows when a shard
  // is full), stamps last-seen, and copies rows out as Find does.
  void LookupForTraining(const int64_t* keys, int64_t n, Timestamps ts, float* out, const ParallelFor& pf);

  // Sums the gradients of repeated keys, then takes one optimizer step per key
  // that has a row; other keys' gradients are dropped. Rejects non-finite
  // gradients before touching anything. Returns the number of rows updated.
  int64_t ApplyGradients(const int64_t* keys, int64_t n, const float* grads, Timestamps ts, const ParallelFor& pf);

  // Removes rows last seen before `now - expire_after`; returns how many.
  int64_t EvictExpired(int64_t now);

  int64_t Size() const;
  int64_t NewestEventTime() const { return newest_event_time_.load(std::memory_order_relaxed); }
  uint64_t CurrentVersion() const { return version_.load(std::memory_order_relaxed); }
  // A random id of this table's history, drawn at creation and again at every
  // Import: versions are only comparable within one generation, so a delta
  // consumer that sees it change must take a full copy.
  uint64_t Generation() const { return generation_.load(std::memory_order_relaxed); }
  size_t MemoryBytes() const;

  // A consistent snapshot of everything (rows, admission sketch, counters).
  void Export(const std::function<SnapshotBuffers(const SnapshotSizes&)>& allocate) const;
  // Replaces the whole table with a snapshot. Validates first; on error the
  // table is unchanged.
  void Import(const SnapshotView& snapshot);

  // Rows whose version is > since, and keys deleted after `since`. Returns the
  // version the delta is complete up to, and sets *complete to false when
  // deletions after `since` were already dropped from the bounded log (the
  // consumer then needs a full snapshot).
  uint64_t ExportDelta(uint64_t since, const std::function<DeltaBuffers(int64_t rows, int64_t deleted)>& allocate,
                       bool* complete) const;
  // Replica side: deletes `deleted`, then upserts rows with the given values.
  void ApplyDelta(const int64_t* keys, int64_t n, const float* values, const int64_t* deleted, int64_t num_deleted);

 private:
  struct Shard;
  struct Plan;
  struct RowHeader {
    int64_t key;
    int64_t last_seen;
    uint64_t version;
  };

  Plan MakePlan(const int64_t* keys, int64_t n) const;
  float* Values(char* row) const { return reinterpret_cast<float*>(row + sizeof(RowHeader)); }
  const float* Values(const char* row) const { return reinterpret_cast<const float*>(row + sizeof(RowHeader)); }
  uint32_t CreateRow(Shard& shard, int64_t key, uint64_t hash, int64_t last_seen, uint64_t version);
  void RemoveRow(Shard& shard, uint32_t row, uint64_t version);
  void EvictLeastRecent(Shard& shard, uint64_t version);
  void NoteEventTime(int64_t t);
  void ValidateSnapshot(const SnapshotView& s) const;

  TableConfig config_;
  int slot_width_;
  size_t row_bytes_;
  int shard_shift_;                  // shard = hash >> shard_shift_
  int64_t shard_capacity_;           // rows per shard; < 0 unbounded
  std::vector<std::unique_ptr<Shard>> shards_;
  std::atomic<int64_t> newest_event_time_;
  std::atomic<uint64_t> version_{0};  // bumped once per mutating call
  std::atomic<uint64_t> generation_{0};
};

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_EMBEDDING_TABLE_H_
