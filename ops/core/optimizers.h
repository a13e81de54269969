// Fused sparse optimizers: the per-row update rules that live inside the table.
//
// Each rule reproduces the Keras 3 optimizer of the same name applied to one
// row (see keras/src/optimizers/*.py update_step), in float32 and in the same
// operation order, so a row updated at every step matches a dense Keras
// variable. Slots are stored after the row's values as `SlotWidth` floats.
#ifndef MONOLITH_OPS_CORE_OPTIMIZERS_H_
#define MONOLITH_OPS_CORE_OPTIMIZERS_H_

#include <string>

namespace monolith {

enum class OptimizerKind { kSgd, kAdagrad, kFtrl, kAdam };

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kAdagrad;
  float learning_rate = 0.05f;
  // Adagrad and Ftrl.
  float initial_accumulator_value = 0.1f;
  // Adagrad and Adam.
  float epsilon = 1e-7f;
  // Ftrl.
  float learning_rate_power = -0.5f;
  float l1_regularization_strength = 0.0f;
  float l2_regularization_strength = 0.0f;
  float beta = 0.0f;
  // Adam.
  float beta_1 = 0.9f;
  float beta_2 = 0.999f;
};

// Parses "sgd", "adagrad", "ftrl" or "adam"; throws std::invalid_argument.
OptimizerKind ParseOptimizerKind(const std::string& name);
const char* OptimizerName(OptimizerKind kind);

// Throws std::invalid_argument naming the bad hyperparameter.
void ValidateOptimizer(const OptimizerConfig& config);

// Floats of optimizer state per row: SGD 0, Adagrad dim (accumulator), Ftrl
// 2*dim (accumulator, linear), Adam 2*dim+1 (m, v, and the row's step count).
int SlotWidth(const OptimizerConfig& config, int dim);

// Writes the slots of a freshly admitted row.
void InitSlots(const OptimizerConfig& config, int dim, float* slots);

// One optimizer step on one row with its (already summed) gradient.
void ApplyUpdate(const OptimizerConfig& config, int dim, const float* grad, float* values, float* slots);

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_OPTIMIZERS_H_
