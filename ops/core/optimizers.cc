#include "ops/core/optimizers.h"

#include <cmath>
#include <stdexcept>

namespace monolith {

OptimizerKind ParseOptimizerKind(const std::string& name) {
  if (name == "sgd") return OptimizerKind::kSgd;
  if (name == "adagrad") return OptimizerKind::kAdagrad;
  if (name == "ftrl") return OptimizerKind::kFtrl;
  if (name == "adam") return OptimizerKind::kAdam;
  throw std::invalid_argument("unknown optimizer '" + name + "' (expected sgd, adagrad, ftrl or adam)");
}

const char* OptimizerName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kSgd: return "sgd";
    case OptimizerKind::kAdagrad: return "adagrad";
    case OptimizerKind::kFtrl: return "ftrl";
    case OptimizerKind::kAdam: return "adam";
  }
  return "?";
}

static void Require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void ValidateOptimizer(const OptimizerConfig& c) {
  const std::string name = OptimizerName(c.kind);
  Require(std::isfinite(c.learning_rate) && c.learning_rate > 0,
          name + ": learning_rate must be a finite number > 0, got " + std::to_string(c.learning_rate));
  if (c.kind == OptimizerKind::kAdagrad || c.kind == OptimizerKind::kFtrl) {
    Require(c.initial_accumulator_value >= 0, name + ": initial_accumulator_value must be >= 0");
  }
  if (c.kind == OptimizerKind::kAdagrad || c.kind == OptimizerKind::kAdam) {
    Require(c.epsilon >= 0, name + ": epsilon must be >= 0");
  }
  if (c.kind == OptimizerKind::kFtrl) {
    Require(c.learning_rate_power <= 0, "ftrl: learning_rate_power must be <= 0");
    Require(c.l1_regularization_strength >= 0, "ftrl: l1_regularization_strength must be >= 0");
    Require(c.l2_regularization_strength >= 0, "ftrl: l2_regularization_strength must be >= 0");
    Require(c.beta >= 0, "ftrl: beta must be >= 0");
    // Keras computes accum^(-lr_power) for the old accumulator; a zero
    // accumulator with a negative exponent would be infinite.
    Require(c.initial_accumulator_value > 0 || c.learning_rate_power == 0,
            "ftrl: initial_accumulator_value must be > 0");
  }
  if (c.kind == OptimizerKind::kAdam) {
    Require(c.beta_1 >= 0 && c.beta_1 < 1, "adam: beta_1 must be in [0, 1)");
    Require(c.beta_2 >= 0 && c.beta_2 < 1, "adam: beta_2 must be in [0, 1)");
  }
}

int SlotWidth(const OptimizerConfig& c, int dim) {
  switch (c.kind) {
    case OptimizerKind::kSgd: return 0;
    case OptimizerKind::kAdagrad: return dim;
    case OptimizerKind::kFtrl: return 2 * dim;
    case OptimizerKind::kAdam: return 2 * dim + 1;
  }
  return 0;
}

void InitSlots(const OptimizerConfig& c, int dim, float* slots) {
  switch (c.kind) {
    case OptimizerKind::kSgd:
      break;
    case OptimizerKind::kAdagrad:
      for (int j = 0; j < dim; ++j) slots[j] = c.initial_accumulator_value;
      break;
    case OptimizerKind::kFtrl:
      for (int j = 0; j < dim; ++j) slots[j] = c.initial_accumulator_value;
      for (int j = 0; j < dim; ++j) slots[dim + j] = 0.0f;
      break;
    case OptimizerKind::kAdam:
      for (int j = 0; j < 2 * dim + 1; ++j) slots[j] = 0.0f;
      break;
  }
}

// Keras: accumulator += g^2; w -= lr * g / sqrt(accumulator + epsilon).
static void Adagrad(const OptimizerConfig& c, int dim, const float* g, float* w, float* accum) {
  for (int j = 0; j < dim; ++j) {
    accum[j] += g[j] * g[j];
    w[j] -= (c.learning_rate * g[j]) / std::sqrt(accum[j] + c.epsilon);
  }
}

// Keras Ftrl (no l2 shrinkage): linear += g - (n'^-p - n^-p) / lr * w;
// w = (clip(linear, -l1, l1) - linear) / (n'^-p / lr + 2 * (l2 + beta / (2 lr))).
static void Ftrl(const OptimizerConfig& c, int dim, const float* g, float* w, float* accum, float* linear) {
  const float lr = c.learning_rate;
  const float power = -c.learning_rate_power;
  const float l1 = c.l1_regularization_strength;
  const float l2 = c.l2_regularization_strength + c.beta / (2.0f * lr);
  for (int j = 0; j < dim; ++j) {
    const float new_accum = accum[j] + g[j] * g[j];
    const float new_pow = std::pow(new_accum, power);
    const float old_pow = std::pow(accum[j], power);
    linear[j] += g[j] - ((new_pow - old_pow) / lr) * w[j];
    const float quadratic = new_pow / lr + 2.0f * l2;
    const float clipped = std::min(std::max(linear[j], -l1), l1);
    w[j] = (clipped - linear[j]) / quadratic;
    accum[j] = new_accum;
  }
}

// Keras Adam with a per-row step: the row's own update count plays the role of
// `iterations + 1`. The count is a float; past 2^24 updates it stops growing,
// which is harmless because beta^t has long underflowed to 0 by then.
static void Adam(const OptimizerConfig& c, int dim, const float* g, float* w, float* m, float* v, float* step) {
  const float t = *step + 1.0f;
  *step = t;
  const float b1p = std::pow(c.beta_1, t);
  const float b2p = std::pow(c.beta_2, t);
  const float alpha = c.learning_rate * std::sqrt(1.0f - b2p) / (1.0f - b1p);
  for (int j = 0; j < dim; ++j) {
    m[j] += (g[j] - m[j]) * (1.0f - c.beta_1);
    v[j] += (g[j] * g[j] - v[j]) * (1.0f - c.beta_2);
    w[j] -= (m[j] * alpha) / (std::sqrt(v[j]) + c.epsilon);
  }
}

void ApplyUpdate(const OptimizerConfig& c, int dim, const float* grad, float* values, float* slots) {
  switch (c.kind) {
    case OptimizerKind::kSgd:
      for (int j = 0; j < dim; ++j) values[j] -= c.learning_rate * grad[j];
      break;
    case OptimizerKind::kAdagrad:
      Adagrad(c, dim, grad, values, slots);
      break;
    case OptimizerKind::kFtrl:
      Ftrl(c, dim, grad, values, slots, slots + dim);
      break;
    case OptimizerKind::kAdam:
      Adam(c, dim, grad, values, slots, slots + dim, slots + 2 * dim);
      break;
  }
}

}  // namespace monolith
