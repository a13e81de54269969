#include "ops/core/embedding_table.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <stdexcept>
#include <tuple>

#include "ops/core/hashing.h"

namespace monolith {

namespace {

constexpr int64_t kSnapshotFormat = 1;
constexpr int kMetaFixed = 6;  // format, num_shards, dim, slot_width, newest time, version
// Deletions remembered for deltas, per table. Past this the oldest half is
// dropped and consumers that are further behind are told to take a snapshot.
constexpr size_t kDeletionLogLimit = size_t{1} << 20;
// Serving lookups split a shard's keys into tasks of at least this many.
constexpr int64_t kMinReadTask = 4096;

uint64_t NewGeneration() {
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

int Log2(uint64_t x) {
  int r = 0;
  while ((uint64_t{1} << r) < x) ++r;
  return r;
}

std::string Quote(const std::string& name) { return "HashTable '" + name + "': "; }

// How many keys ahead the batch loops prefetch. Rows and index slots of a big
// table are cache misses; keeping several in flight, instead of waiting for
// each in turn, is most of the speed of every batch operation.
constexpr int64_t kAhead = 8;

// Asks the CPU to start loading every cache line of [p, p + bytes).
inline void PrefetchRange(const void* p, size_t bytes, bool for_write) {
  constexpr uintptr_t kLine = 64;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(kLine - 1); a < end; a += kLine) {
    if (for_write) {
      __builtin_prefetch(reinterpret_cast<const void*>(a), 1);
    } else {
      __builtin_prefetch(reinterpret_cast<const void*>(a), 0);
    }
  }
}

// Index of the first inf or NaN in x[0, n), or -1. A float is non-finite
// exactly when its exponent bits are all ones; testing the bits as integers
// lets the compiler vectorise the scan (a float sum may not be reordered).
int64_t FirstNonFinite(const float* x, int64_t n) {
  constexpr uint32_t kExponent = 0x7F800000u;
  uint32_t worst = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, x + j, sizeof(bits));
    worst = std::max(worst, bits & kExponent);
  }
  if (worst != kExponent) return -1;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, x + j, sizeof(bits));
    if ((bits & kExponent) == kExponent) return j;
  }
  return -1;
}

// FirstNonFinite over slices on the workers: the check reads every gradient
// before any row may change, and on one thread it was a fifth of an update.
int64_t FirstNonFiniteParallel(const float* x, int64_t n, const ParallelFor& pf) {
  constexpr int64_t kSlice = int64_t{1} << 18;  // 1 MiB of floats per task
  const int64_t tasks = (n + kSlice - 1) / kSlice;
  if (tasks <= 1) return FirstNonFinite(x, n);
  std::vector<int64_t> found(tasks, -1);
  pf(tasks, [&](int64_t t) {
    const int64_t b = t * kSlice;
    const int64_t j = FirstNonFinite(x + b, std::min(kSlice, n - b));
    if (j >= 0) found[t] = b + j;
  });
  for (int64_t j : found) {
    if (j >= 0) return j;
  }
  return -1;
}

// A small open-addressing map from row number to a dense slot, used to sum
// the gradients of repeated keys without a heap node per key.
class RowSlots {
 public:
  explicit RowSlots(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    keys_.assign(cap, HashIndex::kNoRow);
    vals_.resize(cap);
    mask_ = cap - 1;
  }
  // Returns the dense slot for `row`, allocating the next one if new.
  uint32_t Get(uint32_t row, bool* fresh) {
    size_t i = Mix64(row) & mask_;
    while (keys_[i] != HashIndex::kNoRow && keys_[i] != row) i = (i + 1) & mask_;
    *fresh = keys_[i] == HashIndex::kNoRow;
    if (*fresh) {
      keys_[i] = row;
      vals_[i] = next_++;
    }
    return vals_[i];
  }

 private:
  std::vector<uint32_t> keys_, vals_;
  size_t mask_;
  uint32_t next_ = 0;
};

}  // namespace

