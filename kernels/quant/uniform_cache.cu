#include "kernels/quant/uniform_cache.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/error.h"
#include "kernels/attention/split_combine.cuh"
#include "kernels/attention/quant_decode.h"
#include "kernels/common/random_fill.h"
#include "kernels/common/cuda_check.h"
#include "quant/method_support.h"
#include "kernels/common/device_utils.cuh"

namespace antkv {
namespace cuda {

namespace {

constexpr int kTile = 128;         // tokens per tile = threads per split block
constexpr int kMaxSplits = 1024;   // splits per (sequence, KV head); the last one also takes the residual
constexpr float kLog2e = 1.4426950408889634f;

using dev::combine_splits;
using dev::split_combine_smem_floats;
using dev::warp_max;
using dev::warp_min;
using dev::warp_sum;

// A code (< 2^23) as a float without I2F (a quarter-rate instruction on Hopper): 2^23 + code has the code in
// its mantissa, and subtracting 2^23 is exact.
__device__ __forceinline__ float code_to_float(uint32_t code) { return __uint_as_float(0x4B000000u | code) - 8388608.f; }

struct Counts {
  int qlen, k_end, v_end;
};
__host__ __device__ inline Counts uniform_counts(int len, int group, int window) {
  const int qlen = len > window ? len - window : 0;
  return {qlen, qlen / group * group, qlen};
}

// One block of 128 threads per (split, KV head x HT query heads, sequence). Split s takes the quantized key
// blocks' tokens [s * split_len, min(k_end, (s + 1) * split_len)); the last split then also takes the residual
// [k_end, len) (FP16 keys; values quantized below v_end, FP16 above), so the grid is whole waves of code work.
// Per tile of 128 tokens:
//  A (quantized tiles) per key block of the tile: sQS = q_c * s_c (log2 units) and q . z in per-warp partials;
//  B thread t scores token t for the HT heads (its WPT code words, one row per thread, from shared memory);
//  C warp h updates head h's running max / sum and writes (p * s_v, p * z_v) per token and value group;
//  D warp w accumulates tokens w, w+4, ...: lane l owns channels l*CPL .. l*CPL+CPL-1 (one 32-bit code word
//    read per token, 8 tokens' words loaded before use), o += (p s) code, oz += p z (the zero term, added to
//    every channel of the group at the end).
// A quantized tile's key codes and key/value scales arrive by cp.async, issued for tile k+1 once C of tile k
// is done (their last reader), so the loads fly during D and A (ncu: L1TEX scoreboard stalls were 53% of the
// cycles when B loaded its rows itself).
// The split's record (O unnormalized, m, l in log2 units) goes to the workspace for uniform_combine_kernel.
template <int D, int BITS, int HT>
__global__ void __launch_bounds__(kTile, 4) uniform_split_kernel(const UniformDecodeParams p) {
  constexpr int WPT = D * BITS / 32, CPW = 32 / BITS, CPL = D / 32, NW = kTile / 32;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  constexpr int MAXTB = kTile / 32, MAXNVG = D / 32;  // group >= 32
  __shared__ float sQ[HT][D];
  __shared__ float sQS[MAXTB][HT][D];
  __shared__ float sQZ[MAXTB][HT][D / 32];
  __shared__ float sS[HT][kTile];
  __shared__ float2 sPSZ[HT][MAXNVG][kTile];
  __shared__ float sM[HT], sL[HT], sAlpha[HT];
  __shared__ __align__(16) uint32_t sK[kTile * WPT];       // the tile's key code rows
  __shared__ __align__(16) __half2 sKSZ[MAXTB * D];        // its key blocks' (scale, zero) per channel
  __shared__ __align__(16) __half2 sVSZ[kTile * MAXNVG];   // its tokens' value (scale, zero) per group, [t][g]
  // the split's record is merged in sQS's storage after the last tile (same size: MAXTB = NW)
  static_assert(MAXTB == NW, "sO aliases sQS");
  float (*sO)[HT][D] = sQS;

  const int split = blockIdx.x, b = blockIdx.z;
  const int G = p.n_heads / p.n_kv_heads, tiles = G / HT;
  const int kvh = blockIdx.y / tiles, h0 = kvh * G + (blockIdx.y % tiles) * HT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int len = p.lens[b];
  if (len < 1 || len > p.capacity) return;  // uniform_combine_kernel writes NaN for this sequence
  const int grp = p.group, vgs = min(grp, D), nvg = D / vgs, R = grp + p.window;
  const int KB = (p.capacity + grp - 1) / grp;
  const Counts cn = uniform_counts(len, grp, p.window);
  const int64_t bk = static_cast<int64_t>(b) * p.n_kv_heads + kvh;
  const uint32_t* kc = p.k_codes + bk * KB * grp * WPT;
  const __half2* ksz = p.k_sz + bk * KB * D;
  const uint32_t* vc = p.v_codes + bk * p.capacity * WPT;
  const __half2* vsz = p.v_sz + bk * p.capacity * nvg;
  const __half* rk = p.ring_k + bk * R * D;
  const __half* rv = p.ring_v + bk * R * D;

  // the quantized tile at tb (n tokens, a multiple of the group): codes and scales into shared memory
  auto prefetch = [&](int tb, int n) {
    const uint4* srck = reinterpret_cast<const uint4*>(kc + static_cast<int64_t>(tb) * WPT);
    for (int e = tid; e < n * WPT / 4; e += kTile) dev::cp_async_16(&sK[4 * e], srck + e, true);
    const uint4* srcs = reinterpret_cast<const uint4*>(ksz + static_cast<int64_t>(tb / grp) * D);
    for (int e = tid; e < n / grp * D / 4; e += kTile) dev::cp_async_16(&sKSZ[4 * e], srcs + e, true);
    for (int e = tid; e < n * nvg; e += kTile) dev::cp_async_4(&sVSZ[e], vsz + static_cast<int64_t>(tb) * nvg + e);
    dev::cp_async_commit();
  };

  for (int e = tid; e < HT * D; e += kTile)
    sQ[e / D][e % D] =
        __bfloat162float(p.q[(static_cast<int64_t>(b) * p.n_heads + h0 + e / D) * D + e % D]) * p.scale * kLog2e;
  if (tid < HT) sM[tid] = -INFINITY, sL[tid] = 0.f;
  float o[HT][CPL], oz[HT];
#pragma unroll
  for (int h = 0; h < HT; ++h) {
    oz[h] = 0.f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) o[h][j] = 0.f;
  }
  const int c0 = lane * CPL, lg = c0 / vgs, wi = c0 * BITS / 32, sh = c0 * BITS % 32;
  __syncthreads();

