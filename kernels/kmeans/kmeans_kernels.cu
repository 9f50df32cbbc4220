// GPU weighted k-means: the kernels and cuda::KMeansGpu, which runs them on device inputs. Contract and design
// choices: kernels/kmeans/kmeans.h. The trainer for host inputs is kmeans_trainer.cpp; the benchmark is
// kernels/bench/kmeans_bench.cu.
//
// Kernels (every one covers all codebooks of a chunk, grid.y or grid.x = codebook):
//   stats_kernel        max |x|, max w, count of w > 0, first non-finite x / bad weight (integer atomics
//                       of order-independent quantities: deterministic)
//   compact_kernel      stable list of the points of weight > 0 (k-means++ samples among them)
//   gather_kernel       the k-means++ sample, laid out so that thread t of the k-means++ block owns the
//                       contiguous sample indices [t*S, (t+1)*S) and reads them coalesced
//   kmeanspp_kernel     one block per codebook: k sequential D^2-weighted picks
//   assign_kernel<D,P>  fused distance + argmin + objective + fixed-point accumulation of sum w x, sum w
//   finalize_kernel     objective (fixed-order sum of per-block partials), stopping rule, centroid update,
//                       ordered list of empty clusters
//   reseed_kernel       empty clusters <- points of largest w d^2 (block argmax, ties: lowest index)
#include "kernels/kmeans/kmeans.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <climits>
#include <limits>
#include <numeric>
#include <random>

#include "core/error.h"
#include "kernels/common/async_copy.h"
#include "kernels/common/block_reduce.cuh"
#include "kernels/common/cuda_check.h"
#include "kernels/common/cuda_timing.h"
#include "kernels/common/parallel_for.h"

namespace antkv::cuda {
namespace {

using ull = unsigned long long;

constexpr int kAssignThreads = 256;
constexpr int kPPThreads = 512;      // k-means++ block
constexpr int kReseedThreads = 1024;
constexpr int kFinThreads = 256;
constexpr int kSmemAccBytes = 48 * 1024;  // shared-memory accumulators when k * (dim + 1) * 8 fits

struct CodebookState {
  double prev_obj;   // objective of the previous assignment pass
  double obj;        // objective of the current centroids (the reported one once inactive)
  double sx;         // fixed-point scale of sum w x (a power of two)
  double sw;         // fixed-point scale of sum w
  long long reseeded;
  int iters;         // centroid updates done
  int active;        // 1 while training
  int n_empty;       // empty clusters after the last update (reseed_kernel fills them)
  int pad;
};

struct CodebookStats {
  unsigned int max_abs_x;  // float bits (non-negative floats order like their bits)
  unsigned int max_w;
  ull npos;                // points with weight > 0
  ull first_bad_x;         // lowest flat index (point * dim + t) of a non-finite x, or ~0
  ull first_bad_w;         // lowest point index of a non-finite or negative weight, or ~0
};

// ---- small device helpers ----------------------------------------------------------------------------
template <int D>
struct Vec;
template <>
struct Vec<2> {
  __device__ static void load(const float* p, float* v) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x, v[1] = a.y;
  }
};
template <>
struct Vec<4> {
  __device__ static void load(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  }
};
template <>
struct Vec<8> {
  __device__ static void load(const float* p, float* v) {
    Vec<4>::load(p, v);
    Vec<4>::load(p + 4, v + 4);
  }
};
template <>
struct Vec<16> {
  __device__ static void load(const float* p, float* v) {
    Vec<8>::load(p, v);
    Vec<8>::load(p + 8, v + 8);
  }
};

using dev::block_exclusive_scan;
using dev::block_max_ll;
using dev::block_min_ll;
using dev::block_sum_to_0;

// ---- stats ---------------------------------------------------------------------------------------------
__global__ void stats_kernel(const float* __restrict__ x, const float* __restrict__ w, int64_t n, int dim,
                             CodebookStats* __restrict__ stats) {
  const int b = blockIdx.y;
  const float* xb = x + static_cast<int64_t>(b) * n * dim;
  unsigned int mx = 0, mw = 0;
  ull npos = 0, badx = ~0ull, badw = ~0ull;
  const int64_t total = n * dim;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const float v = xb[i];
    if (!isfinite(v)) {
      badx = min(badx, static_cast<ull>(i));
    } else {
      mx = max(mx, __float_as_uint(fabsf(v)));
    }
  }
  if (w) {
    const float* wb = w + static_cast<int64_t>(b) * n;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
      const float v = wb[j];
      if (!isfinite(v) || v < 0.f) {
        badw = min(badw, static_cast<ull>(j));
      } else {
        mw = max(mw, __float_as_uint(v));
        npos += v > 0.f;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    mw = max(mw, __shfl_xor_sync(0xffffffffu, mw, o));
    npos += __shfl_xor_sync(0xffffffffu, npos, o);
    badx = min(badx, __shfl_xor_sync(0xffffffffu, badx, o));
    badw = min(badw, __shfl_xor_sync(0xffffffffu, badw, o));
  }
  if ((threadIdx.x & 31) == 0) {
    CodebookStats* s = stats + b;
    if (mx) atomicMax(&s->max_abs_x, mx);
    if (mw) atomicMax(&s->max_w, mw);
    if (npos) atomicAdd(&s->npos, npos);
    if (badx != ~0ull) atomicMin(&s->first_bad_x, badx);
    if (badw != ~0ull) atomicMin(&s->first_bad_w, badw);
  }
}

// ---- k-means++ -----------------------------------------------------------------------------------------
// posidx[b][p] = index of the p-th point of weight > 0 (stable). One block of 1024 threads per codebook.
__global__ void __launch_bounds__(1024) compact_kernel(const float* __restrict__ w, int64_t n,
                                                       int* __restrict__ posidx) {
  __shared__ int s_warp[32];
  const int b = blockIdx.x;
  const float* wb = w + static_cast<int64_t>(b) * n;
  int* out = posidx + static_cast<int64_t>(b) * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const bool f = j < n && wb[j] > 0.f;
    const unsigned bal = __ballot_sync(0xffffffffu, f);
    const int in_warp = __popc(bal & ((1u << lane) - 1u));
    __syncthreads();
    if (lane == 0) s_warp[warp] = __popc(bal);
    __syncthreads();
    int off = 0, tot = 0;
    for (int i = 0; i < 32; ++i) {
      const int c = s_warp[i];
      off += i < warp ? c : 0;
      tot += c;
    }
    if (f) out[carry + off + in_warp] = static_cast<int>(j);
    carry += tot;
  }
}