struct EmbeddingTable::Shard {
  explicit Shard(size_t row_bytes, size_t sketch_width) : rows(row_bytes), sketch(sketch_width) {}
  mutable std::shared_mutex mu;  // guards every member below
  HashIndex index;
  RowArena rows;
  AdmissionSketch sketch;
  std::vector<std::pair<uint64_t, int64_t>> deleted;  // (version, key), oldest first
  uint64_t deleted_floor = 0;  // deletions at or before this version were dropped
};

// Input positions grouped by shard (stable, so repeated keys keep their order
// and gradient sums are reproducible).
struct EmbeddingTable::Plan {
  std::vector<uint64_t> hashes;
  std::vector<int64_t> order;
  std::vector<int64_t> begin;  // num_shards + 1 offsets into order
};

void SerialFor(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  for (int64_t i = 0; i < num_tasks; ++i) fn(i);
}

EmbeddingTable::EmbeddingTable(const TableConfig& config) : config_(config) {
  const std::string who = Quote(config.name);
  if (config.dim <= 0) throw std::invalid_argument(who + "dim must be > 0, got " + std::to_string(config.dim));
  if (config.min_count < 1 || config.min_count > AdmissionSketch::kMaxCount)
    throw std::invalid_argument(who + "min_count must be in [1, 65535], got " + std::to_string(config.min_count));
  if (config.capacity == 0) throw std::invalid_argument(who + "capacity must be > 0 (or None for unbounded)");
  if (config.expire_after == 0) throw std::invalid_argument(who + "expire_after must be > 0 (or None for never)");
  try {
    ValidateOptimizer(config.optimizer);
    ValidateInitializer(config.initializer);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(who + e.what());
  }
  int shards = config.num_shards;
  if (shards == 0) shards = (config.capacity > 0 && config.capacity < 65536) ? 1 : 32;
  if (shards < 1 || shards > 1024 || (shards & (shards - 1)) != 0)
    throw std::invalid_argument(who + "num_shards must be a power of two in [1, 1024], got " + std::to_string(shards));
  config_.num_shards = shards;
  slot_width_ = SlotWidth(config.optimizer, config.dim);
  row_bytes_ = (sizeof(RowHeader) + sizeof(float) * (config.dim + slot_width_) + 7) & ~size_t{7};
  const int bits = Log2(shards);
  shard_shift_ = bits == 0 ? 64 : 64 - bits;
  shard_capacity_ = config.capacity > 0 ? (config.capacity + shards - 1) / shards : -1;
  size_t sketch_width = 0;
  if (config.min_count > 1) {
    if (config.admission_counters < 1)
      throw std::invalid_argument(who + "admission_counters must be > 0");
    const uint64_t per_row = static_cast<uint64_t>(config.admission_counters) / (shards * AdmissionSketch::kDepth);
    sketch_width = 1024;
    while (sketch_width * 2 <= per_row) sketch_width *= 2;
  }
  for (int s = 0; s < shards; ++s) shards_.emplace_back(new Shard(row_bytes_, sketch_width));
  newest_event_time_.store(std::numeric_limits<int64_t>::min());
  generation_.store(NewGeneration());
}

EmbeddingTable::~EmbeddingTable() = default;

EmbeddingTable::Plan EmbeddingTable::MakePlan(const int64_t* keys, int64_t n) const {
  Plan p;
  const int S = num_shards();
  p.hashes.resize(n);
  p.order.resize(n);
  p.begin.assign(S + 1, 0);
  std::vector<uint32_t> shard_of(S > 1 ? n : 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = HashKey(keys[i]);
    p.hashes[i] = h;
    if (S > 1) {
      shard_of[i] = static_cast<uint32_t>(h >> shard_shift_);
      ++p.begin[shard_of[i] + 1];
    }
  }
  if (S == 1) {
    p.begin[1] = n;
    for (int64_t i = 0; i < n; ++i) p.order[i] = i;
    return p;
  }
  for (int s = 0; s < S; ++s) p.begin[s + 1] += p.begin[s];
  std::vector<int64_t> cursor(p.begin.begin(), p.begin.end() - 1);
  for (int64_t i = 0; i < n; ++i) p.order[cursor[shard_of[i]]++] = i;
  return p;
}

