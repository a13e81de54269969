// A minimal assertion harness for the TF-free core tests: the core must build
// and be tested with nothing but a C++17 compiler.
#ifndef MONOLITH_OPS_CORE_TESTS_CHECK_H_
#define MONOLITH_OPS_CORE_TESTS_CHECK_H_

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace monolith_test {

inline std::vector<std::pair<std::string, std::function<void()>>>& Registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}
inline int& Failures() {
  static int failures = 0;
  return failures;
}
struct Register {
  Register(const char* name, std::function<void()> fn) { Registry().emplace_back(name, std::move(fn)); }
};

}  // namespace monolith_test

#define TEST(name)                                                              \
  static void name();                                                           \
  static monolith_test::Register register_##name(#name, name);                  \
  static void name()

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++monolith_test::Failures();                                              \
      return;                                                                   \
    }                                                                           \
  } while (0)

#define CHECK_EQ(a, b) CHECK((a) == (b))

#define CHECK_THROWS(stmt)                                                      \
  do {                                                                          \
    bool threw = false;                                                         \
    try {                                                                       \
      stmt;                                                                     \
    } catch (const std::exception&) {                                           \
      threw = true;                                                             \
    }                                                                           \
    CHECK(threw);                                                               \
  } while (0)

#define TEST_MAIN()                                                             \
  int main() {                                                                  \
    int passed = 0, failed = 0;                                                 \
    for (auto& t : monolith_test::Registry()) {                                 \
      const int before = monolith_test::Failures();                             \
      t.second();                                                               \
      if (monolith_test::Failures() == before) {                                \
        ++passed;                                                               \
      } else {                                                                  \
        ++failed;                                                               \
        std::fprintf(stderr, "FAILED %s\n", t.first.c_str());                   \
      }                                                                         \
    }                                                                           \
    std::printf("core: %d passed, %d failed\n", passed, failed);                \
    return failed == 0 ? 0 : 1;                                                 \
  }

#endif  // MONOLITH_OPS_CORE_TESTS_CHECK_H_