// Sample element i of codebook b (i < m_b): thread t = i / S, slot s = i % S of the k-means++ block.
// xs: [B][S][dim][T], ws: [B][S][T] (0 for padding), d2: [B][S][T] (+inf).
__global__ void gather_kernel(const float* __restrict__ x, const float* __restrict__ w, int64_t n, int dim,
                              const int* __restrict__ positions, int m_stride, const int* __restrict__ m_of,
                              const int* __restrict__ posidx, int S, float* __restrict__ xs,
                              float* __restrict__ ws, double* __restrict__ d2) {
  const int b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t cap = static_cast<int64_t>(S) * kPPThreads;
  if (i >= cap) return;
  const int t = static_cast<int>(i / S), s = static_cast<int>(i % S);
  const int64_t slot = (static_cast<int64_t>(b) * S + s) * kPPThreads + t;
  float* xo = xs + ((static_cast<int64_t>(b) * S + s) * dim) * kPPThreads + t;
  if (i < m_of[b]) {
    const int pos = positions[static_cast<int64_t>(b) * m_stride + i];
    const int64_t j = posidx ? posidx[static_cast<int64_t>(b) * n + pos] : pos;
    const float* xi = x + (static_cast<int64_t>(b) * n + j) * dim;
    for (int d = 0; d < dim; ++d) xo[static_cast<int64_t>(d) * kPPThreads] = xi[d];
    ws[slot] = w ? w[static_cast<int64_t>(b) * n + j] : 1.f;
  } else {
    for (int d = 0; d < dim; ++d) xo[static_cast<int64_t>(d) * kPPThreads] = 0.f;
    ws[slot] = 0.f;
  }
  d2[slot] = INFINITY;
}

// One block per codebook: antkv::kmeanspp_init's picks. prob_i = w_i (first pick, or when sum w d2 <= 0)
// else w_i * d2_i with d2_i = min over picked centroids of sum_t (double)(x_it - c_t)^2 (fp32 difference,
// exact fp64 square, fp64 sum in t order: the host's values bit for bit); r = u_q * total; the pick is
// the first i with r < prefix_i and prob_i > 0, else the last i with prob_i > 0.
template <int D>
__global__ void __launch_bounds__(kPPThreads, 2) kmeanspp_kernel(const float* __restrict__ xs,
                                                              const float* __restrict__ ws,
                                                              double* __restrict__ d2s,
                                                              const double* __restrict__ draws, int k, int S,
                                                              float* __restrict__ centroids) {
  __shared__ double red[72];
  __shared__ long long redl[32];
  __shared__ float s_c[D];
  const int b = blockIdx.x, t = threadIdx.x;
  const float* xb = xs + static_cast<int64_t>(b) * S * D * kPPThreads;
  const float* wb = ws + static_cast<int64_t>(b) * S * kPPThreads;
  double* d2 = d2s + static_cast<int64_t>(b) * S * kPPThreads;
  const double* u = draws + static_cast<int64_t>(b) * k;
  float* cent = centroids + static_cast<int64_t>(b) * k * D;

  // prefix of the weights (used for the first pick and whenever sum w d2 <= 0)
  double lw = 0;
  for (int s = 0; s < S; ++s) lw += static_cast<double>(wb[s * kPPThreads + t]);
  double excl_w, total_w;
  block_exclusive_scan(lw, red, excl_w, total_w);

  for (int q = 0; q < k; ++q) {
    double lp = 0;
    if (q > 0) {
      float cc[D];
#pragma unroll
      for (int c = 0; c < D; ++c) cc[c] = s_c[c];
      for (int s = 0; s < S; ++s) {
        const int64_t e = static_cast<int64_t>(s) * kPPThreads + t;
        double d = 0;
#pragma unroll
        for (int c = 0; c < D; ++c) {
          const double diff = static_cast<double>(__fsub_rn(xb[(static_cast<int64_t>(s) * D + c) * kPPThreads + t], cc[c]));
          d = __dadd_rn(d, __dmul_rn(diff, diff));
        }
        const double dv = fmin(d2[e], d);
        d2[e] = dv;
        lp += static_cast<double>(wb[e]) * dv;
      }
    }
    double excl_p = 0, total_p = 0;
    if (q > 0) block_exclusive_scan(lp, red, excl_p, total_p);
    const bool use_w = q == 0 || !(total_p > 0);
    const double total = use_w ? total_w : total_p;
    const double r = u[q] * total;
    double acc = use_w ? excl_w : excl_p;
    long long cand = LLONG_MAX, lastpos = -1;
    for (int s = 0; s < S; ++s) {
      const int64_t e = static_cast<int64_t>(s) * kPPThreads + t;
      const double wv = static_cast<double>(wb[e]);
      const double p = use_w ? wv : wv * d2[e];
      acc += p;
      const long long i = static_cast<long long>(t) * S + s;
      if (p > 0) {
        lastpos = i;
        if (cand == LLONG_MAX && r < acc) cand = i;
      }
    }
    cand = block_min_ll(cand, redl);
    lastpos = block_max_ll(lastpos, redl);
    const long long chosen = cand != LLONG_MAX ? cand : lastpos;
    __syncthreads();
    if (chosen >= 0 && t == static_cast<int>(chosen / S)) {
      const int s = static_cast<int>(chosen % S);
#pragma unroll
      for (int c = 0; c < D; ++c) {
        const float v = xb[(static_cast<int64_t>(s) * D + c) * kPPThreads + t];
        s_c[c] = v;
        cent[static_cast<int64_t>(q) * D + c] = v;
      }
    }
    __syncthreads();
  }
}

// ---- assignment ----------------------------------------------------------------------------------------
struct AssignArgs {
  const float* x;
  const float* w;
  int64_t n;
  int k;
  int kc;                   // centroids per shared-memory tile
  int tiles_per_block;
  int smem_acc;             // accumulate in shared memory, flush once per block
  int train;                // 1: accumulate sums and write werr; 0: objective only
  const float* cent;        // [B, k, D]
  const CodebookState* st;  // [B]
  ull* sums;                // [B, k, D + 1] fixed point
  double* obj_part;         // [B, gridDim.x]
  float* werr;              // [B, n]: w d^2 (-1 for w = 0)
};