void EmbeddingTable::NoteEventTime(int64_t t) {
  int64_t cur = newest_event_time_.load(std::memory_order_relaxed);
  while (t > cur && !newest_event_time_.compare_exchange_weak(cur, t, std::memory_order_relaxed)) {
  }
}

uint32_t EmbeddingTable::CreateRow(Shard& shard, int64_t key, uint64_t hash, int64_t last_seen, uint64_t version) {
  const size_t r = shard.rows.Append();
  char* row = shard.rows.row(r);
  RowHeader* h = reinterpret_cast<RowHeader*>(row);
  h->key = key;
  h->last_seen = last_seen;
  h->version = version;
  float* values = Values(row);
  InitializeRow(config_.initializer, key, config_.dim, values);
  InitSlots(config_.optimizer, config_.dim, values + config_.dim);
  shard.index.Insert(key, hash, static_cast<uint32_t>(r));
  return static_cast<uint32_t>(r);
}

void EmbeddingTable::RemoveRow(Shard& shard, uint32_t r, uint64_t version) {
  const int64_t key = reinterpret_cast<RowHeader*>(shard.rows.row(r))->key;
  shard.index.Erase(key, HashKey(key));
  const size_t last = shard.rows.size() - 1;
  if (r != last) {
    std::memcpy(shard.rows.row(r), shard.rows.row(last), row_bytes_);
    const int64_t moved = reinterpret_cast<RowHeader*>(shard.rows.row(r))->key;
    shard.index.SetRow(moved, HashKey(moved), r);
  }
  shard.rows.PopBack();
  const size_t limit = std::max<size_t>(1024, kDeletionLogLimit / shards_.size());
  if (shard.deleted.size() >= limit) {
    const size_t drop = shard.deleted.size() / 2;
    shard.deleted_floor = shard.deleted[drop - 1].first;
    shard.deleted.erase(shard.deleted.begin(), shard.deleted.begin() + drop);
  }
  shard.deleted.emplace_back(version, key);
}

// Evicts the least recently seen 1/64 of a full shard (at least one row), by
// (last_seen, version). Evicting in bulk keeps the cost of finding victims
// (a linear selection) amortised to O(64) row reads per admitted key.
void EmbeddingTable::EvictLeastRecent(Shard& shard, uint64_t version) {
  const size_t n = shard.rows.size();
  const size_t victims = std::max<size_t>(1, static_cast<size_t>(shard_capacity_) / 64);
  std::vector<std::tuple<int64_t, uint64_t, int64_t>> order(n);
  for (size_t r = 0; r < n; ++r) {
    const RowHeader* h = reinterpret_cast<const RowHeader*>(shard.rows.row(r));
    order[r] = std::make_tuple(h->last_seen, h->version, h->key);
  }
  std::nth_element(order.begin(), order.begin() + (victims - 1), order.end());
  for (size_t i = 0; i < victims && i < n; ++i) {
    const int64_t key = std::get<2>(order[i]);
    RemoveRow(shard, shard.index.Find(key, HashKey(key)), version);
  }
}

