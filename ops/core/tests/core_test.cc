// Unit tests of the TF-free table core: index, optimizers, admission, expiry,
// capacity, snapshots, deltas and concurrency. Built and run by `make test`.
#include <atomic>
#include <map>
#include <tuple>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>

#include "ops/core/admission_sketch.h"
#include "ops/core/embedding_table.h"
#include "ops/core/hash_index.h"
#include "ops/core/hashing.h"
#include "ops/core/row_arena.h"
#include "ops/core/tests/check.h"

using namespace monolith;

namespace {

TableConfig Config(int dim) {
  TableConfig c;
  c.name = "test";
  c.dim = dim;
  c.initializer.kind = InitializerKind::kZeros;
  c.optimizer.kind = OptimizerKind::kSgd;
  c.optimizer.learning_rate = 1.0f;
  return c;
}

std::vector<float> Find(const EmbeddingTable& t, const std::vector<int64_t>& keys) {
  std::vector<float> out(keys.size() * t.dim());
  t.Find(keys.data(), keys.size(), out.data(), SerialFor);
  return out;
}

void Train(EmbeddingTable& t, const std::vector<int64_t>& keys, int64_t time) {
  std::vector<float> out(keys.size() * t.dim());
  t.LookupForTraining(keys.data(), keys.size(), Timestamps{&time, 1}, out.data(), SerialFor);
}

struct Snapshot {
  std::vector<int64_t> keys, last_seen, versions, meta;
  std::vector<float> values, slots;
  std::vector<uint16_t> sketch;
};

Snapshot Export(const EmbeddingTable& t) {
  Snapshot s;
  t.Export([&](const SnapshotSizes& z) {
    s.keys.resize(z.rows);
    s.last_seen.resize(z.rows);
    s.versions.resize(z.rows);
    s.values.resize(z.rows * t.dim());
    s.slots.resize(z.rows * t.slot_width());
    s.sketch.resize(z.sketch);
    s.meta.resize(z.meta);
    return SnapshotBuffers{s.keys.data(),     s.values.data(), s.slots.data(), s.last_seen.data(),
                           s.versions.data(), s.sketch.data(), s.meta.data()};
  });
  return s;
}

SnapshotView View(const Snapshot& s) {
  return SnapshotView{{(int64_t)s.keys.size(), (int64_t)s.sketch.size(), (int64_t)s.meta.size()},
                      s.keys.data(), s.values.data(), s.slots.data(), s.last_seen.data(), s.versions.data(),
                      s.sketch.data(), s.meta.data()};
}

// key -> (values, slots, last_seen): an order-independent view of a snapshot.
std::map<int64_t, std::tuple<std::vector<float>, std::vector<float>, int64_t>> Rows(const Snapshot& s, int dim, int sw) {
  std::map<int64_t, std::tuple<std::vector<float>, std::vector<float>, int64_t>> m;
  for (size_t i = 0; i < s.keys.size(); ++i) {
    m[s.keys[i]] = {std::vector<float>(s.values.begin() + i * dim, s.values.begin() + (i + 1) * dim),
                    std::vector<float>(s.slots.begin() + i * sw, s.slots.begin() + (i + 1) * sw), s.last_seen[i]};
  }
  return m;
}

}  // namespace

TEST(IndexMatchesReferenceUnderRandomInsertsAndErases) {
  HashIndex index;
  std::unordered_map<int64_t, uint32_t> ref;
  std::mt19937_64 rng(7);
  const int64_t extremes[] = {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), 0, -1};
  for (int64_t k : extremes) {
    index.Insert(k, HashKey(k), 1000);
    ref[k] = 1000;
  }
  for (int step = 0; step < 200000; ++step) {
    const int64_t k = static_cast<int64_t>(rng() % 5000) - 2500;  // dense range: long probe runs
    auto it = ref.find(k);
    if (it == ref.end()) {
      index.Insert(k, HashKey(k), step);
      ref[k] = step;
    } else if (rng() % 2) {
      index.Erase(k, HashKey(k));
      ref.erase(it);
    }
  }
  CHECK_EQ(index.size(), ref.size());
  for (const auto& [k, r] : ref) CHECK_EQ(index.Find(k, HashKey(k)), r);
  for (int64_t k = -3000; k < 3000; ++k) {
    if (!ref.count(k)) CHECK_EQ(index.Find(k, HashKey(k)), HashIndex::kNoRow);
  }
}

