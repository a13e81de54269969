// Hash functions shared by the table core.
//
// Every placement decision (shard, index slot, admission-sketch cell) and every
// row's initial value derives from these mixers, so they must stay stable across
// releases: changing them silently changes which shard a key lives in (breaking
// checkpoint sketch restores) and what a fresh row is initialised to.
#ifndef MONOLITH_OPS_CORE_HASHING_H_
#define MONOLITH_OPS_CORE_HASHING_H_

#include <cstdint>

namespace monolith {

// The splitmix64 finaliser: a bijection on 64-bit words with full avalanche,
// so consecutive ids (user 1, 2, 3, ...) spread over shards and slots.
inline uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline uint64_t HashKey(int64_t key) {
  return Mix64(static_cast<uint64_t>(key) + 0x9e3779b97f4a7c15ULL);
}

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_HASHING_H_