void EmbeddingTable::Find(const int64_t* keys, int64_t n, float* out, const ParallelFor& pf) const {
  if (n == 0) return;
  const Plan plan = MakePlan(keys, n);
  const int dim = config_.dim;
  // Tasks are slices of one shard's keys, so a single-shard table still uses
  // every thread: readers share the lock.
  std::vector<std::tuple<int, int64_t, int64_t>> tasks;
  for (int s = 0; s < num_shards(); ++s) {
    for (int64_t b = plan.begin[s]; b < plan.begin[s + 1]; b += kMinReadTask) {
      tasks.emplace_back(s, b, std::min(b + kMinReadTask, plan.begin[s + 1]));
    }
  }
  pf(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const auto [s, b, e] = tasks[t];
    const Shard& shard = *shards_[s];
    std::shared_lock<std::shared_mutex> lock(shard.mu);
    // Two passes, each prefetching a few keys ahead: first resolve slots to
    // rows, then copy rows. At 10M rows both are cache misses, and overlapping
    // them is most of the speed.
    std::vector<const char*> rows(e - b);
    for (int64_t k = b; k < e; ++k) {
      if (k + kAhead < e) shard.index.Prefetch(plan.hashes[plan.order[k + kAhead]]);
      const int64_t i = plan.order[k];
      const uint32_t r = shard.index.Find(keys[i], plan.hashes[i]);
      rows[k - b] = r == HashIndex::kNoRow ? nullptr : shard.rows.row(r);
    }
    for (int64_t k = b; k < e; ++k) {
      if (k + kAhead < e && rows[k + kAhead - b] != nullptr)
        PrefetchRange(Values(rows[k + kAhead - b]), sizeof(float) * dim, /*for_write=*/false);
      float* dst = out + plan.order[k] * dim;
      const char* row = rows[k - b];
      if (row == nullptr) {
        std::memset(dst, 0, sizeof(float) * dim);
      } else {
        std::memcpy(dst, Values(row), sizeof(float) * dim);
      }
    }
  });
}

void EmbeddingTable::LookupForTraining(const int64_t* keys, int64_t n, Timestamps ts, float* out,
                                       const ParallelFor& pf) {
  if (n == 0) return;
  if (ts.size != 1 && ts.size != n) throw std::invalid_argument(Quote(config_.name) + "need one timestamp or one per id");
  const Plan plan = MakePlan(keys, n);
  const int dim = config_.dim;
  const uint64_t version = version_.fetch_add(1, std::memory_order_relaxed) + 1;
  const int64_t min_count = config_.min_count;
  pf(num_shards(), [&](int64_t s) {
    const int64_t b = plan.begin[s], e = plan.begin[s + 1];
    if (b == e) return;
    Shard& shard = *shards_[s];
    std::unique_lock<std::shared_mutex> lock(shard.mu);
    // Pass 1 resolves existing rows with the index slots prefetched ahead.
    std::vector<uint32_t> rows(e - b);
    for (int64_t k = b; k < e; ++k) {
      if (k + kAhead < e) shard.index.Prefetch(plan.hashes[plan.order[k + kAhead]]);
      const int64_t i = plan.order[k];
      rows[k - b] = shard.index.Find(keys[i], plan.hashes[i]);
    }
    // Pass 2 admits, creates and stamps rows and copies them out, prefetching
    // rows ahead. Capacity eviction moves rows (the last row fills the hole),
    // so once it has happened the rows found in pass 1 are stale and every
    // later key is looked up again.
    bool renumbered = false;
    for (int64_t k = b; k < e; ++k) {
      if (!renumbered && k + kAhead < e && rows[k + kAhead - b] != HashIndex::kNoRow)
        PrefetchRange(shard.rows.row(rows[k + kAhead - b]), sizeof(RowHeader) + sizeof(float) * dim, true);
      const int64_t i = plan.order[k];
      const uint64_t hash = plan.hashes[i];
      const int64_t t = ts.at(i);
      float* dst = out + i * dim;
      uint32_t r = renumbered ? shard.index.Find(keys[i], hash) : rows[k - b];
      // A key missing in pass 1 may have been created by its own earlier
      // occurrence in this batch.
      if (r == HashIndex::kNoRow && !renumbered) r = shard.index.Find(keys[i], hash);
      if (r == HashIndex::kNoRow) {
        if (min_count > 1 && shard.sketch.Add(hash) < static_cast<uint32_t>(min_count)) {
          std::memset(dst, 0, sizeof(float) * dim);
          continue;
        }
        if (shard_capacity_ > 0 && static_cast<int64_t>(shard.rows.size()) >= shard_capacity_) {
          EvictLeastRecent(shard, version);
          renumbered = true;
        }
        r = CreateRow(shard, keys[i], hash, t, version);
      }
      char* row = shard.rows.row(r);
      RowHeader* h = reinterpret_cast<RowHeader*>(row);
      if (t > h->last_seen) h->last_seen = t;
      std::memcpy(dst, Values(row), sizeof(float) * dim);
    }
  });
  int64_t newest = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < ts.size; ++i) newest = std::max(newest, ts.data[i]);
  NoteEventTime(newest);
}

