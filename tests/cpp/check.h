// The harness of the C++ tests: count checks, print each failure, and close with the
// "N passed, N failed" line that ctest's log and CI read; report() is main's exit code.
#pragma once

#include <cstdio>
#include <string>

namespace fusedloss_test {

inline int g_passed = 0;
inline int g_failed = 0;

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

inline int report() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace fusedloss_test