  for (int pass = 0; pass < 2; ++pass) {
    const bool resid = pass == 1;
    if (resid && split != p.n_splits - 1) break;
    const int t0 = resid ? cn.k_end : split * p.split_len;
    const int t1 = resid ? len : min(cn.k_end, t0 + p.split_len);
    if (!resid && t0 < t1) prefetch(t0, min(kTile, t1 - t0));
    for (int tb = t0; tb < t1; tb += kTile) {
      const int n = min(kTile, t1 - tb);
      if (!resid) {  // A: tb and n are multiples of the group (split_len a multiple of 128, k_end of the group)
        dev::cp_async_wait<0>();
        __syncthreads();  // the tile's codes and scales visible to the block
        const int nb = n / grp;
        for (int e = tid; e < nb * D; e += kTile) {  // D a multiple of 32: a warp's entries share one block
          const int bi = e / D, c = e % D;
          const float2 sz = __half22float2(sKSZ[e]);
#pragma unroll
          for (int h = 0; h < HT; ++h) {
            const float qv = sQ[h][c];
            sQS[bi][h][c] = qv * sz.x;
            const float qz = warp_sum(qv * sz.y);
            if (lane == 0) sQZ[bi][h][c / 32] = qz;
          }
        }
        __syncthreads();
      }
      // B: scores
      {
        const int t = tid, i = tb + t;
        float s[HT];
        if (t < n) {
          if (!resid) {
            const int bi = t / grp;
            uint32_t w[WPT];
#pragma unroll
            for (int k = 0; k < WPT / 4; ++k) {
              const uint4 u = *reinterpret_cast<const uint4*>(&sK[t * WPT + 4 * k]);
              w[4 * k] = u.x, w[4 * k + 1] = u.y, w[4 * k + 2] = u.z, w[4 * k + 3] = u.w;
            }
#pragma unroll
            for (int h = 0; h < HT; ++h) {
              float z = 0.f;
#pragma unroll
              for (int j = 0; j < D / 32; ++j) z += sQZ[bi][h][j];
              s[h] = z;
            }
#pragma unroll
            for (int ww = 0; ww < WPT; ++ww) {
              float cf[CPW];
#pragma unroll
              for (int k = 0; k < CPW; ++k) cf[k] = code_to_float((w[ww] >> (k * BITS)) & MASK);
              // q_c s_c four channels per shared-memory load (a broadcast: every lane reads the same address)
#pragma unroll
              for (int k4 = 0; k4 < CPW / 4; ++k4)
#pragma unroll
                for (int h = 0; h < HT; ++h) {
                  const float4 qs = *reinterpret_cast<const float4*>(&sQS[bi][h][ww * CPW + 4 * k4]);
                  s[h] = fmaf(qs.x, cf[4 * k4], s[h]);
                  s[h] = fmaf(qs.y, cf[4 * k4 + 1], s[h]);
                  s[h] = fmaf(qs.z, cf[4 * k4 + 2], s[h]);
                  s[h] = fmaf(qs.w, cf[4 * k4 + 3], s[h]);
                }
            }
          } else {
            const uint4* src = reinterpret_cast<const uint4*>(rk + static_cast<int64_t>(i % R) * D);
#pragma unroll
            for (int h = 0; h < HT; ++h) s[h] = 0.f;
#pragma unroll 4
            for (int k = 0; k < D / 8; ++k) {
              const uint4 u = src[k];
              const __half2* hv = reinterpret_cast<const __half2*>(&u);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float2 f = __half22float2(hv[j]);
#pragma unroll
                for (int h = 0; h < HT; ++h) s[h] = fmaf(sQ[h][8 * k + 2 * j + 1], f.y, fmaf(sQ[h][8 * k + 2 * j], f.x, s[h]));
              }
            }
            if (i < cn.v_end)
              for (int g = 0; g < nvg; ++g) sVSZ[t * nvg + g] = vsz[static_cast<int64_t>(i) * nvg + g];
          }
        } else {
#pragma unroll
          for (int h = 0; h < HT; ++h) s[h] = -INFINITY;
        }
#pragma unroll
        for (int h = 0; h < HT; ++h) sS[h][t] = s[h];
      }
      __syncthreads();
      // C: online softmax, warp h for head h
      if (warp < HT) {
        const int h = warp;
        float sv[kTile / 32], mx = -INFINITY;
#pragma unroll
        for (int k = 0; k < kTile / 32; ++k) sv[k] = sS[h][lane + 32 * k], mx = fmaxf(mx, sv[k]);
        mx = warp_max(mx);  // finite: the tile holds n >= 1 tokens
        const float m_old = sM[h], m_new = fmaxf(m_old, mx);
        const float alpha = exp2f(m_old - m_new);  // 0 while m_old = -inf
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < kTile / 32; ++k) {
          const int t = lane + 32 * k, i = tb + t;
          if (t < n) {
            const float pv = exp2f(sv[k] - m_new);
            sum += pv;
            if (resid && i >= cn.v_end) {
              sPSZ[h][0][t] = make_float2(pv, 0.f);
            } else {
              for (int g = 0; g < nvg; ++g) {
                const float2 sz = __half22float2(sVSZ[t * nvg + g]);
                sPSZ[h][g][t] = make_float2(pv * sz.x, pv * sz.y);
              }
            }
          }
        }
        sum = warp_sum(sum);
        __syncwarp();  // every lane has read sM[h] and sL[h] before lane 0 writes them
        if (lane == 0) {
          sM[h] = m_new;
          sL[h] = sL[h] * alpha + sum;
          sAlpha[h] = alpha;
        }
      }
      __syncthreads();
      // the next quantized tile's codes and scales (sK, sKSZ, sVSZ were last read above)
      if (!resid && tb + kTile < t1) prefetch(tb + kTile, min(kTile, t1 - tb - kTile));
      // D: values
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        const float a = sAlpha[h];
        oz[h] *= a;
#pragma unroll
        for (int j = 0; j < CPL; ++j) o[h][j] *= a;
      }
      if (!resid) {
        for (int k0 = 0; k0 < kTile / NW; k0 += 8) {
          uint32_t wv[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            const int t = warp + NW * (k0 + u);
            wv[u] = t < n ? __ldg(vc + static_cast<int64_t>(tb + t) * WPT + wi) >> sh : 0u;
          }
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            const int t = warp + NW * (k0 + u);
            if (t < n) {
              float cf[CPL];
#pragma unroll
              for (int j = 0; j < CPL; ++j) cf[j] = code_to_float((wv[u] >> (j * BITS)) & MASK);
#pragma unroll
              for (int h = 0; h < HT; ++h) {
                const float2 psz = sPSZ[h][lg][t];
                oz[h] += psz.y;
#pragma unroll
                for (int j = 0; j < CPL; ++j) o[h][j] = fmaf(psz.x, cf[j], o[h][j]);
              }
            }
          }
        }
      } else {
        for (int t = warp; t < n; t += NW) {
          const int i = tb + t;
          if (i < cn.v_end) {
            const uint32_t word = __ldg(vc + static_cast<int64_t>(i) * WPT + wi) >> sh;
#pragma unroll
            for (int h = 0; h < HT; ++h) {
              const float2 psz = sPSZ[h][lg][t];
              oz[h] += psz.y;
#pragma unroll
              for (int j = 0; j < CPL; ++j) o[h][j] = fmaf(psz.x, code_to_float((word >> (j * BITS)) & MASK), o[h][j]);
            }
          } else {
            const __half* vr = rv + static_cast<int64_t>(i % R) * D + c0;
            float v[CPL];
#pragma unroll
            for (int j = 0; j < CPL; j += 2) {
              const float2 f = __half22float2(*reinterpret_cast<const __half2*>(vr + j));
              v[j] = f.x, v[j + 1] = f.y;
            }
#pragma unroll
            for (int h = 0; h < HT; ++h) {
              const float pv = sPSZ[h][0][t].x;
#pragma unroll
              for (int j = 0; j < CPL; ++j) o[h][j] = fmaf(pv, v[j], o[h][j]);
            }
          }
        }
      }
    }
  }

  // the split's record: warps summed in shared memory
  __syncthreads();  // sQS's last reader (phase B) and every warp's phase D done
