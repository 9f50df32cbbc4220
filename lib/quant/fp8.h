// OCP FP8 E4M3 ("OFP8" spec, 2023): 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits, no infinities
// (S.1111.111 is NaN). Normals are (1 + m/8) 2^(e-7) for e in [1, 15] (largest 1.75 x 2^8 = 448), subnormals
// m/8 x 2^-6 = m x 2^-9 (smallest 2^-9). Used for the gain-shape norm of norm=fp8 (quant/method.h).
#pragma once
#include <algorithm>
#include <cmath>

namespace antkv {

// x rounded to the nearest E4M3 value, ties to an even mantissa, saturating at +-448 (values beyond 448, even those
// a non-saturating conversion would make NaN, become 448: a norm is never worth more than the largest code); NaN
// stays NaN. The spacing in the binade [2^e, 2^(e+1)) is 2^(e-3); below the smallest normal 2^-6 it is 2^-9.
inline float round_fp8_e4m3(float x) {
  if (std::isnan(x)) return x;
  const double a = std::fabs(static_cast<double>(x));
  if (a == 0) return x;
  int exp2 = 0;
  std::frexp(a, &exp2);                                 // a = f 2^exp2, f in [0.5, 1): the binade is 2^(exp2 - 1)
  const int quantum = std::max(exp2 - 1, -6) - 3;       // 3 mantissa bits; subnormals share the exponent -6
  const double r = std::ldexp(std::nearbyint(std::ldexp(a, -quantum)), quantum);  // nearbyint: ties to even
  const double out = std::min(r, 448.0);
  return static_cast<float>(x < 0 ? -out : out);
}

}  // namespace antkv
