// Op definitions (names, attributes, shape functions) for the Monolith hash
// table. Kernels live in ops/kernels/; keeping definitions apart lets a serving
// binary and the pip package share one registry of signatures.
//
// Every op is namespaced "Monolith>" so SavedModels say whose ops they carry
// (pass namespace_whitelist=["Monolith"] to tf.saved_model.SaveOptions).
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace monolith_ops {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

namespace {

// ids.shape + [dim]
absl::Status IdsTimesDim(InferenceContext* c) {
  int64_t dim;
  TF_RETURN_IF_ERROR(c->GetAttr("dim", &dim));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->Concatenate(c->input(1), c->Vector(dim), &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("Monolith>HashTableCreate")
    .Output("table: resource")
    .Attr("container: string = ''")
    .Attr("shared_name: string = ''")
    .Attr("table_name: string = 'table'")
    .Attr("dim: int")
    .Attr("optimizer: {'sgd', 'adagrad', 'ftrl', 'adam'} = 'adagrad'")
    .Attr("learning_rate: float = 0.05")
    .Attr("initial_accumulator_value: float = 0.1")
    .Attr("epsilon: float = 1e-7")
    .Attr("learning_rate_power: float = -0.5")
    .Attr("l1_regularization_strength: float = 0.0")
    .Attr("l2_regularization_strength: float = 0.0")
    .Attr("beta: float = 0.0")
    .Attr("beta_1: float = 0.9")
    .Attr("beta_2: float = 0.999")
    .Attr("initializer: {'zeros', 'random_uniform', 'random_normal', 'truncated_normal'} = 'random_uniform'")
    .Attr("initializer_a: float = -0.05")
    .Attr("initializer_b: float = 0.05")
    .Attr("seed: int = 0")
    .Attr("min_count: int = 1")
    .Attr("expire_after: int = -1")
    .Attr("capacity: int = -1")
    .Attr("num_shards: int = 0")
    .Attr("admission_counters: int = 4194304")
    .SetIsStateful()
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc(R"doc(
Creates a collisionless embedding hash table. With shared_name equal to
TF's anonymous-resource name (ANONYMOUS_NAME in resource_handle.h) the table
is owned by the returned handle
(eager and tf.function use); otherwise it lives in the resource manager under
shared_name, or under the node's name when shared_name is empty (graph and
TF Serving use, where the table must outlive a session run).
)doc");

REGISTER_OP("Monolith>HashTableFind")
    .Input("table: resource")
    .Input("ids: Tid")
    .Output("values: float")
    .Attr("Tid: {int32, int64} = DT_INT64")
    .Attr("dim: int")
    .SetShapeFn(IdsTimesDim)
    .Doc("Serving lookup: each id's row, zeros for ids without a row. Never changes the table.");

REGISTER_OP("Monolith>HashTableLookupForTraining")
    .Input("table: resource")
    .Input("ids: Tid")
    .Input("timestamps: int64")
    .Output("values: float")
    .Attr("Tid: {int32, int64} = DT_INT64")
    .Attr("dim: int")
    .SetIsStateful()
    .SetShapeFn(IdsTimesDim)
    .Doc(R"doc(
Training lookup: counts occurrences toward admission, creates admitted rows,
stamps last-seen with the event time (one per id, one for all, or none for the
wall clock), and returns the rows.
)doc");

REGISTER_OP("Monolith>HashTableApplyGradients")
    .Input("table: resource")
    .Input("ids: Tid")
    .Input("grads: float")
    .Input("timestamps: int64")
    .Output("updated: int64")
    .Attr("Tid: {int32, int64} = DT_INT64")
    .SetIsStateful()
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc("Sums repeated ids' gradients and takes one fused optimizer step per existing row.");

REGISTER_OP("Monolith>HashTableEvictExpired")
    .Input("table: resource")
    .Input("now: int64")
    .Output("removed: int64")
    .SetIsStateful()
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc("Removes rows idle for longer than expire_after before `now` (empty: the newest event time seen).");

REGISTER_OP("Monolith>HashTableStats")
    .Input("table: resource")
    .Output("size: int64")
    .Output("newest_event_time: int64")
    .Output("version: int64")
    .Output("memory_bytes: int64")
    .Output("generation: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < 5; ++i) c->set_output(i, c->Scalar());
      return absl::OkStatus();
    });

REGISTER_OP("Monolith>HashTableExport")
    .Input("table: resource")
    .Output("keys: int64")
    .Output("values: float")
    .Output("slots: float")
    .Output("last_seen: int64")
    .Output("versions: int64")
    .Output("sketch: uint16")
    .Output("meta: int64")
    .Attr("dim: int")
    .Attr("slot_width: int")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      int64_t dim, slot_width;
      TF_RETURN_IF_ERROR(c->GetAttr("dim", &dim));
      TF_RETURN_IF_ERROR(c->GetAttr("slot_width", &slot_width));
      DimensionHandle n = c->UnknownDim();
      c->set_output(0, c->Vector(n));
      c->set_output(1, c->Matrix(n, dim));
      c->set_output(2, c->Matrix(n, slot_width));
      c->set_output(3, c->Vector(n));
      c->set_output(4, c->Vector(n));
      c->set_output(5, c->Vector(c->UnknownDim()));
      c->set_output(6, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc("A consistent snapshot of every row, the admission sketch and the table's counters.");

REGISTER_OP("Monolith>HashTableImport")
    .Input("table: resource")
    .Input("keys: int64")
    .Input("values: float")
    .Input("slots: float")
    .Input("last_seen: int64")
    .Input("versions: int64")
    .Input("sketch: uint16")
    .Input("meta: int64")
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("Replaces the table's contents with an export. Validates first; on error the table is unchanged.");

REGISTER_OP("Monolith>HashTableExportDelta")
    .Input("table: resource")
    .Input("since_version: int64")
    .Output("keys: int64")
    .Output("values: float")
    .Output("deleted_keys: int64")
    .Output("version: int64")
    .Output("complete: bool")
    .Attr("dim: int")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      int64_t dim;
      TF_RETURN_IF_ERROR(c->GetAttr("dim", &dim));
      DimensionHandle n = c->UnknownDim();
      c->set_output(0, c->Vector(n));
      c->set_output(1, c->Matrix(n, dim));
      c->set_output(2, c->Vector(c->UnknownDim()));
      c->set_output(3, c->Scalar());
      c->set_output(4, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Rows changed after `since_version` (full values) and keys deleted after it.
`version` is what the delta is complete up to; `complete` is false when the
bounded deletion log no longer reaches back to `since_version`.
)doc");

REGISTER_OP("Monolith>HashTableApplyDelta")
    .Input("table: resource")
    .Input("keys: int64")
    .Input("values: float")
    .Input("deleted_keys: int64")
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("Replica side of a delta: deletes `deleted_keys`, then writes `values` into the rows of `keys`.");

}  // namespace monolith_ops
}  // namespace tensorflow
