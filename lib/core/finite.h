// Finding NaN / Inf in results, so that a command stops naming where they came from instead of writing them.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace antkv {

// Index of the first NaN or infinite value of x[0..n), or -1 when all are finite.
inline int64_t first_non_finite(const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return static_cast<int64_t>(i);
  return -1;
}

}  // namespace antkv
