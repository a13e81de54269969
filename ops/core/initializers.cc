#include "ops/core/initializers.h"

#include <cmath>
#include <stdexcept>

#include "ops/core/hashing.h"

namespace monolith {

InitializerKind ParseInitializerKind(const std::string& name) {
  if (name == "zeros") return InitializerKind::kZeros;
  if (name == "random_uniform") return InitializerKind::kRandomUniform;
  if (name == "random_normal") return InitializerKind::kRandomNormal;
  if (name == "truncated_normal") return InitializerKind::kTruncatedNormal;
  throw std::invalid_argument("unknown initializer '" + name +
                              "' (expected zeros, random_uniform, random_normal or truncated_normal)");
}

void ValidateInitializer(const InitializerConfig& c) {
  if (!std::isfinite(c.a) || !std::isfinite(c.b)) throw std::invalid_argument("initializer parameters must be finite");
  if (c.kind == InitializerKind::kRandomUniform && !(c.a < c.b))
    throw std::invalid_argument("random_uniform initializer needs minval < maxval");
  if ((c.kind == InitializerKind::kRandomNormal || c.kind == InitializerKind::kTruncatedNormal) && c.b < 0)
    throw std::invalid_argument("normal initializers need stddev >= 0");
}

namespace {

// The i-th 64-bit draw for (seed, key): two rounds of mixing decorrelate
// neighbouring keys and neighbouring counters.
inline uint64_t Draw(uint64_t stream, uint64_t i) { return Mix64(stream + (i + 1) * 0x9e3779b97f4a7c15ULL); }

// A float in [0, 1) with 24 random bits, exactly representable.
inline float Unit(uint64_t bits) { return static_cast<float>(bits >> 40) * (1.0f / 16777216.0f); }

// A standard normal from two uniforms (Box-Muller); u1 is kept away from 0.
inline float StandardNormal(uint64_t stream, uint64_t* counter) {
  const float u1 = (static_cast<float>(Draw(stream, (*counter)++) >> 40) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = Unit(Draw(stream, (*counter)++));
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.28318530717958647692f * u2);
}

}  // namespace

void InitializeRow(const InitializerConfig& c, int64_t key, int dim, float* out) {
  const uint64_t stream = Mix64(c.seed ^ Mix64(static_cast<uint64_t>(key)));
  uint64_t counter = 0;
  switch (c.kind) {
    case InitializerKind::kZeros:
      for (int j = 0; j < dim; ++j) out[j] = 0.0f;
      break;
    case InitializerKind::kRandomUniform:
      for (int j = 0; j < dim; ++j) out[j] = c.a + (c.b - c.a) * Unit(Draw(stream, counter++));
      break;
    case InitializerKind::kRandomNormal:
      for (int j = 0; j < dim; ++j) out[j] = c.a + c.b * StandardNormal(stream, &counter);
      break;
    case InitializerKind::kTruncatedNormal:
      for (int j = 0; j < dim; ++j) {
        float z;
        do {
          z = StandardNormal(stream, &counter);
        } while (std::fabs(z) > 2.0f);
        out[j] = c.a + c.b * z;
      }
      break;
  }
}

}  // namespace monolith