// Growing past the small chunks into huge-page slabs and shrinking back across
// slab boundaries keeps every row's bytes, and frees what it should.
TEST(RowArenaKeepsRowsAcrossSlabBoundaries) {
  RowArena arena(152);  // 256-row chunks of 38,912 bytes: 53 chunks per 2 MiB slab
  auto fill = [&](size_t r) { std::memset(arena.row(r), static_cast<int>(r * 7 % 251), 152); };
  auto ok = [&](size_t r) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(arena.row(r));
    for (int b = 0; b < 152; ++b)
      if (p[b] != r * 7 % 251) return false;
    return true;
  };
  const size_t big = 256 * 53 * 3 + 100;  // the small chunks, two full slabs and part of a third
  for (size_t r = 0; r < big; ++r) {
    CHECK_EQ(arena.Append(), r);
    fill(r);
  }
  const size_t grown = arena.MemoryBytes();
  CHECK(grown >= 3 * kHugePageBytes);
  for (size_t r = 0; r < big; ++r) CHECK(ok(r));
  while (arena.size() > 256 * 53 - 5) arena.PopBack();  // back into the small chunks
  CHECK(arena.MemoryBytes() <= 53 * 256 * 152 + kHugePageBytes + 4096);  // one slab kept: PopBack lags a chunk
  for (size_t r = 0; r < arena.size(); ++r) CHECK(ok(r));
  for (size_t r = arena.size(); r < big; ++r) {
    CHECK_EQ(arena.Append(), r);
    fill(r);
  }
  for (size_t r = 0; r < big; ++r) CHECK(ok(r));
  CHECK_EQ(arena.MemoryBytes(), grown);
  arena.Clear();
  CHECK_EQ(arena.size(), size_t{0});
  CHECK(arena.MemoryBytes() < 4096);
}

TEST(SketchCountsExactlyWithoutCollisionsAndSaturates) {
  AdmissionSketch sketch(1 << 16);
  for (int i = 1; i <= 50; ++i) CHECK_EQ(sketch.Add(HashKey(42)), static_cast<uint32_t>(i));
  CHECK_EQ(sketch.Estimate(HashKey(43)), 0u);
  AdmissionSketch tiny(1024);
  uint32_t last = 0;
  for (int i = 0; i < 200000; ++i) last = tiny.Add(HashKey(1));
  CHECK(last <= AdmissionSketch::kMaxCount);
  CHECK(last > 0);  // aging halves, never wipes a hot key
}

TEST(AdmissionOnMinCountOccurrence) {
  for (int64_t min_count : {1, 3, 50}) {
    TableConfig c = Config(2);
    c.min_count = min_count;
    EmbeddingTable t(c);
    for (int64_t occurrence = 1; occurrence <= min_count; ++occurrence) {
      CHECK_EQ(t.Size(), 0);
      Train(t, {77}, 100);
    }
    CHECK_EQ(t.Size(), 1);
    // Serving lookups never count toward admission.
    for (int i = 0; i < 100; ++i) Find(t, {78});
    CHECK_EQ(t.Size(), 1);
  }
}