int64_t EmbeddingTable::ApplyGradients(const int64_t* keys, int64_t n, const float* grads, Timestamps ts,
                                       const ParallelFor& pf) {
  if (n == 0) return 0;
  if (ts.size != 0 && ts.size != 1 && ts.size != n)
    throw std::invalid_argument(Quote(config_.name) + "need no timestamp, one, or one per id");
  const int dim = config_.dim;
  const int64_t bad = FirstNonFiniteParallel(grads, n * dim, pf);
  if (bad >= 0) {
    throw std::invalid_argument(Quote(config_.name) + "non-finite gradient " + std::to_string(grads[bad]) +
                                " for id " + std::to_string(keys[bad / dim]) + " (element " +
                                std::to_string(bad % dim) + "); no row was updated");
  }
  const Plan plan = MakePlan(keys, n);
  const uint64_t version = version_.fetch_add(1, std::memory_order_relaxed) + 1;
  std::vector<int64_t> updated(num_shards(), 0);
  pf(num_shards(), [&](int64_t s) {
    Shard& shard = *shards_[s];
    const int64_t b = plan.begin[s], e = plan.begin[s + 1];
    if (b == e) return;
    std::unique_lock<std::shared_mutex> lock(shard.mu);
    // Pass 1: resolve rows (index slots prefetched ahead) and sum repeated
    // keys in input order. A key seen once is stepped straight from `grads`;
    // only repeats are summed into a buffer, so the common case copies nothing.
    RowSlots slot_of(e - b);
    std::vector<uint32_t> rows;
    std::vector<int64_t> first;   // per distinct row: input position of its first occurrence
    std::vector<int32_t> summed;  // per distinct row: its sum in `sums`, or -1 if seen once
    std::vector<int64_t> times;
    std::vector<float> sums;
    rows.reserve(e - b);
    first.reserve(e - b);
    summed.reserve(e - b);
    times.reserve(e - b);
    for (int64_t k = b; k < e; ++k) {
      if (k + kAhead < e) shard.index.Prefetch(plan.hashes[plan.order[k + kAhead]]);
      const int64_t i = plan.order[k];
      const uint32_t r = shard.index.Find(keys[i], plan.hashes[i]);
      if (r == HashIndex::kNoRow) continue;
      bool fresh;
      const uint32_t slot = slot_of.Get(r, &fresh);
      const int64_t t = ts.size == 0 ? std::numeric_limits<int64_t>::min() : ts.at(i);
      if (fresh) {
        rows.push_back(r);
        first.push_back(i);
        summed.push_back(-1);
        times.push_back(t);
        continue;
      }
      if (summed[slot] < 0) {
        summed[slot] = static_cast<int32_t>(sums.size() / dim);
        const float* g0 = grads + first[slot] * dim;
        sums.insert(sums.end(), g0, g0 + dim);
      }
      float* acc = sums.data() + static_cast<size_t>(summed[slot]) * dim;
      const float* g = grads + i * dim;
      for (int j = 0; j < dim; ++j) acc[j] += g[j];
      times[slot] = std::max(times[slot], t);
    }
    // Pass 2: one optimizer step per row, its row and gradient prefetched ahead.
    auto grad_of = [&](size_t u) {
      return summed[u] < 0 ? grads + first[u] * dim : sums.data() + static_cast<size_t>(summed[u]) * dim;
    };
    for (size_t u = 0; u < rows.size(); ++u) {
      if (u + kAhead < rows.size()) {
        PrefetchRange(shard.rows.row(rows[u + kAhead]), row_bytes_, /*for_write=*/true);
        PrefetchRange(grad_of(u + kAhead), sizeof(float) * dim, /*for_write=*/false);
      }
      char* row = shard.rows.row(rows[u]);
      RowHeader* h = reinterpret_cast<RowHeader*>(row);
      float* values = Values(row);
      ApplyUpdate(config_.optimizer, dim, grad_of(u), values, values + dim);
      h->version = version;
      if (times[u] > h->last_seen) h->last_seen = times[u];
    }
    updated[s] = static_cast<int64_t>(rows.size());
  });
  int64_t newest = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < ts.size; ++i) newest = std::max(newest, ts.data[i]);
  NoteEventTime(newest);
  int64_t total = 0;
  for (int64_t u : updated) total += u;
  return total;
}