template <int D>
struct AssignCfg;
template <>
struct AssignCfg<2> {
  static constexpr int P = 16, KC = 4096, TPB = 2;
};
template <>
struct AssignCfg<4> {
  static constexpr int P = 16, KC = 2048, TPB = 2;
};
template <>
struct AssignCfg<8> {
  static constexpr int P = 8, KC = 1024, TPB = 4;
};
template <>
struct AssignCfg<16> {
  static constexpr int P = 4, KC = 512, TPB = 8;
};

template <int D>
__device__ __forceinline__ void load_centroid_tile(const float* __restrict__ cent, int c0, int kcur, float* s_c,
                                                   float* s_cn) {
  for (int q = threadIdx.x; q < kcur; q += blockDim.x) {
    float v[D];
    Vec<D>::load(cent + static_cast<int64_t>(c0 + q) * D, v);
    float nn = 0.f;
#pragma unroll
    for (int t = 0; t < D; ++t) {
      nn = fmaf(v[t], v[t], nn);
      s_c[q * D + t] = -2.f * v[t];
    }
    s_cn[q] = nn;
  }
}

template <int D>
__global__ void __launch_bounds__(kAssignThreads, 2) assign_kernel(AssignArgs a) {
  constexpr int P = AssignCfg<D>::P;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double red[32];
  const int b = blockIdx.y;
  if (!a.st[b].active) return;
  const int k = a.k, kc = a.kc;
  const int kc_pad = (kc + 3) & ~3;
  float* s_c = reinterpret_cast<float*>(smem);  // [kc][D]: -2 c
  float* s_cn = s_c + kc_pad * D;               // [kc]: |c|^2
  ull* s_acc = reinterpret_cast<ull*>(s_cn + kc_pad);  // [k][D + 1]
  const int64_t n = a.n;
  const float* xb = a.x + static_cast<int64_t>(b) * n * D;
  const float* wb = a.w ? a.w + static_cast<int64_t>(b) * n : nullptr;
  const float* cb = a.cent + static_cast<int64_t>(b) * k * D;
  const double sx = a.st[b].sx, sw = a.st[b].sw;
  ull* gsum = a.sums + static_cast<int64_t>(b) * k * (D + 1);
  float* werr = a.werr + static_cast<int64_t>(b) * n;
  const bool use_sacc = a.train && a.smem_acc;
  if (use_sacc)
    for (int i = threadIdx.x; i < k * (D + 1); i += blockDim.x) s_acc[i] = 0ull;
  const bool single = k <= kc;
  if (single) load_centroid_tile<D>(cb, 0, k, s_c, s_cn);
  __syncthreads();

  double obj = 0;
  constexpr int64_t kTile = static_cast<int64_t>(kAssignThreads) * P;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * a.tiles_per_block * kTile;
  for (int tt = 0; tt < a.tiles_per_block; ++tt) {
    const int64_t t0 = base + tt * kTile;
    if (t0 >= n) break;
    float xr[P][D];
    float best[P];
    int arg[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = t0 + p * kAssignThreads + threadIdx.x;
      if (j < n) {
        Vec<D>::load(xb + j * D, xr[p]);
      } else {
#pragma unroll
        for (int t = 0; t < D; ++t) xr[p][t] = 0.f;
      }
      best[p] = INFINITY;
      arg[p] = 0;
    }
    for (int c0 = 0; c0 < k; c0 += kc) {
      const int kcur = min(kc, k - c0);
      if (!single) {
        __syncthreads();
        load_centroid_tile<D>(cb, c0, kcur, s_c, s_cn);
        __syncthreads();
      }
#pragma unroll 2
      for (int q = 0; q < kcur; ++q) {
        float cv[D];
        Vec<D>::load(s_c + q * D, cv);
        const float cn = s_cn[q];
#pragma unroll
        for (int p = 0; p < P; ++p) {
          float s = cn;
#pragma unroll
          for (int t = 0; t < D; ++t) s = fmaf(xr[p][t], cv[t], s);
          if (s < best[p]) {
            best[p] = s;
            arg[p] = c0 + q;
          }
        }
      }
    }
    // epilogue: exact |x - c|^2 of the chosen centroid, objective, accumulation
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t j = t0 + p * kAssignThreads + threadIdx.x;
      if (j < n) {
        float c[D];
        Vec<D>::load(cb + static_cast<int64_t>(arg[p]) * D, c);
        float d2 = 0.f;
#pragma unroll
        for (int t = 0; t < D; ++t) {
          const float df = xr[p][t] - c[t];
          d2 = fmaf(df, df, d2);
        }
        const float wv = wb ? wb[j] : 1.f;
        obj += static_cast<double>(wv) * static_cast<double>(d2);
        if (a.train) {
          werr[j] = wv > 0.f ? wv * d2 : -1.f;
          if (wv > 0.f) {
            ull* acc = (use_sacc ? s_acc : gsum) + static_cast<int64_t>(arg[p]) * (D + 1);
#pragma unroll
            for (int t = 0; t < D; ++t) {
              const long long qv = __double2ll_rn(static_cast<double>(wv) * static_cast<double>(xr[p][t]) * sx);
              if (qv) atomicAdd(acc + t, static_cast<ull>(qv));
            }
            const long long qw = max(1ll, __double2ll_rn(static_cast<double>(wv) * sw));
            atomicAdd(acc + D, static_cast<ull>(qw));
          }
        }
      }
    }
  }
  const double tot = block_sum_to_0(obj, red);
  if (threadIdx.x == 0) a.obj_part[static_cast<int64_t>(b) * gridDim.x + blockIdx.x] = tot;
  if (use_sacc) {
    __syncthreads();
    for (int i = threadIdx.x; i < k * (D + 1); i += blockDim.x) {
      const ull v = s_acc[i];
      if (v) atomicAdd(gsum + i, v);
    }
  }
}

