// Shared test helpers: where ../shared lives, and comparison utilities.
#pragma once
#include <catch2/catch.hpp>

#include <string>
#include <vector>

namespace antkv::test {

// ANTKV_SHARED_DIR, else the compile-time default (<source>/../shared).
std::string shared_dir();
// Path under the shared dir; FAILs the test with a clear message when it is missing.
// Tests that call this must be tagged [shared] (so --no-shared-data skips them).
std::string shared_path(const std::string& relative);
std::string model_dir(const std::string& name);  // shared_path("models/" + name)
std::string source_path(const std::string& relative);  // a file of this project (data/fixtures/...)
std::string temp_dir();                                 // a fresh directory for one test case

// A command run through the shell in `cwd` with no GPU visible (CUDA_VISIBLE_DEVICES=""): its std::system status
// and its captured stdout and stderr.
struct Command {
  int rc = 0;
  std::string out, err;
};
Command run_without_gpu(const std::string& cwd, const std::string& args);

// Max |a-b| / max|b| over the arrays (relative to the reference's scale).
double max_rel_error(const float* a, const float* b, size_t n);

// Whether a CUDA device can be used. Tests tagged [gpu] call SKIP_WITHOUT_GPU() first.
bool gpu_available();

// Skips are counted so that a run whose every test skipped exits with kSkipReturnCode (CTest: Skipped).
constexpr int kSkipReturnCode = 4;
void mark_skipped();
size_t skipped_count();

// The method with its decode window set (what the recipe's anchor.window gives parse_method)
template <typename MethodSpec>
MethodSpec with_window(MethodSpec m, int window) {
  m.decode_window = window;
  return m;
}

}  // namespace antkv::test

#define SKIP_WITHOUT_GPU()                                                        \
  do {                                                                            \
    if (!::antkv::test::gpu_available()) {                                        \
      WARN("SKIPPED: no CUDA GPU (or built without CUDA); run on the GPU machine"); \
      ::antkv::test::mark_skipped();                                              \
      return;                                                                     \
    }                                                                             \
  } while (0)