TEST(DuplicateIdsInOneBatchCountAndSum) {
  TableConfig c = Config(2);
  c.min_count = 3;
  EmbeddingTable t(c);
  Train(t, {5, 5, 5, 6}, 10);  // 5 reaches three occurrences inside the batch
  CHECK_EQ(t.Size(), 1);
  const int64_t keys[] = {5, 5, 6};
  const float grads[] = {1, 2, 10, 20, 100, 200};
  CHECK_EQ(t.ApplyGradients(keys, 3, grads, Timestamps{}, SerialFor), 1);
  const std::vector<float> v = Find(t, {5, 6});
  CHECK_EQ(v[0], -11.0f);  // one SGD step with the summed gradient
  CHECK_EQ(v[1], -22.0f);
  CHECK_EQ(v[2], 0.0f);    // not admitted: gradient dropped
}

TEST(ExpiryUsesEventTime) {
  TableConfig c = Config(1);
  c.expire_after = 100;
  EmbeddingTable t(c);
  Train(t, {1}, 1000);
  Train(t, {2}, 1050);
  Train(t, {3}, 1200);
  CHECK_EQ(t.NewestEventTime(), 1200);
  CHECK_EQ(t.EvictExpired(t.NewestEventTime()), 2);  // 1 and 2 are older than 1100
  CHECK_EQ(t.Size(), 1);
  Train(t, {3}, 500);  // replaying an old event does not move last-seen back
  CHECK_EQ(t.EvictExpired(1299), 0);
  CHECK_EQ(t.EvictExpired(1301), 1);
}

TEST(CapacityKeepsMostRecentlySeen) {
  TableConfig c = Config(1);
  c.capacity = 640;
  EmbeddingTable t(c);
  for (int64_t k = 0; k < 5000; ++k) Train(t, {k}, k);
  CHECK(t.Size() <= 640);
  CHECK(t.Size() >= 630);
  Snapshot s = Export(t);
  for (int64_t k : s.keys) CHECK(k >= 5000 - 640);
}

// Batch lookups resolve rows in one pass and use them in a second; capacity
// evictions in between renumber rows. Every output must still be its own key's
// row (here: its initial value, a pure function of the key).
TEST(EvictionInsideABatchReturnsEachKeysOwnRow) {
  TableConfig c = Config(3);
  c.initializer.kind = InitializerKind::kRandomUniform;
  c.initializer.a = -1;
  c.initializer.b = 1;
  c.capacity = 256;
  EmbeddingTable t(c);
  std::mt19937_64 rng(7);
  for (int round = 0; round < 5; ++round) {
    std::vector<int64_t> keys(3000);
    for (auto& k : keys) k = static_cast<int64_t>(rng() % 2000);  // repeats, and more keys than capacity
    std::vector<float> out(keys.size() * 3);
    const int64_t ts = round;
    t.LookupForTraining(keys.data(), keys.size(), Timestamps{&ts, 1}, out.data(), SerialFor);
    CHECK(t.Size() <= 256);
    for (size_t i = 0; i < keys.size(); ++i) {
      float want[3];
      InitializeRow(c.initializer, keys[i], 3, want);
      for (int j = 0; j < 3; ++j) CHECK_EQ(out[i * 3 + j], want[j]);
    }
  }
}

TEST(NonFiniteGradientFoundAnywhere) {
  EmbeddingTable t(Config(4));
  std::vector<int64_t> keys(1000);
  for (int64_t i = 0; i < 1000; ++i) keys[i] = i;
  Train(t, keys, 0);
  std::vector<float> grads(4000, 3.0e38f);  // huge but finite: accepted
  CHECK_EQ(t.ApplyGradients(keys.data(), 1000, grads.data(), Timestamps{}, SerialFor), int64_t{1000});
  const std::vector<float> before = Find(t, keys);
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::nanf(""), -std::nanf("")}) {
    for (size_t at : {size_t{0}, size_t{1717}, size_t{3999}}) {
      std::vector<float> g(4000, 0.5f);
      g[at] = bad;
      CHECK_THROWS(t.ApplyGradients(keys.data(), 1000, g.data(), Timestamps{}, SerialFor));
    }
  }
  CHECK(Find(t, keys) == before);
}