int64_t EmbeddingTable::EvictExpired(int64_t now) {
  if (config_.expire_after < 0) return 0;
  // Saturating: now - expire_after must not wrap for extreme `now`.
  const int64_t threshold = now < std::numeric_limits<int64_t>::min() + config_.expire_after
                                ? std::numeric_limits<int64_t>::min()
                                : now - config_.expire_after;
  const uint64_t version = version_.fetch_add(1, std::memory_order_relaxed) + 1;
  int64_t removed = 0;
  for (auto& shard_ptr : shards_) {
    Shard& shard = *shard_ptr;
    std::unique_lock<std::shared_mutex> lock(shard.mu);
    // Walk backwards: RemoveRow moves the last row (already kept) into the hole.
    for (size_t r = shard.rows.size(); r-- > 0;) {
      if (reinterpret_cast<const RowHeader*>(shard.rows.row(r))->last_seen < threshold) {
        RemoveRow(shard, static_cast<uint32_t>(r), version);
        ++removed;
      }
    }
  }
  return removed;
}

int64_t EmbeddingTable::Size() const {
  int64_t n = 0;
  for (const auto& shard : shards_) {
    std::shared_lock<std::shared_mutex> lock(shard->mu);
    n += static_cast<int64_t>(shard->rows.size());
  }
  return n;
}

size_t EmbeddingTable::MemoryBytes() const {
  size_t bytes = sizeof(*this);
  for (const auto& shard : shards_) {
    std::shared_lock<std::shared_mutex> lock(shard->mu);
    bytes += sizeof(Shard) + shard->index.MemoryBytes() + shard->rows.MemoryBytes() + shard->sketch.MemoryBytes() +
             shard->deleted.capacity() * sizeof(shard->deleted[0]);
  }
  return bytes;
}

void EmbeddingTable::Export(const std::function<SnapshotBuffers(const SnapshotSizes&)>& allocate) const {
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  for (const auto& shard : shards_) locks.emplace_back(shard->mu);
  SnapshotSizes sizes{0, 0, kMetaFixed + num_shards()};
  for (const auto& shard : shards_) {
    sizes.rows += static_cast<int64_t>(shard->rows.size());
    sizes.sketch += static_cast<int64_t>(shard->sketch.num_counters());
  }
  const SnapshotBuffers out = allocate(sizes);
  const int dim = config_.dim;
  int64_t i = 0, c = 0;
  for (int s = 0; s < num_shards(); ++s) {
    const Shard& shard = *shards_[s];
    for (size_t r = 0; r < shard.rows.size(); ++r, ++i) {
      const char* row = shard.rows.row(r);
      const RowHeader* h = reinterpret_cast<const RowHeader*>(row);
      out.keys[i] = h->key;
      out.last_seen[i] = h->last_seen;
      out.versions[i] = static_cast<int64_t>(h->version);
      std::memcpy(out.values + i * dim, Values(row), sizeof(float) * dim);
      if (slot_width_ > 0) std::memcpy(out.slots + i * slot_width_, Values(row) + dim, sizeof(float) * slot_width_);
    }
    if (shard.sketch.num_counters() > 0)
      std::memcpy(out.sketch + c, shard.sketch.counters(), sizeof(uint16_t) * shard.sketch.num_counters());
    c += static_cast<int64_t>(shard.sketch.num_counters());
    out.meta[kMetaFixed + s] = shard.sketch.additions();
  }
  out.meta[0] = kSnapshotFormat;
  out.meta[1] = num_shards();
  out.meta[2] = dim;
  out.meta[3] = slot_width_;
  out.meta[4] = NewestEventTime();
  out.meta[5] = static_cast<int64_t>(CurrentVersion());
}

