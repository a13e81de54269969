// CPU kernels for the Monolith hash table ops (definitions in
// ops/registrations/hash_table_ops.cc). Each kernel validates tensor shapes,
// converts ids to int64 and calls the core; table semantics live in the core.
#include <cstring>
#include <vector>

#include "ops/core/embedding_table.h"
#include "ops/kernels/table_resource.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/env_time.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace monolith_ops {

namespace {

using monolith::EmbeddingTable;
using monolith::Timestamps;

// Below this many keys a batch is not worth handing to other threads.
constexpr int64_t kParallelThreshold = 4096;

monolith::ParallelFor Workers(OpKernelContext* ctx, int64_t num_keys) {
  if (num_keys < kParallelThreshold) return monolith::SerialFor;
  thread::ThreadPool* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, const std::function<void(int64_t)>& fn) {
    // Each task is a shard or a slice of thousands of keys: tell the pool
    // they are expensive so it hands out one task at a time.
    pool->ParallelFor(n, /*cost_per_unit=*/1 << 20, [&fn](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  };
}

absl::Status GetTable(OpKernelContext* ctx, core::RefCountPtr<TableResource>* out) {
  return LookupResource(ctx, HandleFromInput(ctx, 0), out);
}

// Ids as a flat int64 array; int32 ids are widened into `storage`.
const int64_t* FlatIds(const Tensor& ids, std::vector<int64_t>* storage) {
  if (ids.dtype() == DT_INT64) return ids.flat<int64_t>().data();
  const auto flat = ids.flat<int32>();
  storage->assign(flat.data(), flat.data() + flat.size());
  return storage->data();
}

std::string Who(TableResource* t) { return "HashTable '" + t->table().config().name + "': "; }

// Checks that a timestamps tensor is empty, a scalar, or one per id.
absl::Status CheckTimestamps(TableResource* t, const Tensor& ts, const Tensor& ids) {
  const int64_t n = ts.NumElements();
  if (n == 0 || (n == 1 && ts.dims() <= 1) || ts.shape() == ids.shape()) return absl::OkStatus();
  return errors::InvalidArgument(Who(t), "timestamp shape ", ts.shape().DebugString(),
                                 " must be a scalar or match ids shape ", ids.shape().DebugString());
}

absl::Status CheckDim(TableResource* t, int64_t attr_dim) {
  if (attr_dim == t->table().dim()) return absl::OkStatus();
  return errors::InvalidArgument(Who(t), "op was built for dim ", attr_dim, " but the table has dim ",
                                 t->table().dim());
}

}  // namespace

class HashTableCreateOp : public OpKernel {
 public:
  explicit HashTableCreateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("container", &container_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shared_name", &shared_name_));
    name_ = ctx->def().name();
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_name", &config_.name));
    int64_t dim;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dim", &dim));
    config_.dim = static_cast<int>(dim);
    std::string optimizer, initializer;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("optimizer", &optimizer));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("initializer", &initializer));
    OP_REQUIRES_OK(ctx, Guard([&] {
                     config_.optimizer.kind = monolith::ParseOptimizerKind(optimizer);
                     config_.initializer.kind = monolith::ParseInitializerKind(initializer);
                   }));
    monolith::OptimizerConfig& o = config_.optimizer;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("learning_rate", &o.learning_rate));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("initial_accumulator_value", &o.initial_accumulator_value));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &o.epsilon));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("learning_rate_power", &o.learning_rate_power));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("l1_regularization_strength", &o.l1_regularization_strength));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("l2_regularization_strength", &o.l2_regularization_strength));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("beta", &o.beta));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("beta_1", &o.beta_1));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("beta_2", &o.beta_2));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("initializer_a", &config_.initializer.a));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("initializer_b", &config_.initializer.b));
    int64_t seed, num_shards;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("seed", &seed));
    config_.initializer.seed = static_cast<uint64_t>(seed);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("min_count", &config_.min_count));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("expire_after", &config_.expire_after));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("capacity", &config_.capacity));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_shards", &num_shards));
    config_.num_shards = static_cast<int>(num_shards);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("admission_counters", &config_.admission_counters));
  }

  void Compute(OpKernelContext* ctx) override {
    Tensor handle;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_RESOURCE, TensorShape({}), &handle));
    if (shared_name_ == ResourceHandle::ANONYMOUS_NAME) {
      // Anonymous (TF's convention, as for VarHandleOp): the handle owns the
      // table, which dies with its last handle. Eager and tf.function use this.
      TableResource* table = nullptr;
      OP_REQUIRES_OK(ctx, Create(&table));
      handle.scalar<ResourceHandle>()() =
          ResourceHandle::MakeRefCountingHandle<TableResource>(table, ctx->device()->name());
    } else {
      // Named: the session's resource manager owns it, so it outlives a run
      // (how TF Serving's session-based loader keeps state between requests).
      // An empty shared_name means "named after this node", like TF's tables.
      const std::string container = container_.empty() ? ctx->resource_manager()->default_container() : container_;
      const std::string name = shared_name_.empty() ? name_ : shared_name_;
      TableResource* table = nullptr;
      OP_REQUIRES_OK(ctx, ctx->resource_manager()->LookupOrCreate<TableResource>(
                              container, name, &table, [this](TableResource** out) { return Create(out); }));
      table->Unref();
      handle.scalar<ResourceHandle>()() = MakeResourceHandle<TableResource>(ctx, container, name);
    }
    ctx->set_output(0, handle);
  }

 private:
  absl::Status Create(TableResource** out) const {
    return Guard([&] { *out = new TableResource(std::make_unique<EmbeddingTable>(config_)); });
  }

  std::string container_, shared_name_, name_;
  monolith::TableConfig config_;
};