#pragma unroll
  for (int h = 0; h < HT; ++h)
#pragma unroll
    for (int j = 0; j < CPL; ++j) sO[warp][h][c0 + j] = o[h][j] + oz[h];
  __syncthreads();
  const int NS = p.n_splits;
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * NS * D;
  for (int e = tid; e < HT * D; e += kTile) {
    const int h = e / D, c = e % D;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) acc += sO[w][h][c];
    const int64_t slot = (static_cast<int64_t>(b) * p.n_heads + h0 + h) * NS + split;
    wo[slot * D + c] = acc;
    if (c == 0) {
      wml[slot * 2] = sM[h];
      wml[slot * 2 + 1] = sL[h];
    }
  }
}

// One block of D threads per (head, sequence): the splits merged by the fp16 decode's combine step.
template <int D>
__global__ void __launch_bounds__(D) uniform_combine_kernel(const UniformDecodeParams p) {
  __shared__ float smem[split_combine_smem_floats(1, kMaxSplits)];
  const int h = blockIdx.x, b = blockIdx.y, c = threadIdx.x;
  const int len = p.lens[b];
  const int64_t bh = static_cast<int64_t>(b) * p.n_heads + h;
  const Counts cn = uniform_counts(len, p.group, p.window);
  if (len < 1 || len > p.capacity || static_cast<int64_t>(p.n_splits) * p.split_len < cn.k_end) {
    p.out[bh * D + c] = __float2bfloat16_rn(NAN);  // an empty sequence, or a plan made for a shorter one
    if (p.lse && c == 0) p.lse[bh] = NAN;
    return;
  }
  combine_splits<D, D>(p.workspace, static_cast<int64_t>(p.batch) * p.n_heads, p.n_splits, bh, 1, p.n_splits, smem,
                       p.out, p.lse);
}

struct UniformAppendParams {
  int bits = 2, group = 128, window = 0;
  int batch = 0, n_kv_heads = 0, capacity = 0;
  const float* k = nullptr;  // [batch, n_kv_heads, head_dim] rows of `stride` elements per token
  const float* v = nullptr;
  int64_t stride = 0;
  const int32_t* lens = nullptr;  // [batch] lengths after this step's token
  uint32_t* k_codes = nullptr;
  __half2* k_sz = nullptr;
  uint32_t* v_codes = nullptr;
  __half2* v_sz = nullptr;
  __half* ring_k = nullptr;
  __half* ring_v = nullptr;
};

// Scale and zero as uniform_quantize: zero = fp16(min), scale = fp16((max - zero) / levels), code =
// clamp(rint((x - zero) / scale), 0, levels) (IEEE division: no fast math in this build), so the codes equal the
// CPU reference's on the same fp16 rows. The append and the prefill quantize through these two functions.

// One token's value row: thread c (of D, the whole block, block-uniform call) holds channel c's fp16 value x;
// codes per group of vgs channels into codes[0..WPT), (scale, zero) into sz[0..D / vgs). sW [WPT] is zero on
// entry and on exit; sLo, sHi [D / 32].
template <int D, int BITS>
__device__ void quantize_value_row(float x, int vgs, uint32_t* sW, float* sLo, float* sHi, uint32_t* codes,
                                   __half2* sz) {
  constexpr int WPT = D * BITS / 32;
  constexpr float kLevels = static_cast<float>((1 << BITS) - 1);
  const int c = threadIdx.x, lane = c & 31, warp = c >> 5;
  const float wlo = warp_min(x), whi = warp_max(x);
  if (lane == 0) sLo[warp] = wlo, sHi[warp] = whi;
  __syncthreads();
  const int g = c / vgs;
  float lo = INFINITY, hi = -INFINITY;
  for (int w = g * vgs / 32; w < (g + 1) * vgs / 32; ++w) lo = fminf(lo, sLo[w]), hi = fmaxf(hi, sHi[w]);
  const __half zh = __float2half_rn(lo);
  const float zero = __half2float(zh);
  const __half sh = __float2half_rn((hi - zero) / kLevels);
  const float scale = __half2float(sh);
  const uint32_t code = scale > 0.f ? static_cast<uint32_t>(fminf(kLevels, fmaxf(0.f, rintf((x - zero) / scale)))) : 0u;
  atomicOr(&sW[c * BITS / 32], code << (c * BITS % 32));
  __syncthreads();
  if (c < WPT) codes[c] = sW[c];
  if (c % vgs == 0) sz[g] = __halves2half2(sh, zh);
  __syncthreads();  // sW cleared for the next use
  if (c < WPT) sW[c] = 0u;
  __syncthreads();
}