void EmbeddingTable::ValidateSnapshot(const SnapshotView& s) const {
  const std::string who = Quote(config_.name) + "cannot import: ";
  auto fail = [&](const std::string& what) { throw std::invalid_argument(who + what); };
  if (s.sizes.rows < 0) fail("negative row count");
  if (s.sizes.meta != kMetaFixed + num_shards())
    fail("meta has " + std::to_string(s.sizes.meta) + " entries, expected " + std::to_string(kMetaFixed + num_shards()));
  if (s.meta[0] != kSnapshotFormat) fail("snapshot format " + std::to_string(s.meta[0]) + " is not supported");
  if (s.meta[1] != num_shards())
    fail("snapshot has " + std::to_string(s.meta[1]) + " shards, table has " + std::to_string(num_shards()));
  if (s.meta[2] != config_.dim) fail("snapshot dim " + std::to_string(s.meta[2]) + " != table dim " + std::to_string(config_.dim));
  if (s.meta[3] != slot_width_)
    fail("snapshot has " + std::to_string(s.meta[3]) + " optimizer slot floats per row, table's optimizer (" +
         OptimizerName(config_.optimizer.kind) + ") needs " + std::to_string(slot_width_));
  size_t sketch = 0;
  for (const auto& shard : shards_) sketch += shard->sketch.num_counters();
  if (static_cast<size_t>(s.sizes.sketch) != sketch)
    fail("admission sketch has " + std::to_string(s.sizes.sketch) + " counters, table has " + std::to_string(sketch) +
         " (min_count or admission_counters differ)");
}

void EmbeddingTable::Import(const SnapshotView& s) {
  ValidateSnapshot(s);
  const int dim = config_.dim;
  // Build the new shards off to the side, so a bad snapshot (duplicate keys)
  // leaves the live table untouched and readers keep going meanwhile.
  std::vector<std::unique_ptr<Shard>> fresh;
  for (const auto& shard : shards_) fresh.emplace_back(new Shard(row_bytes_, shard->sketch.width()));
  std::vector<int64_t> per_shard(num_shards(), 0);
  for (int64_t i = 0; i < s.sizes.rows; ++i) ++per_shard[num_shards() == 1 ? 0 : HashKey(s.keys[i]) >> shard_shift_];
  for (int sh = 0; sh < num_shards(); ++sh) fresh[sh]->index.Reserve(per_shard[sh]);
  for (int64_t i = 0; i < s.sizes.rows; ++i) {
    const uint64_t hash = HashKey(s.keys[i]);
    Shard& shard = *fresh[num_shards() == 1 ? 0 : hash >> shard_shift_];
    if (shard.index.Find(s.keys[i], hash) != HashIndex::kNoRow)
      throw std::invalid_argument(Quote(config_.name) + "cannot import: duplicate key " + std::to_string(s.keys[i]));
    const size_t r = shard.rows.Append();
    char* row = shard.rows.row(r);
    RowHeader* h = reinterpret_cast<RowHeader*>(row);
    h->key = s.keys[i];
    h->last_seen = s.last_seen[i];
    h->version = static_cast<uint64_t>(s.versions[i]);
    std::memcpy(Values(row), s.values + i * dim, sizeof(float) * dim);
    if (slot_width_ > 0) std::memcpy(Values(row) + dim, s.slots + i * slot_width_, sizeof(float) * slot_width_);
    shard.index.Insert(s.keys[i], hash, static_cast<uint32_t>(r));
  }
  int64_t c = 0;
  for (int sh = 0; sh < num_shards(); ++sh) {
    AdmissionSketch& sketch = fresh[sh]->sketch;
    if (sketch.num_counters() > 0)
      std::memcpy(sketch.mutable_counters(), s.sketch + c, sizeof(uint16_t) * sketch.num_counters());
    c += static_cast<int64_t>(sketch.num_counters());
    sketch.set_additions(s.meta[kMetaFixed + sh]);
  }
  std::vector<std::unique_lock<std::shared_mutex>> locks;
  for (const auto& shard : shards_) locks.emplace_back(shard->mu);
  for (int sh = 0; sh < num_shards(); ++sh) {
    Shard& live = *shards_[sh];
    std::swap(live.index, fresh[sh]->index);
    std::swap(live.rows, fresh[sh]->rows);
    std::swap(live.sketch, fresh[sh]->sketch);
    // Consumers of deltas cannot follow a wholesale replacement.
    live.deleted.clear();
    live.deleted_floor = static_cast<uint64_t>(s.meta[5]);
  }
  newest_event_time_.store(s.meta[4]);
  version_.store(static_cast<uint64_t>(s.meta[5]));
  generation_.store(NewGeneration());
}