class HashTableFindOp : public OpKernel {
 public:
  explicit HashTableFindOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dim", &dim_));
  }
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    OP_REQUIRES_OK(ctx, CheckDim(table.get(), dim_));
    const Tensor& ids = ctx->input(1);
    TensorShape shape = ids.shape();
    shape.AddDim(dim_);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    std::vector<int64_t> storage;
    const int64_t* keys = FlatIds(ids, &storage);
    const int64_t n = ids.NumElements();
    OP_REQUIRES_OK(ctx, Guard([&] { table->table().Find(keys, n, out->flat<float>().data(), Workers(ctx, n)); }));
  }

 private:
  int64_t dim_;
};

class HashTableLookupForTrainingOp : public OpKernel {
 public:
  explicit HashTableLookupForTrainingOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dim", &dim_));
  }
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    OP_REQUIRES_OK(ctx, CheckDim(table.get(), dim_));
    const Tensor& ids = ctx->input(1);
    const Tensor& ts = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckTimestamps(table.get(), ts, ids));
    TensorShape shape = ids.shape();
    shape.AddDim(dim_);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    std::vector<int64_t> storage;
    const int64_t* keys = FlatIds(ids, &storage);
    const int64_t n = ids.NumElements();
    const int64_t wall_clock = static_cast<int64_t>(EnvTime::NowSeconds());
    Timestamps times = ts.NumElements() == 0 ? Timestamps{&wall_clock, 1}
                                             : Timestamps{ts.flat<int64_t>().data(), ts.NumElements()};
    OP_REQUIRES_OK(ctx, Guard([&] {
                     table->table().LookupForTraining(keys, n, times, out->flat<float>().data(), Workers(ctx, n));
                   }));
  }

 private:
  int64_t dim_;
};

class HashTableApplyGradientsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    const Tensor& ids = ctx->input(1);
    const Tensor& grads = ctx->input(2);
    const Tensor& ts = ctx->input(3);
    TensorShape want = ids.shape();
    want.AddDim(table->table().dim());
    OP_REQUIRES(ctx, grads.shape() == want,
                errors::InvalidArgument(Who(table.get()), "grads shape ", grads.shape().DebugString(),
                                        " != ids shape ", ids.shape().DebugString(), " + [dim=",
                                        table->table().dim(), "]"));
    OP_REQUIRES_OK(ctx, CheckTimestamps(table.get(), ts, ids));
    std::vector<int64_t> storage;
    const int64_t* keys = FlatIds(ids, &storage);
    const int64_t n = ids.NumElements();
    int64_t updated = 0;
    OP_REQUIRES_OK(ctx, Guard([&] {
                     updated = table->table().ApplyGradients(keys, n, grads.flat<float>().data(),
                                                             Timestamps{ts.flat<int64_t>().data(), ts.NumElements()},
                                                             Workers(ctx, n));
                   }));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = updated;
  }
};

class HashTableEvictExpiredOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    const Tensor& now = ctx->input(1);
    OP_REQUIRES(ctx, now.NumElements() <= 1,
                errors::InvalidArgument(Who(table.get()), "evict takes at most one `now`, got ",
                                        now.shape().DebugString()));
    EmbeddingTable& t = table->table();
    // With no rows ever seen there is nothing to measure idleness against.
    int64_t removed = 0;
    if (now.NumElements() == 1 || t.NewestEventTime() != std::numeric_limits<int64_t>::min()) {
      const int64_t at = now.NumElements() == 1 ? now.flat<int64_t>()(0) : t.NewestEventTime();
      removed = t.EvictExpired(at);
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = removed;
  }
};

class HashTableStatsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    const EmbeddingTable& t = table->table();
    const int64_t values[] = {t.Size(), t.NewestEventTime(), static_cast<int64_t>(t.CurrentVersion()),
                              static_cast<int64_t>(t.MemoryBytes()), static_cast<int64_t>(t.Generation())};
    for (int i = 0; i < 5; ++i) {
      Tensor* out = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(i, TensorShape({}), &out));
      out->scalar<int64_t>()() = values[i];
    }
  }
};

class HashTableExportOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    const EmbeddingTable& t = table->table();
    absl::Status status;
    // Outputs are allocated inside the snapshot callback, once the locked
    // table's size is known, so the export is one copy and one consistent view.
    auto allocate = [&](const monolith::SnapshotSizes& z) {
      Tensor* o[7];
      const TensorShape shapes[7] = {{z.rows}, {z.rows, t.dim()}, {z.rows, t.slot_width()}, {z.rows}, {z.rows},
                                     {z.sketch}, {z.meta}};
      for (int i = 0; i < 7 && status.ok(); ++i) status = ctx->allocate_output(i, shapes[i], &o[i]);
      if (!status.ok()) throw std::runtime_error(std::string(status.message()));
      return monolith::SnapshotBuffers{o[0]->flat<int64_t>().data(), o[1]->flat<float>().data(),
                                       o[2]->flat<float>().data(),   o[3]->flat<int64_t>().data(),
                                       o[4]->flat<int64_t>().data(), o[5]->flat<uint16>().data(),
                                       o[6]->flat<int64_t>().data()};
    };
    const absl::Status guarded = Guard([&] { t.Export(allocate); });
    OP_REQUIRES_OK(ctx, status);
    OP_REQUIRES_OK(ctx, guarded);
  }
};

class HashTableImportOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    EmbeddingTable& t = table->table();
    const Tensor& keys = ctx->input(1);
    const Tensor& values = ctx->input(2);
    const Tensor& slots = ctx->input(3);
    const Tensor& last_seen = ctx->input(4);
    const Tensor& versions = ctx->input(5);
    const Tensor& sketch = ctx->input(6);
    const Tensor& meta = ctx->input(7);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(keys.shape()),
                errors::InvalidArgument(Who(table.get()), "import keys must be a vector, got ",
                                        keys.shape().DebugString()));
    const int64_t n = keys.NumElements();
    auto expect = [&](const Tensor& x, const TensorShape& shape, const char* what) {
      return x.shape() == shape ? absl::OkStatus()
                                : errors::InvalidArgument(Who(table.get()), "import ", what, " shape ",
                                                          x.shape().DebugString(), " != expected ",
                                                          shape.DebugString());
    };
    OP_REQUIRES_OK(ctx, expect(values, TensorShape({n, t.dim()}), "values"));
    OP_REQUIRES_OK(ctx, expect(slots, TensorShape({n, t.slot_width()}), "slots"));
    OP_REQUIRES_OK(ctx, expect(last_seen, TensorShape({n}), "last_seen"));
    OP_REQUIRES_OK(ctx, expect(versions, TensorShape({n}), "versions"));
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(sketch.shape()) && TensorShapeUtils::IsVector(meta.shape()),
                errors::InvalidArgument(Who(table.get()), "import sketch and meta must be vectors"));
    const monolith::SnapshotView view{{n, sketch.NumElements(), meta.NumElements()},
                                      keys.flat<int64_t>().data(),
                                      values.flat<float>().data(),
                                      slots.flat<float>().data(),
                                      last_seen.flat<int64_t>().data(),
                                      versions.flat<int64_t>().data(),
                                      sketch.flat<uint16>().data(),
                                      meta.flat<int64_t>().data()};
    OP_REQUIRES_OK(ctx, Guard([&] { t.Import(view); }));
  }
};

class HashTableExportDeltaOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    const Tensor& since = ctx->input(1);
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(since.shape()),
                errors::InvalidArgument(Who(table.get()), "since_version must be a scalar"));
    const EmbeddingTable& t = table->table();
    absl::Status status;
    auto allocate = [&](int64_t rows, int64_t deleted) {
      Tensor *keys = nullptr, *values = nullptr, *gone = nullptr;
      status = ctx->allocate_output(0, TensorShape({rows}), &keys);
      if (status.ok()) status = ctx->allocate_output(1, TensorShape({rows, t.dim()}), &values);
      if (status.ok()) status = ctx->allocate_output(2, TensorShape({deleted}), &gone);
      if (!status.ok()) throw std::runtime_error(std::string(status.message()));
      return monolith::DeltaBuffers{keys->flat<int64_t>().data(), values->flat<float>().data(),
                                    gone->flat<int64_t>().data()};
    };
    bool complete = true;
    uint64_t upto = 0;
    const absl::Status guarded = Guard([&] {
      upto = t.ExportDelta(static_cast<uint64_t>(std::max<int64_t>(0, since.scalar<int64_t>()())), allocate, &complete);
    });
    OP_REQUIRES_OK(ctx, status);
    OP_REQUIRES_OK(ctx, guarded);
    Tensor *version = nullptr, *done = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({}), &version));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({}), &done));
    version->scalar<int64_t>()() = static_cast<int64_t>(upto);
    done->scalar<bool>()() = complete;
  }
};

class HashTableApplyDeltaOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    core::RefCountPtr<TableResource> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, &table));
    EmbeddingTable& t = table->table();
    const Tensor& keys = ctx->input(1);
    const Tensor& values = ctx->input(2);
    const Tensor& deleted = ctx->input(3);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(keys.shape()) && TensorShapeUtils::IsVector(deleted.shape()),
                errors::InvalidArgument(Who(table.get()), "delta keys and deleted_keys must be vectors"));
    OP_REQUIRES(ctx, values.shape() == TensorShape({keys.NumElements(), t.dim()}),
                errors::InvalidArgument(Who(table.get()), "delta values shape ", values.shape().DebugString(),
                                        " != [", keys.NumElements(), ", ", t.dim(), "]"));
    OP_REQUIRES_OK(ctx, Guard([&] {
                     t.ApplyDelta(keys.flat<int64_t>().data(), keys.NumElements(), values.flat<float>().data(),
                                  deleted.flat<int64_t>().data(), deleted.NumElements());
                   }));
  }
};

#define MONOLITH_CPU(name) Name("Monolith>" name).Device(DEVICE_CPU)
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableCreate"), HashTableCreateOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableFind"), HashTableFindOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableLookupForTraining"), HashTableLookupForTrainingOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableApplyGradients"), HashTableApplyGradientsOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableEvictExpired"), HashTableEvictExpiredOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableStats"), HashTableStatsOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableExport"), HashTableExportOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableImport"), HashTableImportOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableExportDelta"), HashTableExportDeltaOp);
REGISTER_KERNEL_BUILDER(MONOLITH_CPU("HashTableApplyDelta"), HashTableApplyDeltaOp);
#undef MONOLITH_CPU

}  // namespace monolith_ops
}  // namespace tensorflow