// One key block: thread c (of D) quantizes channel c over the block's grp tokens, read(r) giving token r's fp16
// key; codes into dst [grp, WPT], (scale, zero) into sz[c]. sW [grp * WPT] is zero on entry (left dirty).
template <int D, int BITS, class Read>
__device__ void quantize_key_block(const Read& read, int grp, uint32_t* sW, uint32_t* dst, __half2* sz) {
  constexpr int WPT = D * BITS / 32;
  constexpr float kLevels = static_cast<float>((1 << BITS) - 1);
  const int c = threadIdx.x;
  float lo = INFINITY, hi = -INFINITY;
  for (int r = 0; r < grp; ++r) {
    const float x = read(r);
    lo = fminf(lo, x), hi = fmaxf(hi, x);
  }
  const __half zh = __float2half_rn(lo);
  const float zero = __half2float(zh);
  const __half sh = __float2half_rn((hi - zero) / kLevels);
  const float scale = __half2float(sh);
  for (int r = 0; r < grp; ++r) {
    const float x = read(r);
    const uint32_t code = scale > 0.f ? static_cast<uint32_t>(fminf(kLevels, fmaxf(0.f, rintf((x - zero) / scale)))) : 0u;
    atomicOr(&sW[r * WPT + c * BITS / 32], code << (c * BITS % 32));
  }
  __syncthreads();
  for (int e = c; e < grp * WPT; e += D) dst[e] = sW[e];
  sz[c] = __halves2half2(sh, zh);
}

// One block of D threads (thread = channel) per (sequence, KV head). The new token into its ring row; then the
// value of token qlen - 1 quantized per group of vgs channels; when qlen is a multiple of the group, the keys
// of its last block quantized per channel over the block's tokens.
template <int D, int BITS>
__global__ void __launch_bounds__(D) uniform_append_kernel(const UniformAppendParams p) {
  constexpr int WPT = D * BITS / 32, NWARP = D / 32;
  __shared__ uint32_t sW[kTile * WPT];  // packed words of up to a 128-token key block
  __shared__ float sLo[NWARP], sHi[NWARP];
  const int b = blockIdx.x, kvh = blockIdx.y, c = threadIdx.x;
  const int len = p.lens[b];
  if (len < 1 || len > p.capacity) return;  // the host checks the capacity before the step
  const int grp = p.group, R = grp + p.window, vgs = min(grp, D), nvg = D / vgs;
  const int KB = (p.capacity + grp - 1) / grp;
  const int64_t bk = static_cast<int64_t>(b) * p.n_kv_heads + kvh;
  __half* rk = p.ring_k + bk * R * D;
  __half* rv = p.ring_v + bk * R * D;
  const int64_t src = static_cast<int64_t>(b) * p.stride + static_cast<int64_t>(kvh) * D + c;
  rk[static_cast<int64_t>((len - 1) % R) * D + c] = __float2half_rn(p.k[src]);
  rv[static_cast<int64_t>((len - 1) % R) * D + c] = __float2half_rn(p.v[src]);
  for (int e = c; e < kTile * WPT; e += D) sW[e] = 0u;
  __syncthreads();  // ring rows and zeroed words visible to the block
  const Counts cn = uniform_counts(len, grp, p.window);
  if (cn.qlen >= 1) {  // the value of token qlen - 1 (the same token for every thread: block-uniform)
    const int t = cn.qlen - 1;
    const float x = __half2float(rv[static_cast<int64_t>(t % R) * D + c]);
    quantize_value_row<D, BITS>(x, vgs, sW, sLo, sHi, p.v_codes + (bk * p.capacity + t) * WPT,
                                p.v_sz + (bk * p.capacity + t) * nvg);
  }
  if (cn.qlen >= grp && cn.qlen % grp == 0) {  // the keys of block kb, channel c over its grp tokens
    const int kb = cn.qlen / grp - 1;
    auto read = [&](int r) { return __half2float(rk[static_cast<int64_t>((kb * grp + r) % R) * D + c]); };
    quantize_key_block<D, BITS>(read, grp, sW, p.k_codes + (bk * KB + kb) * grp * WPT, p.k_sz + (bk * KB + kb) * D);
  }
}

struct UniformPrefillParams {
  int bits = 2, group = 128, window = 0;
  int n_kv_heads = 0, capacity = 0;
  int seq = 0, n_tokens = 0;               // the empty sequence's index and the prefill's length T
  const float* k = nullptr;                // [T, n_kv_heads, head_dim] post-RoPE, rows of k_stride elements
  const float* v = nullptr;                // the same layout, rows of v_stride elements
  int64_t k_stride = 0, v_stride = 0;
  uint32_t* k_codes = nullptr;
  __half2* k_sz = nullptr;
  uint32_t* v_codes = nullptr;
  __half2* v_sz = nullptr;
  __half* ring_k = nullptr;
  __half* ring_v = nullptr;
};

// A T-token prefill, per token: one block of D threads per (token t, KV head). Tokens from k_end on go into the
// FP16 ring (row t % R: T - k_end < R rows, all distinct), tokens below qlen get their value quantized, from the
// fp16 rounding of the input (what the ring would hold, and the CPU cache's exact copy).
template <int D, int BITS>
__global__ void __launch_bounds__(D) uniform_prefill_rows_kernel(const UniformPrefillParams p) {
  constexpr int WPT = D * BITS / 32, NWARP = D / 32;
  __shared__ uint32_t sW[WPT];
  __shared__ float sLo[NWARP], sHi[NWARP];
  const int t = blockIdx.x, kvh = blockIdx.y, c = threadIdx.x;
  const int grp = p.group, R = grp + p.window, vgs = min(grp, D), nvg = D / vgs;
  const Counts cn = uniform_counts(p.n_tokens, grp, p.window);
  const int64_t bk = static_cast<int64_t>(p.seq) * p.n_kv_heads + kvh;
  const __half kh = __float2half_rn(p.k[static_cast<int64_t>(t) * p.k_stride + static_cast<int64_t>(kvh) * D + c]);
  const __half vh = __float2half_rn(p.v[static_cast<int64_t>(t) * p.v_stride + static_cast<int64_t>(kvh) * D + c]);
  if (t >= cn.k_end) {
    p.ring_k[(bk * R + t % R) * D + c] = kh;
    p.ring_v[(bk * R + t % R) * D + c] = vh;
  }
  if (t < cn.qlen) {  // block-uniform
    if (c < WPT) sW[c] = 0u;
    __syncthreads();
    quantize_value_row<D, BITS>(__half2float(vh), vgs, sW, sLo, sHi, p.v_codes + (bk * p.capacity + t) * WPT,
                                p.v_sz + (bk * p.capacity + t) * nvg);
  }
}

