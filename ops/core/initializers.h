// Deterministic row initialisers.
//
// A row's initial value is a pure function of (seed, key, element): a trainer,
// its restarted self and every serving replica create bit-identical rows for
// the same id without exchanging them. This is a counter-based generator, not
// a stream: there is no RNG state to checkpoint or to race on.
#ifndef MONOLITH_OPS_CORE_INITIALIZERS_H_
#define MONOLITH_OPS_CORE_INITIALIZERS_H_

#include <cstdint>
#include <string>

namespace monolith {

enum class InitializerKind { kZeros, kRandomUniform, kRandomNormal, kTruncatedNormal };

struct InitializerConfig {
  InitializerKind kind = InitializerKind::kRandomUniform;
  // Uniform: [a, b). Normal and truncated normal: mean a, stddev b (truncated
  // normal redraws values more than two stddevs from the mean, as Keras does).
  float a = -0.05f;
  float b = 0.05f;
  uint64_t seed = 0;
};

// Parses "zeros", "random_uniform", "random_normal", "truncated_normal".
InitializerKind ParseInitializerKind(const std::string& name);

// Throws std::invalid_argument on an empty range or a negative stddev.
void ValidateInitializer(const InitializerConfig& config);

void InitializeRow(const InitializerConfig& config, int64_t key, int dim, float* out);

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_INITIALIZERS_H_