uint64_t EmbeddingTable::ExportDelta(uint64_t since,
                                     const std::function<DeltaBuffers(int64_t rows, int64_t deleted)>& allocate,
                                     bool* complete) const {
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  for (const auto& shard : shards_) locks.emplace_back(shard->mu);
  const uint64_t upto = CurrentVersion();
  int64_t rows = 0, deleted = 0;
  *complete = true;
  for (const auto& shard : shards_) {
    if (since < shard->deleted_floor) *complete = false;
    for (size_t r = 0; r < shard->rows.size(); ++r)
      rows += reinterpret_cast<const RowHeader*>(shard->rows.row(r))->version > since;
    for (const auto& d : shard->deleted) deleted += d.first > since;
  }
  const DeltaBuffers out = allocate(rows, deleted);
  const int dim = config_.dim;
  int64_t i = 0, j = 0;
  for (const auto& shard : shards_) {
    for (size_t r = 0; r < shard->rows.size(); ++r) {
      const char* row = shard->rows.row(r);
      const RowHeader* h = reinterpret_cast<const RowHeader*>(row);
      if (h->version <= since) continue;
      out.keys[i] = h->key;
      std::memcpy(out.values + i * dim, Values(row), sizeof(float) * dim);
      ++i;
    }
    for (const auto& d : shard->deleted) {
      if (d.first > since) out.deleted[j++] = d.second;
    }
  }
  return upto;
}

void EmbeddingTable::ApplyDelta(const int64_t* keys, int64_t n, const float* values, const int64_t* deleted,
                                int64_t num_deleted) {
  const uint64_t version = version_.fetch_add(1, std::memory_order_relaxed) + 1;
  const int dim = config_.dim;
  const Plan gone = MakePlan(deleted, num_deleted);
  const Plan plan = MakePlan(keys, n);
  for (int s = 0; s < num_shards(); ++s) {
    Shard& shard = *shards_[s];
    std::unique_lock<std::shared_mutex> lock(shard.mu);
    for (int64_t k = gone.begin[s]; k < gone.begin[s + 1]; ++k) {
      const int64_t i = gone.order[k];
      const uint32_t r = shard.index.Find(deleted[i], gone.hashes[i]);
      if (r != HashIndex::kNoRow) RemoveRow(shard, r, version);
    }
    for (int64_t k = plan.begin[s]; k < plan.begin[s + 1]; ++k) {
      const int64_t i = plan.order[k];
      uint32_t r = shard.index.Find(keys[i], plan.hashes[i]);
      if (r == HashIndex::kNoRow) r = CreateRow(shard, keys[i], plan.hashes[i], NewestEventTime(), version);
      char* row = shard.rows.row(r);
      reinterpret_cast<RowHeader*>(row)->version = version;
      std::memcpy(Values(row), values + i * dim, sizeof(float) * dim);
    }
  }
}

}  // namespace monolith