// A T-token prefill's complete key blocks: one block of D threads (thread = channel) per (key block, KV head).
template <int D, int BITS>
__global__ void __launch_bounds__(D) uniform_prefill_keys_kernel(const UniformPrefillParams p) {
  constexpr int WPT = D * BITS / 32;
  __shared__ uint32_t sW[kTile * WPT];
  const int kb = blockIdx.x, kvh = blockIdx.y, c = threadIdx.x, grp = p.group;
  const int KB = (p.capacity + grp - 1) / grp;
  const int64_t bk = static_cast<int64_t>(p.seq) * p.n_kv_heads + kvh;
  for (int e = c; e < grp * WPT; e += D) sW[e] = 0u;
  __syncthreads();
  const float* k = p.k + static_cast<int64_t>(kb) * grp * p.k_stride + static_cast<int64_t>(kvh) * D + c;
  auto read = [&](int r) { return __half2float(__float2half_rn(k[static_cast<int64_t>(r) * p.k_stride])); };
  quantize_key_block<D, BITS>(read, grp, sW, p.k_codes + (bk * KB + kb) * grp * WPT, p.k_sz + (bk * KB + kb) * D);
}

template <int D, int BITS, int HT>
void launch_split(const UniformDecodeParams& p, cudaStream_t stream) {
  const int G = p.n_heads / p.n_kv_heads;
  const dim3 grid(p.n_splits, p.n_kv_heads * (G / HT), p.batch);
  uniform_split_kernel<D, BITS, HT><<<grid, kTile, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("uniform_split_kernel");
}

template <int D, int BITS>
void launch_split_ht(const UniformDecodeParams& p, int ht, cudaStream_t stream) {
  if (ht == 4) launch_split<D, BITS, 4>(p, stream);
  else if (ht == 2) launch_split<D, BITS, 2>(p, stream);
  else launch_split<D, BITS, 1>(p, stream);
}

int heads_per_block(int G) { return G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1; }

// Resident split blocks per multiprocessor aimed at (128 threads, at most 128 registers (launch bounds: no spills) and 19-41 KB of shared memory).
constexpr int kBlocksPerSm = 4;

}  // namespace

void check_uniform_shape(const std::string& what, int head_dim, int bits, int group, int window) {
  ANTKV_CHECK(bits == 2 || bits == 4, "{}: the GPU uniform cache takes bits 2 or 4, not {}", what, bits);
  ANTKV_CHECK(group == 32 || group == 64 || group == 128, "{}: the GPU uniform cache takes group 32, 64 or 128, not {}",
              what, group);
  ANTKV_CHECK(head_dim == 64 || head_dim == 128, "{}: the GPU uniform cache takes head_dim 64 or 128, not {}", what,
              head_dim);
  ANTKV_CHECK(window >= 0 && window <= (1 << 20), "{}: window {} out of range", what, window);
}

UniformDecodePlan plan_uniform_decode(int batch, int n_heads, int n_kv_heads, int64_t max_kend) {
  ANTKV_CHECK(batch > 0 && n_kv_heads > 0 && n_heads > 0 && n_heads % n_kv_heads == 0 && max_kend >= 0,
              "plan_uniform_decode: bad sizes");
  UniformDecodePlan plan;
  const int G = n_heads / n_kv_heads;
  plan.heads_per_block = heads_per_block(G);
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads * (G / plan.heads_per_block);
  const int64_t want = static_cast<int64_t>(kBlocksPerSm) * device_sm_count();
  int64_t n_splits = std::clamp<int64_t>(want / units, 1, kMaxSplits);
  int64_t split_len = (std::max<int64_t>(max_kend, 1) + n_splits - 1) / n_splits;
  split_len = std::max<int64_t>(kTile, (split_len + kTile - 1) / kTile * kTile);
  n_splits = std::max<int64_t>(1, (max_kend + split_len - 1) / split_len);
  ANTKV_CHECK(n_splits <= kMaxSplits && split_len <= INT32_MAX, "plan_uniform_decode: {} tokens need {} splits", max_kend,
              n_splits);
  plan.n_splits = static_cast<int>(n_splits);
  plan.split_len = static_cast<int>(split_len);
  return plan;
}

int uniform_decode_max_splits(int batch, int n_heads, int n_kv_heads) {
  // plan_uniform_decode's first estimate: rounding the split length up only lowers the count
  const int G = n_heads / n_kv_heads;
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads * (G / heads_per_block(G));
  return static_cast<int>(std::clamp<int64_t>(static_cast<int64_t>(kBlocksPerSm) * device_sm_count() / units, 1, kMaxSplits));
}

int64_t uniform_decode_workspace_floats(int batch, int n_heads, int head_dim, int n_splits) {
  return static_cast<int64_t>(batch) * n_heads * n_splits * (head_dim + 2);
}

void uniform_decode(const UniformDecodeParams& p, cudaStream_t stream) {
  const std::string what = fmt::format("uniform_decode (uniform:bits={},group={})", p.bits, p.group);
  check_uniform_shape(what, p.head_dim, p.bits, p.group, p.window);
  ANTKV_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "{}: n_heads {} must be a multiple of n_kv_heads {}", what, p.n_heads, p.n_kv_heads);
  ANTKV_CHECK(p.batch > 0 && p.batch <= 65535 && p.capacity > 0, "{}: batch {} / capacity {} out of range", what,
              p.batch, p.capacity);
  ANTKV_CHECK(p.q && p.out && p.workspace && p.lens && p.k_codes && p.k_sz && p.v_codes && p.v_sz && p.ring_k &&
                  p.ring_v,
              "{}: null pointer", what);
  ANTKV_CHECK(p.n_splits >= 1 && p.n_splits <= kMaxSplits && p.split_len > 0 && p.split_len % kTile == 0,
              "{}: bad split plan ({} splits of {} tokens)", what, p.n_splits, p.split_len);
  ANTKV_CHECK(p.workspace_floats >= uniform_decode_workspace_floats(p.batch, p.n_heads, p.head_dim, p.n_splits),
              "{}: workspace of {} floats is too small", what, p.workspace_floats);
  const int G = p.n_heads / p.n_kv_heads, ht = heads_per_block(G);
  ANTKV_CHECK(static_cast<int64_t>(p.n_kv_heads) * (G / ht) <= 65535, "{}: too many heads", what);
  if (p.head_dim == 128) {
    if (p.bits == 2) launch_split_ht<128, 2>(p, ht, stream);
    else launch_split_ht<128, 4>(p, ht, stream);
    uniform_combine_kernel<128><<<dim3(p.n_heads, p.batch), 128, 0, stream>>>(p);
  } else {
    if (p.bits == 2) launch_split_ht<64, 2>(p, ht, stream);
    else launch_split_ht<64, 4>(p, ht, stream);
    uniform_combine_kernel<64><<<dim3(p.n_heads, p.batch), 64, 0, stream>>>(p);
  }
  ANTKV_LAUNCH_CHECK("uniform_combine_kernel");
}

}  // namespace cuda