// ---- assignment on tensor cores (large k) ---------------------------------------------------------------
// 3xTF32: x = x_hi + x_lo and -2c = b_hi + b_lo split into TF32 (cvt.rna), x.(-2c) ~ x_lo b_hi + x_hi b_lo +
// x_hi b_hi on mma.sync m16n8k8 (fp32 accumulate, initialized with |c|^2): about fp32's accuracy (the
// dropped x_lo b_lo term is ~2^-22 of |x||c|) at 3x the tensor work. Warp w of the block owns MT m-tiles of
// 16 points (A fragments in registers for the whole centroid stream); centroids pass through shared memory
// in tiles of NC (hi, lo, |c|^2; row stride D + 4 floats: the 8 B-fragment rows of a warp hit 32 distinct
// banks). Fragment layouts (PTX ISA, m16n8k8 .tf32): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);
// b0 (k=t, n=g), b1 (k=t+4, n=g); c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1); g = lane / 4,
// t = lane % 4. Each thread keeps the running (min, argmin) of its two rows and two columns, visited in
// increasing centroid index; the quad then reduces with ties to the lowest index. The epilogue (exact
// |x - c|^2, objective, fixed-point accumulation in global memory) is the SIMT kernel's.
template <int D>
struct MmaCfg {
  static_assert(D % 8 == 0, "k-steps of 8");
  static constexpr int KS = D / 8, SD = D + 4, NC = 256, MT = 4, TPB = 4;
};

__device__ __forceinline__ uint32_t to_tf32(float f) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D>
__global__ void __launch_bounds__(kAssignThreads, 2) assign_mma_kernel(AssignArgs a) {
  using C = MmaCfg<D>;
  constexpr int KS = C::KS, SD = C::SD, NC = C::NC, MT = C::MT;
  static_assert(MT == 4, "the epilogue gives m-tile t to quad lane t");
  __shared__ __align__(16) float s_hi[NC * SD];
  __shared__ __align__(16) float s_lo[NC * SD];
  __shared__ __align__(16) float s_cn[NC];
  __shared__ double red[32];
  const int b = blockIdx.y;
  if (!a.st[b].active) return;
  const int k = a.k;
  const int64_t n = a.n;
  const float* xb = a.x + static_cast<int64_t>(b) * n * D;
  const float* wb = a.w ? a.w + static_cast<int64_t>(b) * n : nullptr;
  const float* cb = a.cent + static_cast<int64_t>(b) * k * D;
  const double sx = a.st[b].sx, sw = a.st[b].sw;
  ull* gsum = a.sums + static_cast<int64_t>(b) * k * (D + 1);
  float* werr = a.werr + static_cast<int64_t>(b) * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  constexpr int64_t kTile = static_cast<int64_t>(kAssignThreads / 32) * MT * 16;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * a.tiles_per_block * kTile;
  double obj = 0;
  for (int tt = 0; tt < a.tiles_per_block; ++tt) {
    const int64_t t0 = base + tt * kTile;
    if (t0 >= n) break;
    uint32_t ahi[MT][KS][4], alo[MT][KS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int64_t pb = t0 + (warp * MT + mt) * 16;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t j = pb + g + (r & 1) * 8;
          const int col = ks * 8 + tq + (r >> 1) * 4;
          const float v = j < n ? xb[j * D + col] : 0.f;
          const uint32_t hi = to_tf32(v);
          ahi[mt][ks][r] = hi;
          alo[mt][ks][r] = to_tf32(v - __uint_as_float(hi));
        }
    }
    float best[MT][2];
    int arg[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) best[mt][0] = best[mt][1] = INFINITY, arg[mt][0] = arg[mt][1] = 0;
    for (int c0 = 0; c0 < k; c0 += NC) {
      const int kcur = min(NC, k - c0), ntiles = (kcur + 7) / 8;
      __syncthreads();
      for (int e = threadIdx.x; e < ntiles * 8 * D; e += blockDim.x) {
        const int q = e / D, d = e % D;
        const float m2 = q < kcur ? -2.f * cb[static_cast<int64_t>(c0 + q) * D + d] : 0.f;
        const float hi = __uint_as_float(to_tf32(m2));
        s_hi[q * SD + d] = hi;
        s_lo[q * SD + d] = __uint_as_float(to_tf32(m2 - hi));
      }
      for (int q = threadIdx.x; q < ntiles * 8; q += blockDim.x) {
        float nn = INFINITY;
        if (q < kcur) {
          float v[D];
          Vec<D>::load(cb + static_cast<int64_t>(c0 + q) * D, v);
          nn = 0.f;
#pragma unroll
          for (int t = 0; t < D; ++t) nn = fmaf(v[t], v[t], nn);
        }
        s_cn[q] = nn;
      }
      __syncthreads();
#pragma unroll 2
      for (int nt = 0; nt < ntiles; ++nt) {
        const int n0 = nt * 8;
        uint32_t bhi[KS][2], blo[KS][2];
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          const int o = (n0 + g) * SD + ks * 8 + tq;
          bhi[ks][0] = __float_as_uint(s_hi[o]);
          bhi[ks][1] = __float_as_uint(s_hi[o + 4]);
          blo[ks][0] = __float_as_uint(s_lo[o]);
          blo[ks][1] = __float_as_uint(s_lo[o + 4]);
        }
        const float2 cn = *reinterpret_cast<const float2*>(s_cn + n0 + 2 * tq);
        const int col0 = c0 + n0 + 2 * tq;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          float acc[4] = {cn.x, cn.y, cn.x, cn.y};
#pragma unroll
          for (int ks = 0; ks < KS; ++ks) {
            mma_tf32(acc, alo[mt][ks], bhi[ks][0], bhi[ks][1]);
            mma_tf32(acc, ahi[mt][ks], blo[ks][0], blo[ks][1]);
            mma_tf32(acc, ahi[mt][ks], bhi[ks][0], bhi[ks][1]);
          }
          if (acc[0] < best[mt][0]) best[mt][0] = acc[0], arg[mt][0] = col0;
          if (acc[1] < best[mt][0]) best[mt][0] = acc[1], arg[mt][0] = col0 + 1;
          if (acc[2] < best[mt][1]) best[mt][1] = acc[2], arg[mt][1] = col0;
          if (acc[3] < best[mt][1]) best[mt][1] = acc[3], arg[mt][1] = col0 + 1;
        }
      }
    }
    // the quad's 4 threads saw disjoint columns of the same rows: min, ties to the lowest index
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
          const float ob = __shfl_xor_sync(0xffffffffu, best[mt][h], o);
          const int oa = __shfl_xor_sync(0xffffffffu, arg[mt][h], o);
          if (ob < best[mt][h] || (ob == best[mt][h] && oa < arg[mt][h])) best[mt][h] = ob, arg[mt][h] = oa;
        }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (mt != tq) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t j = t0 + (warp * MT + mt) * 16 + g + 8 * h;
        if (j >= n) continue;
        float xv[D], c[D];
        Vec<D>::load(xb + j * D, xv);
        Vec<D>::load(cb + static_cast<int64_t>(arg[mt][h]) * D, c);
        float d2 = 0.f;
