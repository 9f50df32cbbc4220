// Device code shared by the compressed cache's decode kernels, the lookup-table decode (quant_decode.cu) and the
// RoPE-commuting decode (commute_decode.cu): code records (layout: kernels/attention/quant_decode.h; one record of
// REC bytes per token holds its d/c b-bit codes) and the reductions' check of a step's counts.
#pragma once
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention/quant_decode.h"

namespace antkv::cuda {

// Token t's record from base [tokens, REC] into w, with streaming loads (read once per step) of the widest type
// REC allows.
template <int REC>
__device__ __forceinline__ void load_record(const uint8_t* __restrict__ base, int64_t t, uint32_t (&w)[(REC + 3) / 4]) {
  const uint8_t* ptr = base + t * REC;
  if constexpr (REC % 16 == 0) {
#pragma unroll
    for (int i = 0; i < REC / 16; ++i) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(ptr) + i);
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  } else if constexpr (REC % 8 == 0) {
#pragma unroll
    for (int i = 0; i < REC / 8; ++i) {
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(ptr) + i);
      w[2 * i] = v.x;
      w[2 * i + 1] = v.y;
    }
  } else if constexpr (REC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < REC / 4; ++i) w[i] = __ldcs(reinterpret_cast<const unsigned int*>(ptr) + i);
  } else if constexpr (REC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < (REC + 3) / 4; ++i) w[i] = 0;
#pragma unroll
    for (int i = 0; i < REC / 2; ++i)
      w[i >> 1] |= static_cast<uint32_t>(__ldcs(reinterpret_cast<const unsigned short*>(ptr) + i)) << (16 * (i & 1));
  } else {
#pragma unroll
    for (int i = 0; i < (REC + 3) / 4; ++i) w[i] = 0;
#pragma unroll
    for (int i = 0; i < REC; ++i)
      w[i >> 2] |= static_cast<uint32_t>(__ldcs(reinterpret_cast<const unsigned char*>(ptr) + i)) << (8 * (i & 3));
  }
}

// The i-th b-bit code of a record (i a compile-time constant after unrolling).
template <int NB, int NWD>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[NWD], int i) {
  const int bit = i * NB, wi = bit >> 5, sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + NB > 32 && wi + 1 < NWD) v |= w[wi + 1] << (32 - sh);
  return v & ((1u << NB) - 1u);
}

// A reduction block's prologue for (sequence b, head row bh = b * n_heads + h; thread c of D): a plan made for a
// shorter stream, a count past its capacity, or an empty context writes NaN to the head's output (and LSE) and
// returns true, so that a bad plan shows instead of reading past the counts.
template <int D>
__device__ __forceinline__ bool nan_for_bad_counts(const QuantDecodeParams& p, int b, int64_t bh, int c) {
  const int nq = p.n_quant[b], na = p.n_anchor[b], nw = p.n_window[b];
  const bool bad = nq < 0 || nq > p.quant_capacity || static_cast<int64_t>(p.n_splits) * p.split_len < nq || na < 0 ||
                   na > p.anchor_capacity || nw < 0 || nw > p.window_capacity ||
                   static_cast<int64_t>(nq) + na + nw < 1;
  if (bad) {
    p.out[bh * D + c] = __float2bfloat16_rn(NAN);
    if (p.lse && c == 0) p.lse[bh] = NAN;
  }
  return bad;
}

}  // namespace antkv::cuda
