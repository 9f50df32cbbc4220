#include "test_support.h"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "core/atomic_file.h"  // read_file

#ifdef ANTKV_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace fs = std::filesystem;

namespace antkv::test {

std::string shared_dir() {
  const char* env = std::getenv("ANTKV_SHARED_DIR");
  return env && *env ? std::string(env) : std::string(ANTKV_DEFAULT_SHARED_DIR);
}

std::string shared_path(const std::string& relative) {
  fs::path p = fs::path(shared_dir()) / relative;
  if (!fs::exists(p)) {
    FAIL("shared test data missing: " << p.string()
                                      << " (set ANTKV_SHARED_DIR to the shared/ folder, or run the tests "
                                         "with --no-shared-data / ANTKV_NO_SHARED_DATA=1 to skip them)");
  }
  return p.string();
}

std::string model_dir(const std::string& name) { return shared_path("models/" + name); }

std::string source_path(const std::string& relative) {
  return (fs::path(ANTKV_SOURCE_DIR) / relative).string();
}

Command run_without_gpu(const std::string& cwd, const std::string& args) {
  const std::string o = cwd + "/.stdout", e = cwd + "/.stderr";
  const std::string cmd = "cd '" + cwd + "' && CUDA_VISIBLE_DEVICES= " + args + " > '" + o + "' 2> '" + e + "'";
  Command c;
  c.rc = std::system(cmd.c_str());
  c.out = read_file(o);
  c.err = read_file(e);
  fs::remove(o);
  fs::remove(e);
  return c;
}

std::string temp_dir() {
  static std::atomic<int> counter{0};
  fs::path p = fs::temp_directory_path() /
               ("antkv-test-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

double max_rel_error(const float* a, const float* b, size_t n) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(b[i])));
  }
  return max_ref > 0 ? max_diff / max_ref : max_diff;
}

namespace {
std::atomic<size_t> g_skipped{0};
}
void mark_skipped() { ++g_skipped; }
size_t skipped_count() { return g_skipped.load(); }

bool gpu_available() {
#ifdef ANTKV_HAVE_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

}  // namespace antkv::test