#pragma unroll
        for (int t = 0; t < D; ++t) {
          const float df = xv[t] - c[t];
          d2 = fmaf(df, df, d2);
        }
        const float wv = wb ? wb[j] : 1.f;
        obj += static_cast<double>(wv) * static_cast<double>(d2);
        if (a.train) {
          werr[j] = wv > 0.f ? wv * d2 : -1.f;
          if (wv > 0.f) {
            ull* acc = gsum + static_cast<int64_t>(arg[mt][h]) * (D + 1);
#pragma unroll
            for (int t = 0; t < D; ++t) {
              const long long qv = __double2ll_rn(static_cast<double>(wv) * static_cast<double>(xv[t]) * sx);
              if (qv) atomicAdd(acc + t, static_cast<ull>(qv));
            }
            const long long qw = max(1ll, __double2ll_rn(static_cast<double>(wv) * sw));
            atomicAdd(acc + D, static_cast<ull>(qw));
          }
        }
      }
    }
  }
  const double tot = block_sum_to_0(obj, red);
  if (threadIdx.x == 0) a.obj_part[static_cast<int64_t>(b) * gridDim.x + blockIdx.x] = tot;
}

// ---- finalize / reseed ---------------------------------------------------------------------------------
struct FinalizeArgs {
  CodebookState* st;
  const double* obj_part;
  int nbx;
  int k, dim;
  int it;
  int final_pass;
  double tol;
  ull* sums;
  float* cent;
  int* empty_list;  // [B, k]
  int* n_active;
};

__global__ void __launch_bounds__(kFinThreads) finalize_kernel(FinalizeArgs a) {
  __shared__ int s_update;
  __shared__ int s_cnt[kFinThreads];
  const int b = blockIdx.x;
  CodebookState* st = a.st + b;
  if (!st->active) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    double obj = 0;
    const double* part = a.obj_part + static_cast<int64_t>(b) * a.nbx;
    for (int i = 0; i < a.nbx; ++i) obj += part[i];
    int update = 0;
    st->n_empty = 0;
    if (a.final_pass) {
      st->obj = obj;
      st->active = 0;
    } else if (a.it > 0 && (!(st->prev_obj > 0) || (st->prev_obj - obj) / st->prev_obj < a.tol)) {
      st->obj = obj;
      st->active = 0;
    } else {
      st->prev_obj = obj;
      st->obj = obj;
      st->iters += 1;
      update = 1;
      atomicAdd(a.n_active, 1);
    }
    s_update = update;
  }
  __syncthreads();
  if (!s_update) return;
  const int k = a.k, dim = a.dim, row = dim + 1;
  const double sx = st->sx, sw = st->sw;
  ull* sums = a.sums + static_cast<int64_t>(b) * k * row;
  float* cent = a.cent + static_cast<int64_t>(b) * k * dim;
  const int per = (k + kFinThreads - 1) / kFinThreads;
  const int c_begin = min(k, static_cast<int>(threadIdx.x) * per), c_end = min(k, c_begin + per);
  int cnt = 0;
  for (int c = c_begin; c < c_end; ++c) cnt += static_cast<long long>(sums[static_cast<int64_t>(c) * row + dim]) <= 0;
  s_cnt[threadIdx.x] = cnt;
  __syncthreads();
  int off = 0, total = 0;
  for (int i = 0; i < kFinThreads; ++i) {
    off += i < static_cast<int>(threadIdx.x) ? s_cnt[i] : 0;
    total += s_cnt[i];
  }
  int* elist = a.empty_list + static_cast<int64_t>(b) * k;
  for (int c = c_begin; c < c_end; ++c) {
    ull* r = sums + static_cast<int64_t>(c) * row;
    const long long wsum = static_cast<long long>(r[dim]);
    if (wsum > 0) {
      const double den = static_cast<double>(wsum) / sw;
      for (int t = 0; t < dim; ++t)
        cent[static_cast<int64_t>(c) * dim + t] =
            static_cast<float>(static_cast<double>(static_cast<long long>(r[t])) / sx / den);
    } else {
      elist[off++] = c;
    }
    for (int t = 0; t <= dim; ++t) r[t] = 0ull;
  }
  if (threadIdx.x == 0) st->n_empty = total;
}

__global__ void __launch_bounds__(kReseedThreads) reseed_kernel(CodebookState* st_all, const float* __restrict__ x,
                                                                int64_t n, int dim, int k, float* werr_all,
                                                                const int* __restrict__ empty_list,
                                                                float* cent_all) {
  __shared__ float s_v[32];
  __shared__ long long s_j[32];
  const int b = blockIdx.x;
  CodebookState* st = st_all + b;
  if (!st->active) return;
  const int E = st->n_empty;
  if (E == 0) return;
  float* werr = werr_all + static_cast<int64_t>(b) * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = 0; e < E; ++e) {
    float bv = -INFINITY;
    long long bj = LLONG_MAX;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = werr[j];
      if (v > bv) bv = v, bj = j;  // j increases: strict > keeps the lowest index of equal values
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const long long oj = __shfl_xor_sync(0xffffffffu, bj, o);
      if (ov > bv || (ov == bv && oj < bj)) bv = ov, bj = oj;
    }
    __syncthreads();
    if (lane == 0) s_v[warp] = bv, s_j[warp] = bj;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int i = 1; i < static_cast<int>(blockDim.x >> 5); ++i)
        if (s_v[i] > bv || (s_v[i] == bv && s_j[i] < bj)) bv = s_v[i], bj = s_j[i];
      if (bv >= 0.f && bj != LLONG_MAX) {  // a point of weight > 0 not used yet (always, by validation)
        const int c = empty_list[static_cast<int64_t>(b) * k + e];
        const float* xi = x + (static_cast<int64_t>(b) * n + bj) * dim;
        float* cc = cent_all + (static_cast<int64_t>(b) * k + c) * dim;
        for (int t = 0; t < dim; ++t) cc[t] = xi[t];
        werr[bj] = -2.f;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) st->reseeded += E;
}