// Big batches check their gradients in slices on several threads: the error
// must still name the first bad id, whichever slice it is in, and no row moves.
TEST(NonFiniteGradientFoundByParallelCheck) {
  const int dim = 8;
  const int64_t n = 100000;  // 800k floats: four slices
  EmbeddingTable t(Config(dim));
  std::vector<int64_t> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = 7 * i + 1;
  Train(t, keys, 0);
  const std::vector<float> before = Find(t, keys);
  const ParallelFor two_threads = [](int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::atomic<int64_t> next{0};
    auto work = [&] {
      for (int64_t i = next++; i < tasks; i = next++) fn(i);
    };
    std::thread other(work);
    work();
    other.join();
  };
  for (int64_t at : {int64_t{0}, int64_t{(1 << 18) - 1}, int64_t{1} << 18, n * dim - 1}) {
    std::vector<float> g(n * dim, 0.25f);
    g[at] = std::nanf("");
    if (at + 3 * dim < n * dim) g[at + 3 * dim] = std::numeric_limits<float>::infinity();  // a later one
    std::string message;
    try {
      t.ApplyGradients(keys.data(), n, g.data(), Timestamps{}, two_threads);
    } catch (const std::invalid_argument& e) {
      message = e.what();
    }
    CHECK(message.find("for id " + std::to_string(keys[at / dim]) + " ") != std::string::npos);
  }
  CHECK(Find(t, keys) == before);
}

TEST(NonFiniteGradientRejectedAndTableUnchanged) {
  EmbeddingTable t(Config(2));
  Train(t, {1, 2}, 0);
  const int64_t keys[] = {1, 2};
  const float bad[] = {1, 2, 3, std::numeric_limits<float>::infinity()};
  CHECK_THROWS(t.ApplyGradients(keys, 2, bad, Timestamps{}, SerialFor));
  const float nan[] = {std::nanf(""), 0, 0, 0};
  CHECK_THROWS(t.ApplyGradients(keys, 2, nan, Timestamps{}, SerialFor));
  for (float x : Find(t, {1, 2})) CHECK_EQ(x, 0.0f);
}

TEST(BadConfigsAreRejected) {
  TableConfig c = Config(0);
  CHECK_THROWS(EmbeddingTable t(c));
  c = Config(4);
  c.min_count = 0;
  CHECK_THROWS(EmbeddingTable t(c));
  c = Config(4);
  c.optimizer.learning_rate = -1;
  CHECK_THROWS(EmbeddingTable t(c));
  CHECK_THROWS(ParseOptimizerKind("rmsprop"));
  CHECK_THROWS(ParseInitializerKind("ones"));
}

TEST(InitializerIsAPureFunctionOfSeedAndKey) {
  InitializerConfig c;
  c.kind = InitializerKind::kTruncatedNormal;
  c.a = 0;
  c.b = 0.05f;
  c.seed = 3;
  float a[64], b[64], other[64];
  InitializeRow(c, 12345, 64, a);
  InitializeRow(c, 12345, 64, b);
  InitializeRow(c, 12346, 64, other);
  CHECK(std::memcmp(a, b, sizeof(a)) == 0);
  CHECK(std::memcmp(a, other, sizeof(a)) != 0);
  for (float x : a) CHECK(std::fabs(x) <= 0.1f);
}

