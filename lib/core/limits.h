// Bounds of every count a user gives, on the command line or in a recipe (threads, windows, tokens,
// lengths, iterations): one table and one check, so that the same value gets the same one-line error
// wherever it comes from. The bounds are far above any real use and far below what breaks (OpenMP with
// 20000 threads hangs, 100000 crashes; a window of 2^30 tokens cannot be allocated).
//
//   threads                      1..1024, or 0 = all cores
//   seq_len (windows, --seq-len) 2..16777216 (2^24)
//   windows (--max-windows, eval.max_windows)  1..2^32, or -1 = every window
//   first window                 0..2^32
//   tokens (calibration.tokens, --max-tokens)  1..2^40
//   prefill chunk, stride, sample_per_window, anchor.window, decode_from  0..2^24
//   kmeans.iters 1..10^6, kmeans.max_points 0..2^40
//   bench: batch 1..65536, context 1..2^24, iterations 1..10^6
#pragma once
#include <cstdint>
#include <limits>
#include <string>

namespace antkv {

struct CountLimit {
  int64_t min = 0, max = 0;
  // one value outside [min, max] that is also accepted, with its meaning (e.g. 0 = all cores)
  int64_t special = std::numeric_limits<int64_t>::min();
  const char* special_means = nullptr;
};

namespace limits {
inline constexpr CountLimit kThreads{1, 1024, 0, "all cores"};
inline constexpr CountLimit kSeqLen{2, int64_t{1} << 24};
inline constexpr CountLimit kWindows{1, int64_t{1} << 32, -1, "every window"};
inline constexpr CountLimit kFirstWindow{0, int64_t{1} << 32};
inline constexpr CountLimit kTokens{1, int64_t{1} << 40};
inline constexpr CountLimit kTokenCount{0, int64_t{1} << 24};  // prefill chunk, stride, per-window samples, windows
inline constexpr CountLimit kIterations{1, 1000000};
inline constexpr CountLimit kPoints{0, int64_t{1} << 40};
inline constexpr CountLimit kBatch{1, 65536};
inline constexpr CountLimit kContext{1, int64_t{1} << 24};
}  // namespace limits

// Throws antkv::Error "<where> = <value> is out of range: give <min>..<max> (or <special> for <meaning>)" when
// value is outside the limit. where names the option or key: "--threads", "r.yaml: key \"eval.seq_len\"".
void check_count(int64_t value, const CountLimit& limit, const std::string& where);

}  // namespace antkv