// Power-of-two scale 2^e with bound * 2^e <= 2^62 (bound = n * max w * max |x|, or n * max w).
double fixed_scale(double bound) {
  if (!(bound > 0)) return 1.0;
  return std::ldexp(1.0, 61 - std::ilogb(bound));
}

}  // namespace

bool kmeans_gpu_supported_dim(int dim) { return dim == 2 || dim == 4 || dim == 8 || dim == 16; }

struct KMeansGpu::Workspace {
  DeviceBuffer<CodebookState> st;
  DeviceBuffer<CodebookStats> stats;
  DeviceBuffer<ull> sums;
  DeviceBuffer<double> obj_part;
  DeviceBuffer<float> werr;
  DeviceBuffer<int> empty_list;
  DeviceBuffer<int> n_active;
  // k-means++
  DeviceBuffer<int> posidx, positions, m_of;
  DeviceBuffer<double> draws, d2;
  DeviceBuffer<float> xs, ws;
  PinnedBuffer<int> h_flag;
  cudaEvent_t ev0 = nullptr, ev1 = nullptr;
  // host copies of the chunk's stats / state
  std::vector<CodebookStats> h_stats;
  std::vector<CodebookState> h_st;
  ~Workspace() {
    if (ev0) cudaEventDestroy(ev0);
    if (ev1) cudaEventDestroy(ev1);
  }
  size_t bytes() const {
    return st.bytes() + stats.bytes() + sums.bytes() + obj_part.bytes() + werr.bytes() + empty_list.bytes() +
           n_active.bytes() + posidx.bytes() + positions.bytes() + m_of.bytes() + draws.bytes() + d2.bytes() +
           xs.bytes() + ws.bytes();
  }
};

const char* to_string(KMeansAssignPath p) {
  switch (p) {
    case KMeansAssignPath::Simt: return "simt";
    case KMeansAssignPath::TensorCore: return "tc";
    default: return "auto";
  }
}

KMeansGpu::KMeansGpu(const KMeansParams& p, KMeansAssignPath path)
    : p_(p), path_(path), ws_(std::make_unique<Workspace>()) {
  ANTKV_CHECK(p.k >= 1, "k-means (GPU): k = {} (must be >= 1)", p.k);
  ANTKV_CHECK(p.iters >= 0, "k-means (GPU): iters = {} (must be >= 0)", p.iters);
  ANTKV_CHECK(p.init_sample >= 0, "k-means (GPU): init_sample = {} (must be >= 0)", p.init_sample);
  ANTKV_CHECK(p.k <= (1 << 20), "k-means (GPU): k = {} is too large (at most 2^20)", p.k);
}
KMeansGpu::~KMeansGpu() = default;

KMeansAssignPath KMeansGpu::assign_path(int dim) const {
  KMeansAssignPath p = path_;
  if (p == KMeansAssignPath::Auto) {
    if (const char* e = std::getenv("ANTKV_KMEANS_ASSIGN")) {
      const std::string v(e);
      if (v == "simt") p = KMeansAssignPath::Simt;
      else if (v == "tc") p = KMeansAssignPath::TensorCore;
      else ANTKV_CHECK(v == "auto" || v.empty(), "ANTKV_KMEANS_ASSIGN={}: expected simt, tc or auto", v);
    }
  }
  if (p == KMeansAssignPath::Auto)
    p = (dim == 8 || dim == 16) && p_.k >= 1024 ? KMeansAssignPath::TensorCore : KMeansAssignPath::Simt;
  ANTKV_CHECK(p != KMeansAssignPath::TensorCore || dim == 8 || dim == 16,
              "k-means (GPU): the tensor-core assignment needs dimension 8 or 16 (got {})", dim);
  return p;
}

size_t KMeansGpu::workspace_bytes() const { return ws_->bytes(); }

void KMeansGpu::prepare(const KMeansDeviceBatch& b, cudaStream_t stream) {
  ANTKV_CHECK(b.n_codebooks > 0 && b.n_points > 0 && b.x, "k-means (GPU): empty batch");
  ANTKV_CHECK(kmeans_gpu_supported_dim(b.dim),
              "k-means (GPU): dimension {} is not supported (compiled for 2, 4, 8 and 16)", b.dim);
  ANTKV_CHECK(b.n_points < (int64_t{1} << 31), "k-means (GPU): {} points per codebook (at most 2^31 - 1)",
              b.n_points);
  ANTKV_CHECK(reinterpret_cast<uintptr_t>(b.x) % 16 == 0, "k-means (GPU): x must be 16-byte aligned");
  auto& w = *ws_;
  const int B = b.n_codebooks;
  w.stats.ensure(B);
  w.h_stats.assign(B, CodebookStats{0u, 0u, 0ull, ~0ull, ~0ull});
  upload(w.stats.get(), w.h_stats.data(), B, stream);
  const int64_t total = b.n_points * b.dim;
  const int nbx = static_cast<int>(std::min<int64_t>(64, (total + 256 * 16 - 1) / (256 * 16)));
  stats_kernel<<<dim3(nbx, B), 256, 0, stream>>>(b.x, b.weights, b.n_points, b.dim, w.stats.get());
  ANTKV_LAUNCH_CHECK("kmeans stats_kernel");
  download(w.h_stats.data(), w.stats.get(), B, stream);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  w.h_st.assign(B, CodebookState{});
  for (int i = 0; i < B; ++i) {
    const CodebookStats& s = w.h_stats[i];
    if (s.first_bad_x != ~0ull) {
      float v = 0;
      ANTKV_CUDA_CHECK(cudaMemcpy(&v, b.x + static_cast<int64_t>(i) * total + s.first_bad_x, sizeof(float),
                                  cudaMemcpyDeviceToHost));
      fail("k-means (GPU): non-finite value ({}) in the activations of codebook {}, point {}", v, i,
           s.first_bad_x / b.dim);
    }
    if (s.first_bad_w != ~0ull) {
      float v = 0;
      ANTKV_CUDA_CHECK(cudaMemcpy(&v, b.weights + static_cast<int64_t>(i) * b.n_points + s.first_bad_w,
                                  sizeof(float), cudaMemcpyDeviceToHost));
      fail("k-means (GPU): bad weight {} (codebook {}, point {})", v, i, s.first_bad_w);
    }
    const int64_t npos = b.weights ? static_cast<int64_t>(s.npos) : b.n_points;
    ANTKV_CHECK(npos >= p_.k, "k-means (GPU): codebook {} has {} points with weight > 0, fewer than its {} centroids",
                i, npos, p_.k);
    float mx, mw = 1.f;
    std::memcpy(&mx, &s.max_abs_x, 4);
    if (b.weights) std::memcpy(&mw, &s.max_w, 4);
    const double n = static_cast<double>(b.n_points);
    CodebookState& st = w.h_st[i];
    st.sx = fixed_scale(n * mw * mx);
    st.sw = fixed_scale(n * mw);
    st.active = 1;
  }
  w.st.ensure(B);
  upload(w.st.get(), w.h_st.data(), B, stream);
}