// ---- the cache ----------------------------------------------------------------------------------------------

GpuUniformKvCache::GpuUniformKvCache(const ModelConfig& cfg, int bits, int group, int window, int max_batch,
                                     int capacity)
    : n_layers_(cfg.num_layers), n_kv_(cfg.num_kv_heads), n_heads_(cfg.num_heads), d_(cfg.head_dim), bits_(bits),
      group_(group), window_(window), max_batch_(max_batch), capacity_(capacity) {
  name_ = fmt::format("uniform:bits={},group={}{}", bits, group, window ? fmt::format(",window={}", window) : "");
  const ModelShapeFacts shape = ModelShapeFacts::of(cfg);
  require_support(parse_method(name_, Recipe::defaults_with({})), MethodPath::kGpuReal, &shape);  // quant/method_support.h
  cuda::check_uniform_shape(name_, d_, bits, group, window);  // the kernels' own limits
  ANTKV_CHECK(max_batch >= 1 && capacity >= 1, "{}: max_batch {} and capacity {} must be >= 1", name_, max_batch,
              capacity);
  ANTKV_CHECK(n_heads_ % n_kv_ == 0, "{}: n_heads {} not a multiple of n_kv_heads {}", name_, n_heads_, n_kv_);
  kb_ = (capacity + group - 1) / group;
  wpt_ = d_ * bits / 32;
  nvg_ = d_ / std::min(group, d_);
  ring_ = group + window;
  const size_t bk = static_cast<size_t>(max_batch) * n_kv_;
  layers_.resize(n_layers_);
  for (auto& L : layers_) {
    L.k_codes.resize(bk * kb_ * group * wpt_);
    L.k_sz.resize(bk * kb_ * d_);
    L.v_codes.resize(bk * capacity * wpt_);
    L.v_sz.resize(bk * capacity * nvg_);
    L.ring_k.resize(bk * ring_ * d_);
    L.ring_v.resize(bk * ring_ * d_);
    device_bytes_ += L.k_codes.bytes() + L.k_sz.bytes() + L.v_codes.bytes() + L.v_sz.bytes() + L.ring_k.bytes() +
                     L.ring_v.bytes();
  }
  lens_.assign(max_batch, 0);
  lens_d_.resize(max_batch);
  lens_h_.ensure(max_batch);
  ANTKV_CUDA_CHECK(cudaMemset(lens_d_.get(), 0, lens_d_.bytes()));
  // workspace for the most splits any batch 1..max_batch can be planned
  int64_t ws = 0;
  for (int B = 1; B <= max_batch; ++B)
    ws = std::max(ws, cuda::uniform_decode_workspace_floats(B, n_heads_, d_,
                                                            cuda::uniform_decode_max_splits(B, n_heads_, n_kv_)));
  workspace_.resize(static_cast<size_t>(ws));
  device_bytes_ += workspace_.bytes();
}

double GpuUniformKvCache::sequence_bytes(const ModelConfig& cfg, int bits, int group, int window, int64_t capacity) {
  const double d = cfg.head_dim, kb = static_cast<double>((capacity + group - 1) / group);
  const double nvg = d / std::min<double>(group, d);
  const double per_head = kb * group * d * bits / 8 + kb * d * 4 +          // key codes, (scale, zero) per block and channel
                          static_cast<double>(capacity) * (d * bits / 8 + nvg * 4) +  // value codes, (scale, zero) per token and group
                          2.0 * (group + window) * d * 2;                    // FP16 residual ring, K and V
  return per_head * cfg.num_kv_heads * cfg.num_layers;
}

double GpuUniformKvCache::attention_bytes(const ModelConfig& cfg, int bits, int group, int window, int64_t len) {
  const double d = cfg.head_dim, nvg = d / std::min<double>(group, d);
  const int64_t qlen = std::max<int64_t>(0, len - window), k_end = qlen / group * group;
  const double per_head = static_cast<double>(k_end) * (d * bits / 8) + static_cast<double>(k_end / group) * d * 4 +
                          static_cast<double>(qlen) * (d * bits / 8 + nvg * 4) +
                          static_cast<double>(len - k_end) * d * 2 + static_cast<double>(len - qlen) * d * 2;
  return per_head * cfg.num_kv_heads;
}

size_t GpuUniformKvCache::code_bytes_per_token() const {
  // codes of K and V, the value's (scale, zero) per group and a key block's (scale, zero) shared by its tokens
  const double per_head = 2.0 * d_ * bits_ / 8 + nvg_ * 4 + 4.0 * d_ / group_;
  return static_cast<size_t>(std::ceil(per_head * n_kv_ * n_layers_));
}

void GpuUniformKvCache::reset() {
  std::fill(lens_.begin(), lens_.end(), 0);
  pending_seq_ = -1;
  pending_tokens_ = 0;
  pending_layers_.clear();
}

void GpuUniformKvCache::set_synthetic_lengths(const std::vector<int>& lens) {
  ANTKV_CHECK(static_cast<int>(lens.size()) <= max_batch_, "{}: {} sequences > max_batch {}", name_, lens.size(),
              max_batch_);
  for (size_t b = 0; b < lens.size(); ++b) {
    ANTKV_CHECK(lens[b] >= 0 && lens[b] <= capacity_, "{}: length {} outside [0, capacity {}]", name_, lens[b],
                capacity_);
    lens_[b] = lens[b];
  }
}

