// Host-side helpers shared by the GPU tests: bf16 conversion (round to nearest even, as the kernels store)
// and a fresh random seed per run (GPU tests draw new inputs every time).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

namespace antkv::test {

inline uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline float bf2f(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf(float f) { return bf2f(f2bf(f)); }

inline uint32_t fresh_seed() {
  static std::random_device rd;
  return rd();
}

}  // namespace antkv::test