void KMeansGpu::kmeanspp_prepared(const KMeansDeviceBatch& b, float* d_centroids, cudaStream_t stream,
                                  int64_t offset) {
  auto& w = *ws_;
  const int B = b.n_codebooks, k = p_.k, dim = b.dim;
  const int64_t n = b.n_points;
  const int64_t want = p_.init_sample > 0 ? p_.init_sample : std::min<int64_t>(n, 64LL * k);
  // host: the sample's positions among the points of weight > 0 and the k uniforms, from the same stream
  // as antkv::kmeanspp_init
  std::vector<int64_t> npos(B);
  int64_t m_max = 0;
  for (int i = 0; i < B; ++i) {
    npos[i] = b.weights ? static_cast<int64_t>(w.h_stats[i].npos) : n;
    const int64_t m = std::min(npos[i], want);
    ANTKV_CHECK(m >= k, "k-means++: {} points with weight > 0 for {} centroids", m, k);
    m_max = std::max(m_max, m);
  }
  std::vector<int> positions(static_cast<size_t>(B) * m_max), m_of(B);
  std::vector<double> draws(static_cast<size_t>(B) * k);
  parallel_for(B, [&](int64_t i) {
    std::mt19937_64 rng(p_.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(offset + i) + 1);
    int* pos = positions.data() + i * m_max;
    const int64_t np = npos[i];
    if (np > want) {
      std::vector<int> v(static_cast<size_t>(np));
      std::iota(v.begin(), v.end(), 0);
      for (int64_t j = 0; j < want; ++j) {
        std::uniform_int_distribution<int64_t> u(j, np - 1);
        std::swap(v[j], v[u(rng)]);
      }
      std::sort(v.begin(), v.begin() + want);
      std::copy_n(v.begin(), want, pos);
      m_of[i] = static_cast<int>(want);
    } else {
      std::iota(pos, pos + np, 0);
      m_of[i] = static_cast<int>(np);
    }
    std::uniform_real_distribution<double> u01(0.0, 1.0);  // = generate_canonical: r = u * total
    for (int q = 0; q < k; ++q) draws[i * k + q] = u01(rng);
  });
  const int S = static_cast<int>((m_max + kPPThreads - 1) / kPPThreads);
  w.positions.ensure(positions.size());
  w.m_of.ensure(B);
  w.draws.ensure(draws.size());
  w.xs.ensure(static_cast<size_t>(B) * S * dim * kPPThreads);
  w.ws.ensure(static_cast<size_t>(B) * S * kPPThreads);
  w.d2.ensure(static_cast<size_t>(B) * S * kPPThreads);
  upload(w.positions.get(), positions.data(), positions.size(), stream);
  upload(w.m_of.get(), m_of.data(), B, stream);
  upload(w.draws.get(), draws.data(), draws.size(), stream);
  const int* posidx = nullptr;
  if (b.weights) {
    w.posidx.ensure(static_cast<size_t>(B) * n);
    compact_kernel<<<B, 1024, 0, stream>>>(b.weights, n, w.posidx.get());
    ANTKV_LAUNCH_CHECK("kmeans compact_kernel");
    posidx = w.posidx.get();
  }
  const int64_t cap = static_cast<int64_t>(S) * kPPThreads;
  gather_kernel<<<dim3(static_cast<unsigned>((cap + 255) / 256), B), 256, 0, stream>>>(
      b.x, b.weights, n, dim, w.positions.get(), static_cast<int>(m_max), w.m_of.get(), posidx, S, w.xs.get(),
      w.ws.get(), w.d2.get());
  ANTKV_LAUNCH_CHECK("kmeans gather_kernel");
  switch (dim) {
#define ANTKV_PP(D)                                                                                       \
  case D:                                                                                                 \
    kmeanspp_kernel<D><<<B, kPPThreads, 0, stream>>>(w.xs.get(), w.ws.get(), w.d2.get(), w.draws.get(), k, S, \
                                                     d_centroids);                                       \
    ANTKV_LAUNCH_CHECK("kmeans kmeanspp_kernel");                                                         \
    break;
    ANTKV_PP(2)
    ANTKV_PP(4)
    ANTKV_PP(8)
    ANTKV_PP(16)
#undef ANTKV_PP
    default:
      fail("k-means (GPU): dimension {} is not supported", dim);
  }
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void KMeansGpu::kmeanspp_device(const KMeansDeviceBatch& b, float* d_centroids, cudaStream_t stream,
                                int64_t offset) {
  prepare(b, stream);
  kmeanspp_prepared(b, d_centroids, stream, offset);
}

namespace {

template <int D>
void launch_assign(const AssignArgs& a0, int B, int nbx, cudaStream_t stream) {
  using C = AssignCfg<D>;
  AssignArgs a = a0;
  a.kc = std::min(a.k, C::KC);
  a.tiles_per_block = C::TPB;
  const size_t acc_bytes = static_cast<size_t>(a.k) * (D + 1) * sizeof(ull);
  a.smem_acc = acc_bytes <= static_cast<size_t>(kSmemAccBytes);
  const int kc_pad = (a.kc + 3) & ~3;
  const size_t smem = static_cast<size_t>(kc_pad) * (D + 1) * sizeof(float) + (a.smem_acc ? acc_bytes : 0);
  static bool attr_set = false;
  if (!attr_set) {
    const size_t max_smem = static_cast<size_t>(C::KC) * (D + 1) * sizeof(float) + kSmemAccBytes;
    ANTKV_CUDA_CHECK(cudaFuncSetAttribute(assign_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(max_smem)));
    attr_set = true;
  }
  assign_kernel<D><<<dim3(nbx, B), kAssignThreads, smem, stream>>>(a);
  ANTKV_LAUNCH_CHECK("kmeans assign_kernel");
}

template <int D>
void launch_assign_mma(const AssignArgs& a0, int B, int nbx, cudaStream_t stream) {
  AssignArgs a = a0;
  a.kc = MmaCfg<D>::NC;
  a.tiles_per_block = MmaCfg<D>::TPB;
  a.smem_acc = 0;
  assign_mma_kernel<D><<<dim3(nbx, B), kAssignThreads, 0, stream>>>(a);
  ANTKV_LAUNCH_CHECK("kmeans assign_mma_kernel");
}

int assign_blocks_per_codebook(int dim, int64_t n, KMeansAssignPath path) {
  int64_t per = 0;
  if (path == KMeansAssignPath::TensorCore) {
    per = int64_t{kAssignThreads / 32} * MmaCfg<8>::MT * 16 * MmaCfg<8>::TPB;
    return static_cast<int>((n + per - 1) / per);
  }
  switch (dim) {
    case 2: per = int64_t{kAssignThreads} * AssignCfg<2>::P * AssignCfg<2>::TPB; break;
    case 4: per = int64_t{kAssignThreads} * AssignCfg<4>::P * AssignCfg<4>::TPB; break;
    case 8: per = int64_t{kAssignThreads} * AssignCfg<8>::P * AssignCfg<8>::TPB; break;
    default: per = int64_t{kAssignThreads} * AssignCfg<16>::P * AssignCfg<16>::TPB; break;
  }
  return static_cast<int>((n + per - 1) / per);
}

}  // namespace

void KMeansGpu::train_device(const KMeansDeviceBatch& b, const float* d_init, float* d_centroids,
                             KMeansResult& out, cudaStream_t stream, int64_t offset, KMeansTimings* tm) {
  auto& w = *ws_;
  const int B = b.n_codebooks, k = p_.k, dim = b.dim;
  const int64_t n = b.n_points;
  double t0 = now_s();
  prepare(b, stream);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  double t1 = now_s();
  if (tm) tm->stats_s += t1 - t0;
  if (d_init) {
    if (d_init != d_centroids)
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(d_centroids, d_init, static_cast<size_t>(B) * k * dim * sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream));
  } else {
    kmeanspp_prepared(b, d_centroids, stream, offset);
  }
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  double t2 = now_s();
  if (tm) tm->init_s += t2 - t1;

  const KMeansAssignPath path = assign_path(dim);
  const int nbx = assign_blocks_per_codebook(dim, n, path);
  w.sums.ensure(static_cast<size_t>(B) * k * (dim + 1));
  w.obj_part.ensure(static_cast<size_t>(B) * nbx);
  w.werr.ensure(static_cast<size_t>(B) * n);
  w.empty_list.ensure(static_cast<size_t>(B) * k);
  w.n_active.ensure(1);
  w.h_flag.ensure(1);
  if (!w.ev0) {
    ANTKV_CUDA_CHECK(cudaEventCreate(&w.ev0));
    ANTKV_CUDA_CHECK(cudaEventCreate(&w.ev1));
  }
  ANTKV_CUDA_CHECK(cudaMemsetAsync(w.sums.get(), 0, static_cast<size_t>(B) * k * (dim + 1) * sizeof(ull), stream));

  AssignArgs a{};
  a.x = b.x;
  a.w = b.weights;
  a.n = n;
  a.k = k;
  a.cent = d_centroids;
  a.st = w.st.get();
  a.sums = w.sums.get();
  a.obj_part = w.obj_part.get();
  a.werr = w.werr.get();
  FinalizeArgs f{};
  f.st = w.st.get();
  f.obj_part = w.obj_part.get();
  f.nbx = nbx;
  f.k = k;
  f.dim = dim;
  f.tol = p_.tol;
  f.sums = w.sums.get();
  f.cent = d_centroids;
  f.empty_list = w.empty_list.get();
  f.n_active = w.n_active.get();

  int active = B;
  for (int it = 0; it <= p_.iters; ++it) {
    const bool final_pass = it == p_.iters;
    a.train = final_pass ? 0 : 1;
    ANTKV_CUDA_CHECK(cudaEventRecord(w.ev0, stream));
    if (path == KMeansAssignPath::TensorCore) {
      if (dim == 8) launch_assign_mma<8>(a, B, nbx, stream);
      else launch_assign_mma<16>(a, B, nbx, stream);
    } else {
      switch (dim) {
        case 2: launch_assign<2>(a, B, nbx, stream); break;
        case 4: launch_assign<4>(a, B, nbx, stream); break;
        case 8: launch_assign<8>(a, B, nbx, stream); break;
        default: launch_assign<16>(a, B, nbx, stream); break;
      }
    }
    ANTKV_CUDA_CHECK(cudaEventRecord(w.ev1, stream));
    ANTKV_CUDA_CHECK(cudaMemsetAsync(w.n_active.get(), 0, sizeof(int), stream));
    f.it = it;
    f.final_pass = final_pass ? 1 : 0;
    finalize_kernel<<<B, kFinThreads, 0, stream>>>(f);
    ANTKV_LAUNCH_CHECK("kmeans finalize_kernel");
    if (!final_pass) {
      reseed_kernel<<<B, kReseedThreads, 0, stream>>>(w.st.get(), b.x, n, dim, k, w.werr.get(),
                                                       w.empty_list.get(), d_centroids);
      ANTKV_LAUNCH_CHECK("kmeans reseed_kernel");
    }
    download(w.h_flag.get(), w.n_active.get(), 1, stream);
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (tm) {
      float ms = 0;
      ANTKV_CUDA_CHECK(cudaEventElapsedTime(&ms, w.ev0, w.ev1));
      tm->assign_s += ms * 1e-3;
      tm->assign_flops += 2.0 * static_cast<double>(n) * k * dim * active;
      tm->assign_passes += active;
    }
    active = w.h_flag.get()[0];
    if (!final_pass && active == 0) break;
  }
  download(w.h_st.data(), w.st.get(), B, stream);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (tm) tm->lloyd_s += now_s() - t2;
  out.objective.resize(B);
  out.iterations.resize(B);
  out.reseeded.resize(B);
  for (int i = 0; i < B; ++i) {
    out.objective[i] = w.h_st[i].obj;
    out.iterations[i] = w.h_st[i].iters;
    out.reseeded[i] = w.h_st[i].reseeded;
  }
}

}  // namespace antkv::cuda