void GpuUniformKvCache::upload_counts(int B, cudaStream_t stream) {
  ANTKV_CHECK(B >= 1 && B <= max_batch_, "{}: batch {} outside [1, {}]", name_, B, max_batch_);
  std::copy(lens_.begin(), lens_.begin() + B, lens_h_.get());
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(lens_d_.get(), lens_h_.get(), B * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
}

void GpuUniformKvCache::plan_step(int B, cudaStream_t stream) {
  ANTKV_CHECK(B >= 1 && B <= max_batch_, "{}: batch {} outside [1, {}]", name_, B, max_batch_);
  for (int b = 0; b < B; ++b) {
    ANTKV_CHECK(lens_[b] + 1 <= capacity_, "{}: sequence {} holds {} tokens, capacity {}", name_, b, lens_[b], capacity_);
    lens_[b] += 1;
  }
  upload_counts(B, stream);
}

cuda::UniformDecodePlan GpuUniformKvCache::plan(int B, int n_heads) const {
  int64_t max_kend = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t qlen = std::max(0, lens_.at(b) - window_);
    max_kend = std::max(max_kend, qlen / group_ * group_);
  }
  return cuda::plan_uniform_decode(B, n_heads, n_kv_, max_kend);
}

template <class Params>
void GpuUniformKvCache::set_layer_fields(Params& p, int layer) const {
  const Layer& L = layers_[layer];
  p.bits = bits_;
  p.group = group_;
  p.window = window_;
  p.n_kv_heads = n_kv_;
  p.capacity = capacity_;
  p.lens = lens_d_.get();
  p.k_codes = L.k_codes.get();
  p.k_sz = L.k_sz.get();
  p.v_codes = L.v_codes.get();
  p.v_sz = L.v_sz.get();
  p.ring_k = L.ring_k.get();
  p.ring_v = L.ring_v.get();
}

void GpuUniformKvCache::append(int layer, int B, const float* k, const float* v, int64_t stride, cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && B >= 1 && B <= max_batch_, "{}: append of layer {} batch {} out of range",
              name_, layer, B);
  ANTKV_CHECK(k && v && stride >= static_cast<int64_t>(n_kv_) * d_, "{}: append: bad K/V rows", name_);
  cuda::UniformAppendParams p;
  set_layer_fields(p, layer);
  p.batch = B;
  p.k = k;
  p.v = v;
  p.stride = stride;
  const dim3 grid(B, n_kv_);
  if (d_ == 128) {
    if (bits_ == 2) cuda::uniform_append_kernel<128, 2><<<grid, 128, 0, stream>>>(p);
    else cuda::uniform_append_kernel<128, 4><<<grid, 128, 0, stream>>>(p);
  } else {
    if (bits_ == 2) cuda::uniform_append_kernel<64, 2><<<grid, 64, 0, stream>>>(p);
    else cuda::uniform_append_kernel<64, 4><<<grid, 64, 0, stream>>>(p);
  }
  ANTKV_LAUNCH_CHECK("uniform_append_kernel");
}

void GpuUniformKvCache::write_prefill(int layer, int seq, int T, const float* k, int64_t k_stride, const float* v,
                                      int64_t v_stride, cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_,
              "{}: write_prefill of layer {} sequence {} out of range", name_, layer, seq);
  ANTKV_CHECK(lens_[seq] == 0,
              "{}: a prefill into sequence {} that already holds {} tokens (chunked prefill over the uniform cache is "
              "not implemented: prefill in one chunk, then decode)",
              name_, seq, lens_[seq]);
  ANTKV_CHECK(T >= 1 && T <= capacity_, "{}: prefill of {} tokens, capacity {}", name_, T, capacity_);
  const int64_t row = static_cast<int64_t>(n_kv_) * d_;
  ANTKV_CHECK(k && v && k_stride >= row && v_stride >= row, "{}: write_prefill: bad K/V rows", name_);
  if (pending_seq_ != seq || pending_tokens_ != T) {
    pending_seq_ = seq;
    pending_tokens_ = T;
    pending_layers_.assign(n_layers_, false);
  }
  pending_layers_[layer] = true;
  const Layer& L = layers_[layer];
  cuda::UniformPrefillParams p;
  p.bits = bits_;
  p.group = group_;
  p.window = window_;
  p.n_kv_heads = n_kv_;
  p.capacity = capacity_;
  p.seq = seq;
  p.n_tokens = T;
  p.k = k;
  p.v = v;
  p.k_stride = k_stride;
  p.v_stride = v_stride;
  p.k_codes = L.k_codes.get();
  p.k_sz = L.k_sz.get();
  p.v_codes = L.v_codes.get();
  p.v_sz = L.v_sz.get();
  p.ring_k = L.ring_k.get();
  p.ring_v = L.ring_v.get();
  const int qlen = std::max(0, T - window_), n_kb = qlen / group_;
  const dim3 rows(T, n_kv_), blocks(n_kb, n_kv_);
  if (d_ == 128) {
    if (bits_ == 2) cuda::uniform_prefill_rows_kernel<128, 2><<<rows, 128, 0, stream>>>(p);
    else cuda::uniform_prefill_rows_kernel<128, 4><<<rows, 128, 0, stream>>>(p);
  } else {
    if (bits_ == 2) cuda::uniform_prefill_rows_kernel<64, 2><<<rows, 64, 0, stream>>>(p);
    else cuda::uniform_prefill_rows_kernel<64, 4><<<rows, 64, 0, stream>>>(p);
  }
  ANTKV_LAUNCH_CHECK("uniform_prefill_rows_kernel");
  if (n_kb == 0) return;
  if (d_ == 128) {
    if (bits_ == 2) cuda::uniform_prefill_keys_kernel<128, 2><<<blocks, 128, 0, stream>>>(p);
    else cuda::uniform_prefill_keys_kernel<128, 4><<<blocks, 128, 0, stream>>>(p);
  } else {
    if (bits_ == 2) cuda::uniform_prefill_keys_kernel<64, 2><<<blocks, 64, 0, stream>>>(p);
    else cuda::uniform_prefill_keys_kernel<64, 4><<<blocks, 64, 0, stream>>>(p);
  }
  ANTKV_LAUNCH_CHECK("uniform_prefill_keys_kernel");
}

void GpuUniformKvCache::commit_prefill(int seq, int T) {
  const bool all = !pending_layers_.empty() &&
                   std::all_of(pending_layers_.begin(), pending_layers_.end(), [](bool w) { return w; });
  ANTKV_CHECK(pending_seq_ == seq && pending_tokens_ == T && all,
              "{}: commit_prefill of sequence {} ({} tokens) without write_prefill of every layer", name_, seq, T);
  lens_[seq] = T;
  pending_seq_ = -1;
  pending_tokens_ = 0;
  pending_layers_.clear();
}

