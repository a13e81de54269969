// TableResource: the bridge that lets TensorFlow own a monolith::EmbeddingTable.
//
// Nothing here knows table logic; it only adapts lifetimes (ResourceBase
// ref-counting), errors (exceptions -> absl::Status) and threads (the op's
// thread pool -> the core's ParallelFor).
#ifndef MONOLITH_OPS_KERNELS_TABLE_RESOURCE_H_
#define MONOLITH_OPS_KERNELS_TABLE_RESOURCE_H_

#include <memory>
#include <stdexcept>
#include <string>

#include "ops/core/embedding_table.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_base.h"

namespace tensorflow {
namespace monolith_ops {

class TableResource : public ResourceBase {
 public:
  explicit TableResource(std::unique_ptr<monolith::EmbeddingTable> table) : table_(std::move(table)) {}

  // The core table is internally synchronised (see embedding_table.h), so
  // kernels use it without a lock of their own.
  monolith::EmbeddingTable& table() { return *table_; }

  std::string DebugString() const override {
    return "Monolith HashTable '" + table_->config().name + "' (dim " + std::to_string(table_->dim()) + ", " +
           std::to_string(table_->Size()) + " rows)";
  }
  int64_t MemoryUsed() const override { return static_cast<int64_t>(table_->MemoryBytes()); }

 private:
  std::unique_ptr<monolith::EmbeddingTable> table_;
};

// Runs `fn`, turning the core's std::invalid_argument into InvalidArgument
// and anything else into Internal, so a bad input never takes the process down.
template <typename Fn>
absl::Status Guard(Fn&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const std::invalid_argument& e) {
    return errors::InvalidArgument(e.what());
  } catch (const std::bad_alloc&) {
    return errors::ResourceExhausted("Monolith HashTable: out of memory");
  } catch (const std::exception& e) {
    return errors::Internal("Monolith HashTable: ", e.what());
  }
}

}  // namespace monolith_ops
}  // namespace tensorflow

#endif  // MONOLITH_OPS_KERNELS_TABLE_RESOURCE_H_