TEST(SnapshotRoundTripIsExact) {
  TableConfig c = Config(3);
  c.optimizer.kind = OptimizerKind::kAdam;
  c.optimizer.learning_rate = 0.01f;
  c.initializer.kind = InitializerKind::kRandomNormal;
  c.initializer.a = 0;
  c.initializer.b = 0.05f;
  c.min_count = 2;
  c.admission_counters = 1 << 16;
  EmbeddingTable a(c);
  std::vector<int64_t> keys;
  for (int64_t k = 0; k < 3000; ++k) keys.push_back(k % 1700);
  Train(a, keys, 99);
  std::vector<float> grads(keys.size() * 3, 0.5f);
  a.ApplyGradients(keys.data(), keys.size(), grads.data(), Timestamps{}, SerialFor);
  Snapshot s = Export(a);
  EmbeddingTable b(c);
  b.Import(View(s));
  Snapshot s2 = Export(b);
  CHECK(Rows(s, 3, a.slot_width()) == Rows(s2, 3, b.slot_width()));
  CHECK(s.sketch == s2.sketch);
  CHECK(s.meta == s2.meta);
  // A snapshot with a duplicate key is rejected and the table is unchanged.
  Snapshot dup = s;
  dup.keys[1] = dup.keys[0];
  CHECK_THROWS(b.Import(View(dup)));
  CHECK(Rows(Export(b), 3, b.slot_width()) == Rows(s, 3, a.slot_width()));
}

TEST(DeltaCarriesChangedAndDeletedRows) {
  TableConfig c = Config(2);
  c.expire_after = 10;
  EmbeddingTable trainer(c), replica(c);
  Train(trainer, {1, 2, 3}, 100);
  auto ship = [&](uint64_t since, bool* complete) {
    std::vector<int64_t> keys, deleted;
    std::vector<float> values;
    const uint64_t upto = trainer.ExportDelta(
        since,
        [&](int64_t rows, int64_t del) {
          keys.resize(rows);
          values.resize(rows * 2);
          deleted.resize(del);
          return DeltaBuffers{keys.data(), values.data(), deleted.data()};
        },
        complete);
    replica.ApplyDelta(keys.data(), keys.size(), values.data(), deleted.data(), deleted.size());
    return std::make_pair(upto, keys.size());
  };
  bool complete;
  auto [v1, n1] = ship(0, &complete);
  CHECK(complete);
  CHECK_EQ(n1, 3u);
  const int64_t k[] = {2};
  const float g[] = {1, 1};
  trainer.ApplyGradients(k, 1, g, Timestamps{}, SerialFor);
  Train(trainer, {4}, 200);
  trainer.EvictExpired(200);  // 1, 2, 3 expire
  auto [v2, n2] = ship(v1, &complete);
  CHECK_EQ(n2, 1u);  // only 4 is live and changed
  CHECK_EQ(replica.Size(), 1);
  CHECK(Find(replica, {4}) == Find(trainer, {4}));
  (void)v2;
}

TEST(ConcurrentLookupsAndUpdatesKeepInvariants) {
  TableConfig c = Config(4);
  c.capacity = 1 << 17;
  c.num_shards = 8;
  EmbeddingTable t(c);
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < 8; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      std::vector<int64_t> keys(512);
      std::vector<float> out(keys.size() * 4), grads(keys.size() * 4, 1.0f);
      for (int iter = 0; iter < 200; ++iter) {
        for (auto& k : keys) k = static_cast<int64_t>(rng() % 200000);
        int64_t time = iter;
        if (w % 2 == 0) {
          t.LookupForTraining(keys.data(), keys.size(), Timestamps{&time, 1}, out.data(), SerialFor);
          t.ApplyGradients(keys.data(), keys.size(), grads.data(), Timestamps{}, SerialFor);
        } else {
          t.Find(keys.data(), keys.size(), out.data(), SerialFor);
          // SGD with lr 1 on unit gradients keeps every element a whole number <= 0.
          for (float x : out) if (x > 0 || x != std::floor(x)) failed = true;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(!failed);
  Snapshot s = Export(t);
  std::set<int64_t> unique(s.keys.begin(), s.keys.end());
  CHECK_EQ(unique.size(), s.keys.size());
  CHECK(static_cast<int64_t>(s.keys.size()) <= c.capacity);
  CHECK_EQ(static_cast<int64_t>(s.keys.size()), t.Size());
}

TEST_MAIN()