void GpuUniformKvCache::attend(int layer, int B, int n_heads, const cuda::bf16* q, cuda::bf16* out,
                               const cuda::UniformDecodePlan& plan, float scale, cudaStream_t stream, float* lse) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && B >= 1 && B <= max_batch_ && n_heads == n_heads_,
              "{}: attend of layer {} batch {} heads {} out of range", name_, layer, B, n_heads);
  cuda::UniformDecodeParams p;
  set_layer_fields(p, layer);
  p.batch = B;
  p.n_heads = n_heads_;
  p.head_dim = d_;
  p.q = q;
  p.out = out;
  p.lse = lse;
  p.workspace = workspace_.get();
  p.workspace_floats = static_cast<int64_t>(workspace_.size());
  p.n_splits = plan.n_splits;
  p.split_len = plan.split_len;
  p.scale = scale;
  cuda::uniform_decode(p, stream);
}

void GpuUniformKvCache::fill_random(uint64_t seed, cudaStream_t stream) {
  uint64_t s = seed * 7919ull + 11;
  for (auto& L : layers_) {
    cuda::fill_random_bytes(reinterpret_cast<uint8_t*>(L.k_codes.get()), static_cast<int64_t>(L.k_codes.bytes()), s++, stream);
    cuda::fill_random_bytes(reinterpret_cast<uint8_t*>(L.v_codes.get()), static_cast<int64_t>(L.v_codes.bytes()), s++, stream);
    cuda::fill_random_f16(reinterpret_cast<__half*>(L.k_sz.get()), static_cast<int64_t>(L.k_sz.size() * 2), s++, 1.0f, stream);
    cuda::fill_random_f16(reinterpret_cast<__half*>(L.v_sz.get()), static_cast<int64_t>(L.v_sz.size() * 2), s++, 1.0f, stream);
    cuda::fill_random_f16(L.ring_k.get(), static_cast<int64_t>(L.ring_k.size()), s++, 1.0f, stream);
    cuda::fill_random_f16(L.ring_v.get(), static_cast<int64_t>(L.ring_v.size()), s++, 1.0f, stream);
  }
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void GpuUniformKvCache::poison() {
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto& L : layers_) {
    ANTKV_CUDA_CHECK(cudaMemset(L.k_codes.get(), 0xFF, L.k_codes.bytes()));
    ANTKV_CUDA_CHECK(cudaMemset(L.v_codes.get(), 0xFF, L.v_codes.bytes()));
    ANTKV_CUDA_CHECK(cudaMemset(L.k_sz.get(), 0xFF, L.k_sz.bytes()));  // fp16 0xFFFF: NaN
    ANTKV_CUDA_CHECK(cudaMemset(L.v_sz.get(), 0xFF, L.v_sz.bytes()));
    ANTKV_CUDA_CHECK(cudaMemset(L.ring_k.get(), 0xFF, L.ring_k.bytes()));
    ANTKV_CUDA_CHECK(cudaMemset(L.ring_v.get(), 0xFF, L.ring_v.bytes()));
  }
  ANTKV_CUDA_CHECK(cudaMemset(workspace_.get(), 0xFF, workspace_.bytes()));
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
}

GpuUniformKvCache::HostView GpuUniformKvCache::download(int layer, int seq, int kv_head) const {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_ && kv_head >= 0 && kv_head < n_kv_,
              "{}: download: out of range", name_);
  const Layer& L = layers_[layer];
  HostView h;
  h.len = lens_[seq];
  const int64_t qlen = std::max(0, h.len - window_);
  h.v_end = static_cast<int>(qlen);
  h.k_end = static_cast<int>(qlen / group_ * group_);
  const int64_t bk = static_cast<int64_t>(seq) * n_kv_ + kv_head;
  auto get = [](const auto* src, size_t n) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    std::vector<T> v(n);
    if (n) ANTKV_CUDA_CHECK(cudaMemcpy(v.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  };
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
  auto unpack = [&](const std::vector<uint32_t>& w, int rows, std::vector<uint8_t>& out) {
    out.assign(static_cast<size_t>(rows) * d_, 0);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < d_; ++c)
        out[static_cast<size_t>(r) * d_ + c] =
            static_cast<uint8_t>((w[static_cast<size_t>(r) * wpt_ + c * bits_ / 32] >> (c * bits_ % 32)) & ((1u << bits_) - 1));
  };
  auto split_sz = [](const std::vector<__half2>& sz, std::vector<float>& s, std::vector<float>& z) {
    s.resize(sz.size());
    z.resize(sz.size());
    for (size_t i = 0; i < sz.size(); ++i) {
      const float2 f = __half22float2(sz[i]);
      s[i] = f.x;
      z[i] = f.y;
    }
  };
  unpack(get(L.k_codes.get() + bk * kb_ * group_ * wpt_, static_cast<size_t>(h.k_end) * wpt_), h.k_end, h.k_code);
  split_sz(get(L.k_sz.get() + bk * kb_ * d_, static_cast<size_t>(h.k_end / group_) * d_), h.k_scale, h.k_zero);
  unpack(get(L.v_codes.get() + bk * capacity_ * wpt_, static_cast<size_t>(h.v_end) * wpt_), h.v_end, h.v_code);
  split_sz(get(L.v_sz.get() + bk * capacity_ * nvg_, static_cast<size_t>(h.v_end) * nvg_), h.v_scale, h.v_zero);
  const auto rk = get(L.ring_k.get() + bk * ring_ * d_, static_cast<size_t>(ring_) * d_);
  const auto rv = get(L.ring_v.get() + bk * ring_ * d_, static_cast<size_t>(ring_) * d_);
  const int nres = h.len - h.k_end;
  h.res_k.resize(static_cast<size_t>(nres) * d_);
  h.res_v.resize(static_cast<size_t>(nres) * d_);
  for (int r = 0; r < nres; ++r)
    for (int c = 0; c < d_; ++c) {
      const size_t src = static_cast<size_t>((h.k_end + r) % ring_) * d_ + c;
      h.res_k[static_cast<size_t>(r) * d_ + c] = __half2float(rk[src]);
      h.res_v[static_cast<size_t>(r) * d_ + c] = __half2float(rv[src]);
    }
  return h;
}

}  // namespace antkv
