// The simulated GPU KV-cache quantizer (see simulated_quantizer.h): fake quantization of GpuRuntime's bf16 arena
// with QuantizedKvCache's semantics. Kernels first, then the quantizer class and make_gpu_kv_quantizer.
#include "kernels/quant/simulated_quantizer.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "anchor/anchor_scores.h"
#include "core/error.h"
#include "kernels/anchor/anchor_scores.h"
#include "kernels/attention/commute_decode.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/fp8_round.cuh"
#include "kernels/common/device_buffer.h"
#include "kernels/runtime/ops.h"
#include "quant/codebook_fit.h"
#include "quant/method_support.h"
#include "quant/anchor_rule.h"
#include "quant/vq.h"

namespace antkv {

using cuda::bf16;
using cuda::DeviceBuffer;

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 20));
}

__device__ __forceinline__ float round_fp16(float x) { return __half2float(__float2half_rn(x)); }

// ---- staging: rows [lo, lo + rows) of (k_pre, k_post, v), fp16-rounded, into work [3][rows][kvd] -------------
// Rows before row0 are waiting tokens of earlier calls, read from the ring (already rounded); the others come
// from the chunk (row row0 + t is chunk row t).
struct GatherArgs {
  const float* src[3] = {nullptr, nullptr, nullptr};
  int64_t stride[3] = {0, 0, 0};
  const float* ring = nullptr;  // [3][R][kvd]
  float* dst = nullptr;         // [3][rows][kvd]
  int lo = 0, row0 = 0, rows = 0, R = 0, kvd = 0;
};

__global__ void gather_kernel(const GatherArgs p) {
  const int which = blockIdx.y;
  const int64_t n = static_cast<int64_t>(p.rows) * p.kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / p.kvd), col = static_cast<int>(i % p.kvd);
    const int row = p.lo + r;
    float x;
    if (row < p.row0)
      x = p.ring[(static_cast<int64_t>(which) * p.R + row % p.R) * p.kvd + col];
    else
      x = round_fp16(p.src[which][static_cast<int64_t>(row - p.row0) * p.stride[which] + col]);
    p.dst[(static_cast<int64_t>(which) * p.rows + r) * p.kvd + col] = x;
  }
}

// ring[row % R] = work row (row - lo), rows [first, first + n), all three arrays
struct RingWriteArgs {
  const float* work = nullptr;  // [3][rows][kvd]
  float* ring = nullptr;        // [3][R][kvd]
  int lo = 0, rows = 0, first = 0, n = 0, R = 0, kvd = 0;
};

__global__ void ring_write_kernel(const RingWriteArgs p) {
  const int which = blockIdx.y;
  const int64_t n = static_cast<int64_t>(p.n) * p.kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / p.kvd), col = static_cast<int>(i % p.kvd);
    const int row = p.first + r;
    p.ring[(static_cast<int64_t>(which) * p.R + row % p.R) * p.kvd + col] =
        p.work[(static_cast<int64_t>(which) * p.rows + (row - p.lo)) * p.kvd + col];
  }
}

// ---- store rows into the bf16 arena: cache[h][slot0 + r][c] = bf16(keep[r][h] ? keep_src : src) ------------
struct StoreArgs {
  const float* src = nullptr;       // [n][kvd]
  const float* keep_src = nullptr;  // [n][kvd] or null
  const uint8_t* keep = nullptr;    // [n][kv_heads] or null
  bf16* cache = nullptr;            // [kv_heads][capacity][d]
  int slot0 = 0, n = 0, kv_heads = 0, d = 0, capacity = 0;
};

__global__ void store_kernel(const StoreArgs p) {
  const int kvd = p.kv_heads * p.d;
  const int64_t n = static_cast<int64_t>(p.n) * kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / kvd), col = static_cast<int>(i % kvd);
    const int h = col / p.d, c = col % p.d;
    const bool kept = p.keep && p.keep[static_cast<int64_t>(r) * p.kv_heads + h];
    const float x = kept ? p.keep_src[i] : p.src[i];
    p.cache[(static_cast<int64_t>(h) * p.capacity + p.slot0 + r) * p.d + c] = __float2bfloat16_rn(x);
  }
}

// ---- uniform (asymmetric integer) quantization, as antkv::uniform_quantize -------------------------------------
__device__ __forceinline__ void uniform_params(float lo, float hi, int bits, float& zero, float& scale,
                                               float& levels) {
  zero = round_fp16(lo);
  levels = static_cast<float>((1 << bits) - 1);
  scale = round_fp16((hi - zero) / levels);
}
__device__ __forceinline__ float uniform_value(float x, float zero, float scale, float levels) {
  if (!(scale > 0)) return zero;
  const float q = fminf(levels, fmaxf(0.0f, rintf((x - zero) / scale)));  // rint: half to even (nearbyint)
  return fmaf(q, scale, zero);
}

// keys: one thread per (group of G rows, channel), in place on x ([rows][kvd], groups from row first).
struct UniformKeyArgs {
  float* x = nullptr;
  int first = 0, n_groups = 0, group = 0, kvd = 0, bits = 2;
};

__global__ void uniform_keys_kernel(const UniformKeyArgs p) {
  const int64_t n = static_cast<int64_t>(p.n_groups) * p.kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int g = static_cast<int>(i / p.kvd), col = static_cast<int>(i % p.kvd);
    float* x = p.x + (static_cast<int64_t>(p.first) + static_cast<int64_t>(g) * p.group) * p.kvd + col;
    float lo = x[0], hi = x[0];
    for (int t = 1; t < p.group; ++t) {
      const float v = x[static_cast<int64_t>(t) * p.kvd];
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    float zero, scale, levels;
    uniform_params(lo, hi, p.bits, zero, scale, levels);
    for (int t = 0; t < p.group; ++t) {
      float& v = x[static_cast<int64_t>(t) * p.kvd];
      v = uniform_value(v, zero, scale, levels);
    }
  }
}

// values: one warp per (row, group of gs channels), in place on x ([rows][kvd], rows [first, first + n)).
struct UniformValueArgs {
  float* x = nullptr;
  int first = 0, n = 0, gs = 0, kvd = 0, bits = 2;
};

__global__ void uniform_values_kernel(const UniformValueArgs p) {
  const int lane = threadIdx.x & 31;
  const int groups_per_row = p.kvd / p.gs;
  const int64_t n_warps = static_cast<int64_t>(p.n) * groups_per_row;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (warp >= n_warps) return;  // warp-uniform
  const int r = static_cast<int>(warp / groups_per_row), g = static_cast<int>(warp % groups_per_row);
  float* x = p.x + (static_cast<int64_t>(p.first) + r) * p.kvd + static_cast<int64_t>(g) * p.gs;
  float lo = x[0], hi = x[0];
  for (int c = lane; c < p.gs; c += 32) lo = fminf(lo, x[c]), hi = fmaxf(hi, x[c]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  float zero, scale, levels;
  uniform_params(lo, hi, p.bits, zero, scale, levels);
  for (int c = lane; c < p.gs; c += 32) x[c] = uniform_value(x[c], zero, scale, levels);
}

// ---- vector quantization: nearest centroid per (row, KV head, group of C channels) --------------------------
// One thread per row; the block walks the (layer, head, group) codebook [k][C] through shared memory in tiles.
// Distances as the CPU's nearest() computes them: sum over t of (x_t - c_t)^2 in channel order, first minimum
// wins. The rounding follows the CPU build (gcc -O3 -march=x86-64-v3): for c >= 4 it vectorizes the products
// and adds them in order (a rounded product, then a rounded sum); for c < 4 its scalar loop contracts to fused
// multiply-adds. Matching it keeps near-tie codes identical on equal inputs.
// metric=task searches x' = L^T x against L^T c (both mapped by metric_forward) and writes the original-space
// centroid c of the winner: `cents` are the searched centroids, `out_cents` the written ones (the same array
// without a metric).
struct VqArgs {
  const float* x = nullptr;          // [n][kvd]
  const float* cents = nullptr;      // [kv_heads][groups][k][C]: searched
  const float* out_cents = nullptr;  // [kv_heads][groups][k][C]: written (cents when null)
  float* out = nullptr;              // [n][kvd]: the centroids
  int n = 0, groups = 0, k = 0, d = 0, kvd = 0;
};

constexpr int kVqThreads = 128;
constexpr int kVqTileFloats = 4096;  // 16 KB of centroids per tile

template <int C>
__global__ void __launch_bounds__(kVqThreads) vq_kernel(const VqArgs p) {
  constexpr int kTile = kVqTileFloats / C;
  __shared__ __align__(16) float tile[kVqTileFloats];
  const int g = blockIdx.y, h = blockIdx.z;
  const int r = blockIdx.x * kVqThreads + threadIdx.x;
  const bool active = r < p.n;
  const int64_t col0 = static_cast<int64_t>(h) * p.d + static_cast<int64_t>(g) * C;
  float x[C];
#pragma unroll
  for (int t = 0; t < C; ++t) x[t] = active ? p.x[static_cast<int64_t>(r) * p.kvd + col0 + t] : 0.f;
  const float* cb = p.cents + (static_cast<int64_t>(h) * p.groups + g) * p.k * C;
  float best = INFINITY;
  int arg = 0;
  for (int base = 0; base < p.k; base += kTile) {
    const int m = min(kTile, p.k - base);
    __syncthreads();
    for (int i = threadIdx.x; i < m * C; i += kVqThreads) tile[i] = cb[static_cast<int64_t>(base) * C + i];
    __syncthreads();
    if (active) {
      for (int q = 0; q < m; ++q) {
        float dd = 0.f;
#pragma unroll
        for (int t = 0; t < C; ++t) {
          const float diff = x[t] - tile[q * C + t];
          if constexpr (C >= 4)
            dd = __fadd_rn(dd, __fmul_rn(diff, diff));
          else
            dd = fmaf(diff, diff, dd);
        }
        if (dd < best) best = dd, arg = base + q;
      }
    }
  }
  if (active) {
    const float* dec = (p.out_cents ? p.out_cents : p.cents) + (static_cast<int64_t>(h) * p.groups + g) * p.k * C;
#pragma unroll
    for (int t = 0; t < C; ++t) p.out[static_cast<int64_t>(r) * p.kvd + col0 + t] = dec[static_cast<int64_t>(arg) * C + t];
  }
}

// ---- metric=task: x' = L_g^T x per group of c channels (quant/vq.h metric_forward) -----------------------------
// One thread per output channel j of a (row, KV head, group): y_j = sum_{i = j..c-1} L_ij x_i in fp64, i in
// increasing order, rounded once to float: the CPU's loop (a float product is exact in fp64, so each fma is the
// CPU's rounded sum), so x' is the CPU's bit for bit. out must not alias in.
struct MetricArgs {
  const float* in = nullptr;      // [n][kvd]
  float* out = nullptr;           // [n][kvd]
  const float* metric = nullptr;  // [kv_heads][d / c][c][c]: lower-triangular factors L, row-major
  int n = 0, c = 0, d = 0, kvd = 0;
};

__global__ void metric_forward_kernel(const MetricArgs p) {
  const int64_t total = static_cast<int64_t>(p.n) * p.kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.kvd;
    const int col = static_cast<int>(i % p.kvd);
    const int h = col / p.d, g = (col % p.d) / p.c, j = col % p.c;
    const int64_t group0 = r * p.kvd + static_cast<int64_t>(h) * p.d + static_cast<int64_t>(g) * p.c;
    const float* L = p.metric + (static_cast<int64_t>(h) * (p.d / p.c) + g) * p.c * p.c;
    double y = 0.0;
    for (int k = j; k < p.c; ++k) y = fma(static_cast<double>(L[k * p.c + j]), static_cast<double>(p.in[group0 + k]), y);
    p.out[i] = __double2float_rn(y);
  }
}

__global__ void iota_kernel(int32_t* out, int n, int first) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = first + i;
}

void launch_vq(const VqArgs& p, int kv_heads, int c, cudaStream_t stream) {
  if (p.n == 0) return;
  const dim3 grid((p.n + kVqThreads - 1) / kVqThreads, p.groups, kv_heads);
  switch (c) {
    case 1: vq_kernel<1><<<grid, kVqThreads, 0, stream>>>(p); break;
    case 2: vq_kernel<2><<<grid, kVqThreads, 0, stream>>>(p); break;
    case 4: vq_kernel<4><<<grid, kVqThreads, 0, stream>>>(p); break;
    case 8: vq_kernel<8><<<grid, kVqThreads, 0, stream>>>(p); break;
    case 16: vq_kernel<16><<<grid, kVqThreads, 0, stream>>>(p); break;
    case 32: vq_kernel<32><<<grid, kVqThreads, 0, stream>>>(p); break;
    default: fail("GPU VQ: group size c = {} is not supported (1, 2, 4, 8, 16 or 32)", c);
  }
  ANTKV_LAUNCH_CHECK("vq_kernel");
}

void launch_metric_forward(const MetricArgs& p, cudaStream_t stream) {
  if (p.n <= 0) return;
  metric_forward_kernel<<<blocks_for(static_cast<int64_t>(p.n) * p.kvd), kThreads, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("metric_forward_kernel");
}

void launch_store(const StoreArgs& p, cudaStream_t stream) {
  if (p.n <= 0) return;
  store_kernel<<<blocks_for(static_cast<int64_t>(p.n) * p.kv_heads * p.d), kThreads, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("store_kernel");
}

// ---- rotate=pca: x' = R (x - mean) before VQ, x = R^T x'_hat + mean after (quant/vq.h rotate_forward/inverse) --
// A batched d x d product per (row, KV head): out[r][j] = sum_k in[r][k] * mat[k][j], k = 0..d-1 in order, in
// fp64. A float times a float is exact in fp64, so every fma is one rounding, as each step of the CPU's fp64
// loops, and the float results equal the CPU's bit for bit (cuBLAS would reorder the sum). Forward: in = x -
// mean (an fp32 subtraction, as the CPU's tmp), mat = R^T. Inverse: mat = R, mean added in fp64 before rounding.
// One block of d threads (thread j = output channel j) per (tile of kRotRows rows, KV head); the tile's inputs
// go to shared memory before any output is written, so out may alias in.
struct RotateArgs {
  const float* in = nullptr;    // [n][kvd]
  float* out = nullptr;         // [n][kvd]
  const float* mat = nullptr;   // [kv_heads][d][d], [k][j] row-major: forward R^T, inverse R
  const float* mean = nullptr;  // [kv_heads][d]
  int n = 0, d = 0, kvd = 0;
  bool inverse = false;
};

constexpr int kRotRows = 16;

__global__ void rotate_kernel(const RotateArgs p) {
  extern __shared__ float rot_rows[];  // [kRotRows][d]
  const int h = blockIdx.y, j = threadIdx.x;
  const int r0 = blockIdx.x * kRotRows;
  const int rows = min(kRotRows, p.n - r0);
  const int64_t col = static_cast<int64_t>(h) * p.d + j;
  const float mean_j = p.mean[col];
  for (int r = 0; r < kRotRows; ++r) {
    float x = 0.f;
    if (r < rows) {
      x = p.in[static_cast<int64_t>(r0 + r) * p.kvd + col];
      if (!p.inverse) x = __fsub_rn(x, mean_j);
    }
    rot_rows[r * p.d + j] = x;
  }
  __syncthreads();
  double acc[kRotRows];
#pragma unroll
  for (int r = 0; r < kRotRows; ++r) acc[r] = 0.0;
  const float* m = p.mat + static_cast<int64_t>(h) * p.d * p.d + j;  // column j: coalesced over the block
  for (int k = 0; k < p.d; ++k) {
    const double mk = m[static_cast<int64_t>(k) * p.d];
#pragma unroll
    for (int r = 0; r < kRotRows; ++r) acc[r] = fma(static_cast<double>(rot_rows[r * p.d + k]), mk, acc[r]);
  }
  for (int r = 0; r < rows; ++r)
    p.out[static_cast<int64_t>(r0 + r) * p.kvd + col] =
        __double2float_rn(p.inverse ? __dadd_rn(acc[r], static_cast<double>(mean_j)) : acc[r]);
}

// ---- gain=k|kv: fp16 norm and unit direction (gain_normalize), renormalization after VQ (gain_restore) ----------
// One warp per (row, KV head). The squared norm is summed in fp64 by lane 0 in channel order (the CPU's loop;
// products of floats are exact in fp64, so the sum is the CPU's bit for bit), the scaling is one fp64 product
// rounded to float per channel. out may alias in (lane 0 reads the row before the warp writes it).
struct GainArgs {
  const float* in = nullptr;  // [n][kvd]
  float* out = nullptr;       // [n][kvd]
  float* norms = nullptr;     // [n][kv_heads]: written (fp16- or fp8-rounded) by normalize, read by restore
  int n = 0, kv_heads = 0, d = 0, kvd = 0;
  bool restore = false;
  bool fp8_norm = false;      // norm=fp8: the norm stored as E4M3 instead of fp16
};

constexpr int kGainThreads = 128;  // 4 warps, 4 (row, head) pairs per block

__device__ __forceinline__ double warp_sequential_sum_sq(const float* x, int d, int lane) {
  double sq = 0.0;
  if (lane == 0)
    for (int c = 0; c < d; ++c) sq = fma(static_cast<double>(x[c]), static_cast<double>(x[c]), sq);
  return __shfl_sync(0xffffffffu, sq, 0);
}

__global__ void __launch_bounds__(kGainThreads) gain_kernel(const GainArgs p) {
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(p.n) * p.kv_heads) return;  // warp-uniform
  const int r = static_cast<int>(warp / p.kv_heads), h = static_cast<int>(warp % p.kv_heads);
  const int64_t off = static_cast<int64_t>(r) * p.kvd + static_cast<int64_t>(h) * p.d;
  const float* x = p.in + off;
  const double sq = warp_sequential_sum_sq(x, p.d, lane);
  double scale;
  if (!p.restore) {
    const double norm = sqrt(sq);
    if (lane == 0) {  // stored in fp16 or E4M3, rounded once from the float norm (vq.cpp gain_normalize)
      const float nf = __double2float_rn(norm);
      p.norms[warp] = p.fp8_norm ? cuda::round_fp8_e4m3(nf) : round_fp16(nf);
    }
    scale = norm > 0 ? 1.0 / norm : 0.0;
  } else {
    scale = sq > 0 ? static_cast<double>(p.norms[warp]) / sqrt(sq) : 0.0;
  }
  __syncwarp();
  for (int c = lane; c < p.d; c += 32) p.out[off + c] = __double2float_rn(__dmul_rn(static_cast<double>(x[c]), scale));
}

// ---- rsq: random-sign Hadamard rotation, fp16 norm, Lloyd-Max levels per coordinate (quant/vq.h rsq_quantize) ---
// One warp per (row, KV head), the row in shared memory. The butterflies of the Walsh-Hadamard transform are
// the CPU's (each stage's pairs are independent, so the float results do not depend on who computes them); the
// two fp64 sums run on lane 0 in channel order; every other step is the CPU's float or fp64 expression.
struct RsqArgs {
  const float* in = nullptr;     // [n][kvd]
  float* out = nullptr;          // [n][kvd]
  const float* signs = nullptr;  // [kv_heads][d] of +-1 (rsq_signs of this layer and tensor)
  float levels[16] = {};         // the 2^bits Lloyd-Max levels of N(0, 1), increasing
  int n_levels = 0;
  float inv_sqrt_d = 0.f;        // 1.0f / sqrtf(d), computed on the host as the CPU does
  int n = 0, kv_heads = 0, d = 0, kvd = 0;
};

constexpr int kRsqThreads = 128;  // 4 warps

__device__ __forceinline__ void warp_fwht(float* y, int d, int lane) {  // unnormalized, as vq.cpp fwht()
  for (int h = 1; h < d; h <<= 1) {
    for (int t = lane; t < d / 2; t += 32) {
      const int i = (t / h) * 2 * h + t % h;
      const float a = y[i], b = y[i + h];
      y[i] = __fadd_rn(a, b);
      y[i + h] = __fsub_rn(a, b);
    }
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kRsqThreads) rsq_kernel(const RsqArgs p) {
  extern __shared__ float rsq_rows[];  // [kRsqThreads / 32][d]
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(p.n) * p.kv_heads) return;  // warp-uniform
  const int r = static_cast<int>(warp / p.kv_heads), h = static_cast<int>(warp % p.kv_heads);
  const int64_t off = static_cast<int64_t>(r) * p.kvd + static_cast<int64_t>(h) * p.d;
  const float* s = p.signs + static_cast<int64_t>(h) * p.d;
  float* y = rsq_rows + (threadIdx.x >> 5) * p.d;
  for (int c = lane; c < p.d; c += 32) y[c] = __fmul_rn(p.in[off + c], s[c]);
  __syncwarp();
  warp_fwht(y, p.d, lane);
  for (int c = lane; c < p.d; c += 32) y[c] = __fmul_rn(y[c], p.inv_sqrt_d);
  __syncwarp();
  const double sq = warp_sequential_sum_sq(y, p.d, lane);
  const float norm = round_fp16(__double2float_rn(sqrt(sq)));  // stored in fp16
  if (!(sq > 0) || norm == 0.f) {  // warp-uniform (sq is lane 0's)
    for (int c = lane; c < p.d; c += 32) p.out[off + c] = 0.f;
    return;
  }
  const double scale = sqrt(static_cast<double>(p.d) / sq);
  for (int c = lane; c < p.d; c += 32) {
    const float u = __double2float_rn(__dmul_rn(static_cast<double>(y[c]), scale));
    int q = 0;
    while (q + 1 < p.n_levels && u > __fmul_rn(0.5f, __fadd_rn(p.levels[q], p.levels[q + 1]))) ++q;  // ties: lower
    y[c] = p.levels[q];
  }
  __syncwarp();
  const double rq = warp_sequential_sum_sq(y, p.d, lane);
  const float back = __double2float_rn(static_cast<double>(norm) / sqrt(rq));  // renormalized to the stored norm
  __syncwarp();  // lane 0 has read y before it changes
  for (int c = lane; c < p.d; c += 32) y[c] = __fmul_rn(y[c], back);
  __syncwarp();
  warp_fwht(y, p.d, lane);
  for (int c = lane; c < p.d; c += 32) p.out[off + c] = __fmul_rn(__fmul_rn(y[c], p.inv_sqrt_d), s[c]);
}

// Blocks of `threads` for one warp per item (these kernels do not loop over the grid).
unsigned warp_blocks(int64_t items, int threads) {
  const int64_t blocks = (items * 32 + threads - 1) / threads;
  ANTKV_CHECK(blocks < (int64_t{1} << 31), "GPU KV quantizer: {} rows x heads are too many for one launch", items);
  return static_cast<unsigned>(blocks);
}

void launch_rotate(const RotateArgs& p, int kv_heads, cudaStream_t stream) {
  if (p.n <= 0) return;
  const dim3 grid((p.n + kRotRows - 1) / kRotRows, kv_heads);
  rotate_kernel<<<grid, p.d, static_cast<size_t>(kRotRows) * p.d * sizeof(float), stream>>>(p);
  ANTKV_LAUNCH_CHECK("rotate_kernel");
}

void launch_gain(const GainArgs& p, cudaStream_t stream) {
  if (p.n <= 0) return;
  gain_kernel<<<warp_blocks(static_cast<int64_t>(p.n) * p.kv_heads, kGainThreads), kGainThreads, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("gain_kernel");
}

void launch_rsq(const RsqArgs& p, cudaStream_t stream) {
  if (p.n <= 0) return;
  rsq_kernel<<<warp_blocks(static_cast<int64_t>(p.n) * p.kv_heads, kRsqThreads), kRsqThreads,
               static_cast<size_t>(kRsqThreads / 32) * p.d * sizeof(float), stream>>>(p);
  ANTKV_LAUNCH_CHECK("rsq_kernel");
}

// ---- decode-time anchors: one new query row's attention over the arena and each token's score contribution ---
// As QuantizedKvCache::add_attention_row, from the cache as attention will read it (the bf16 arena): block hq (a
// query head of KV head h = hq / G) computes A_j = softmax_j(q . k_j / sqrt(d)) over tokens [0, len), the output
// o = sum_j A_j v_j, and contrib[hq][j] = e_K A_j |q| |v_j - o| / sqrt(d) + e_V A_j for every token j (the host
// adds them to the running scores of the tracked ones). fp32 sums (the CPU sums in double).
struct AttentionRowArgs {
  const float* q = nullptr;        // [num_heads, d] post-RoPE (the decode token's fp32 query)
  const bf16* k_cache = nullptr;   // [kv_heads][capacity][d]
  const bf16* v_cache = nullptr;   // [kv_heads][capacity][d]
  const float* coef = nullptr;     // [kv_heads][2]: (e_K, e_V) weights of the method's anchor score
  float* prob = nullptr;           // [num_heads][capacity] scratch: the attention row
  float* contrib = nullptr;        // [num_heads][capacity] out
  int len = 0, capacity = 0, num_heads = 0, kv_heads = 0, d = 0;
  float scale = 0.f;               // 1 / sqrt(d)
};

__device__ float block_reduce(float x, bool is_max, float* red) {  // 256 threads; red: [32] shared
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, off);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // red may still be read by an earlier call
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = lane < static_cast<int>(blockDim.x / 32) ? red[lane] : (is_max ? -INFINITY : 0.f);
  for (int off = 16; off > 0; off /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, off);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  return x;
}

__global__ void __launch_bounds__(kThreads) attention_row_kernel(const AttentionRowArgs p) {
  extern __shared__ float sh[];  // q [d] | o [d] | red [32]
  float* sq = sh;
  float* so = sh + p.d;
  float* red = so + p.d;
  const int hq = blockIdx.x, h = hq / (p.num_heads / p.kv_heads);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarp = blockDim.x / 32;
  const bf16* K = p.k_cache + static_cast<int64_t>(h) * p.capacity * p.d;
  const bf16* V = p.v_cache + static_cast<int64_t>(h) * p.capacity * p.d;
  float* prob = p.prob + static_cast<int64_t>(hq) * p.capacity;
  float qq = 0.f;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    const float x = p.q[static_cast<int64_t>(hq) * p.d + c];
    sq[c] = x;
    qq += x * x;
  }
  const float qn = sqrtf(block_reduce(qq, false, red));  // (its barriers also publish sq)
  float m = -INFINITY;
  for (int j = warp; j < p.len; j += nwarp) {  // scores: a warp per token
    float dot = 0.f;
    for (int c = lane; c < p.d; c += 32) dot += sq[c] * __bfloat162float(K[static_cast<int64_t>(j) * p.d + c]);
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) prob[j] = dot * p.scale;
    m = fmaxf(m, dot * p.scale);
  }
  m = block_reduce(m, true, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < p.len; j += blockDim.x) {  // (the block's own writes above: visible after the barriers)
    const float e = __expf(prob[j] - m);
    prob[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, false, red);
  const float inv = 1.f / sum;
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {  // o: threads over channels, coalesced rows of V
    float o = 0.f;
    for (int j = 0; j < p.len; ++j) o += prob[j] * __bfloat162float(V[static_cast<int64_t>(j) * p.d + c]);
    so[c] = o * inv;
  }
  __syncthreads();
  const float ck = p.coef[2 * h], cv = p.coef[2 * h + 1];
  for (int j = warp; j < p.len; j += nwarp) {
    float dist = 0.f;
    for (int c = lane; c < p.d; c += 32) {
      const float x = __bfloat162float(V[static_cast<int64_t>(j) * p.d + c]) - so[c];
      dist += x * x;
    }
    for (int off = 16; off > 0; off /= 2) dist += __shfl_xor_sync(0xffffffffu, dist, off);
    if (lane == 0) {
      const float a = prob[j] * inv;
      p.contrib[static_cast<int64_t>(hq) * p.capacity + j] = ck * a * qn * sqrtf(dist) * p.scale + cv * a;
    }
  }
}

void launch_attention_row(const AttentionRowArgs& p, cudaStream_t stream) {
  if (p.len <= 0) return;
  attention_row_kernel<<<p.num_heads, kThreads, (static_cast<size_t>(2) * p.d + 32) * sizeof(float), stream>>>(p);
  ANTKV_LAUNCH_CHECK("attention_row_kernel");
}

// ---- the quantizer -----------------------------------------------------------------------------------------------

enum class Kind { kFp16, kUniform, kVq };

class GpuKvQuantizerImpl final : public GpuKvQuantizer {
 public:
  GpuKvQuantizerImpl(const ModelConfig& cfg, const MethodSpec& m, std::shared_ptr<const CodebookSet> cb,
                     int decode_window)
      : cfg_(cfg), m_(m), cb_(std::move(cb)), W_(decode_window) {
    KV_ = cfg.num_kv_heads;
    d_ = cfg.head_dim;
    kvd_ = cfg.kv_dim();
    ANTKV_CHECK(cfg.num_layers > 0 && KV_ > 0 && d_ > 0 && cfg.num_heads > 0, "method {}: incomplete model config", m.text);
    ANTKV_CHECK(decode_window >= 0, "method {}: decode window {} must be >= 0", m.text, decode_window);
    const ModelShapeFacts shape = ModelShapeFacts::of(cfg);
    require_support(m, MethodPath::kGpuSimulated, &shape);  // what this quantizer runs: quant/method_support.h
    const int L = cfg.num_layers;
    if (m.kind == MethodKind::kFp16) {
      kind_ = Kind::kFp16;
    } else if (m.kind == MethodKind::kUniform) {
      kind_ = Kind::kUniform;
      ANTKV_CHECK(m.bits >= 1 && m.bits <= 8, "method {}: bits must be in [1, 8]", m.text);
      ANTKV_CHECK(m.group >= 1 && m.window >= 0, "method {}: group must be >= 1 and window >= 0", m.text);
      vgs_ = std::min(m.group, d_);  // divides d_ (method_support): a group never runs into the next head
      R_ = m.window + m.group;  // waiting tokens: an incomplete key group plus the window
    } else {
      kind_ = Kind::kVq;  // rsq: the same prefill / decode-window flow, another per-row quantizer, no anchors
      rsq_ = m.kind == MethodKind::kRsq;
      pre_ = m.pre_rope();
      R_ = W_ + 1;
      if (rsq_) {
        // fwht needs a power of 2; one warp's row lives in shared memory
        ANTKV_CHECK(m.bits >= 1 && m.bits <= 4, "method {}: rsq bits must be in [1, 4]", m.text);
        ANTKV_CHECK(d_ >= 2 && d_ <= 1024 && (d_ & (d_ - 1)) == 0,
                    "method {}: rsq needs a power-of-2 head_dim in [2, 1024], the model has {}", m.text, d_);
        const std::vector<float>& lv = lloyd_max_gaussian(m.bits);
        std::copy(lv.begin(), lv.end(), rsq_levels_.begin());
        rsq_signs_.resize(L);
        for (int l = 0; l < L; ++l) {  // [2 (keys, values)][KV][d], the CPU's fixed signs
          std::vector<float> s;
          for (int side = 0; side < 2; ++side)
            for (int h = 0; h < KV_; ++h) {
              const std::vector<float> sh = rsq_signs(d_, l, side, h);
              s.insert(s.end(), sh.begin(), sh.end());
            }
          upload(rsq_signs_[l], s);
        }
      } else {
        rotate_ = m.rotate == Rotate::kPca;
        // rotate_kernel: one thread per output channel, kRotRows rows of the head in shared memory
        ANTKV_CHECK(!rotate_ || d_ <= 512,
                    "method {}: rotate=pca supports head_dim up to 512 on the GPU, the model has {}", m.text, d_);
        validate_codebooks();
        task_ = m.metric == Metric::kTask;
        bool any_anchors = false;
        for (int l = 0; l < L; ++l) any_anchors |= anchors_in(l);
        if (any_anchors) score_kind_ = m.score;
        kcent_.resize(L), vcent_.resize(L);
        for (int l = 0; l < L; ++l) {
          upload(kcent_[l], cb_->keys[l].centroids);
          upload(vcent_[l], cb_->values[l].centroids);
        }
        if (m.commute()) {  // keys coded in RoPE pair order (quant/vq.h rope_pair_order), each layer's key groups
          kpair_.resize(L);
          for (int l = 0; l < L; ++l) {
            const std::vector<int> order = rope_pair_order(d_, m.key_config(l).c);
            kpair_[l].resize(order.size());
            ANTKV_CUDA_CHECK(cudaMemcpy(kpair_[l].get(), order.data(), order.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
          }
        }
        if (task_)  // the searched centroids L^T c, mapped once by the CPU's own function (quant/vq.h)
          for (int side = 0; side < 2; ++side) {
            metric_[side].resize(L), mcent_[side].resize(L);
            for (int l = 0; l < L; ++l) {
              const LayerCodebooks& lc = side ? cb_->values[l] : cb_->keys[l];
              const VqConfig q = side ? m.value_config(l) : m.key_config(l);
              // [KV][groups][k][c]: every head's groups in one call (the factors are [KV][groups][c][c])
              upload(mcent_[side][l],
                     metric_centroids(VqHeadCodebooks{lc.centroids.data(), KV_ * (d_ / q.c), 1 << q.b, q.c},
                                      lc.metric.data()));
              upload(metric_[side][l], lc.metric);
            }
          }
        if (rotate_)
          for (int side = 0; side < 2; ++side) {
            rot_[side].resize(L), rot_t_[side].resize(L), mean_[side].resize(L);
            for (int l = 0; l < L; ++l) {
              const LayerCodebooks& lc = side ? cb_->values[l] : cb_->keys[l];
              upload(rot_[side][l], lc.rotation);
              upload(mean_[side][l], lc.mean);
              std::vector<float> t(lc.rotation.size());  // R^T per head: the forward pass reads columns of it
              for (int h = 0; h < KV_; ++h)
                for (int i = 0; i < d_; ++i)
                  for (int j = 0; j < d_; ++j)
                    t[(static_cast<size_t>(h) * d_ + j) * d_ + i] = lc.rotation[(static_cast<size_t>(h) * d_ + i) * d_ + j];
              upload(rot_t_[side][l], t);
            }
          }
      }
    }
    if (R_ > 0) {
      ring_.resize(L);
      for (auto& r : ring_) r.resize(static_cast<size_t>(3) * R_ * kvd_);
    }
    anchor_.resize(L);
    score_.resize(L);
    if (kind_ == Kind::kVq && m.promotes()) {  // decode-time anchors: running scores, exact copies, score weights
      promote_ = true;
      running_.resize(L);
      anchor_count_.assign(L, std::vector<int>(static_cast<size_t>(KV_), 0));
      exact_.resize(L);
      coef_.resize(L);
      for (int l = 0; l < L; ++l)
        upload(coef_[l], anchor_score_weight_table(m.score, cb_->keys[l].error_norm, cb_->values[l].error_norm, KV_));
    }
    len_.assign(L, 0);
    k_upto_.assign(L, 0);
    v_upto_.assign(L, 0);
  }

  std::string name() const override { return m_.text; }

  void reset() override {
    std::fill(len_.begin(), len_.end(), 0);
    std::fill(k_upto_.begin(), k_upto_.end(), 0);
    std::fill(v_upto_.begin(), v_upto_.end(), 0);
    for (auto& a : anchor_) a.clear();
    for (auto& a : score_) a.clear();
    for (auto& r : running_) r.clear();
    for (auto& n : anchor_count_) std::fill(n.begin(), n.end(), 0);
  }

  const std::vector<uint8_t>& anchor_flags(int layer) const override {
    ANTKV_CHECK(layer >= 0 && layer < cfg_.num_layers, "anchor_flags: layer {} out of range", layer);
    return anchor_[layer];
  }

  const std::vector<float>& anchor_scores(int layer) const override {
    ANTKV_CHECK(layer >= 0 && layer < cfg_.num_layers, "anchor_scores: layer {} out of range", layer);
    return score_[layer];
  }

  void on_layer(const GpuKvLayerChunk& c, cudaStream_t stream) override {
    const int l = c.layer, n = c.n_tokens;
    ANTKV_CHECK(l >= 0 && l < cfg_.num_layers, "GPU KV quantizer {}: layer {} out of range", m_.text, l);
    ANTKV_CHECK(c.position0 == len_[l], "GPU KV quantizer {}: layer {} gets tokens at position {} but has seen {}",
                m_.text, l, c.position0, len_[l]);
    ANTKV_CHECK(c.k_pre && c.k_post && c.v && c.k_cache && c.v_cache && c.positions && c.inv_freq,
                "GPU KV quantizer {}: null pointer in the layer chunk", m_.text);
    ANTKV_CHECK(c.position0 + n <= c.capacity, "GPU KV quantizer {}: tokens past the cache capacity", m_.text);
    if (n <= 0) return;
    const int row0 = c.position0, len = row0 + n;
    anchor_[l].resize(static_cast<size_t>(len) * KV_, 0);
    switch (kind_) {
      case Kind::kFp16: {
        stage(c, row0, nullptr, stream);
        store_rows(c, row0, n, true, true, stream);
        break;
      }
      case Kind::kUniform: uniform(c, stream); break;
      case Kind::kVq: vq(c, stream); break;
    }
    len_[l] = len;
  }

 private:
  // Whether layer l keeps anchors (lratio: its own ratio; 0 = none, as QuantizedKvCache).
  bool anchors_in(int l) const { return m_.has_anchors() && m_.ratio_of(l) > 0; }

  static void upload(DeviceBuffer<float>& dst, const std::vector<float>& src) {
    dst.resize(src.size());
    if (!src.empty())
      ANTKV_CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  void validate_codebooks() const {
    const MethodSpec& m = m_;
    ANTKV_CHECK(cb_, "method {}: needs codebooks", m.text);
    check_codebooks_fit(m, *cb_, cfg_);  // c and b the kernels here take: method_support
  }

  // work = fp16-rounded rows [lo, len) of (k_pre, k_post, v): waiting rows from the ring, the chunk's rows.
  void stage(const GpuKvLayerChunk& c, int lo, const float* ring, cudaStream_t stream) {
    const int row0 = c.position0, rows = row0 + c.n_tokens - lo;
    ANTKV_CHECK(lo <= row0 && (lo == row0 || (ring && row0 - lo <= R_)),
                "GPU KV quantizer {}: internal error: {} waiting tokens, ring of {}", m_.text, row0 - lo, R_);
    work_rows_ = rows;
    work_lo_ = lo;
    work_.ensure(static_cast<size_t>(3) * rows * kvd_);
    GatherArgs g;
    g.src[0] = c.k_pre, g.src[1] = c.k_post, g.src[2] = c.v;
    g.stride[0] = c.k_pre_stride, g.stride[1] = c.k_post_stride, g.stride[2] = c.v_stride;
    g.ring = ring;
    g.dst = work_.get();
    g.lo = lo, g.row0 = row0, g.rows = rows, g.R = R_, g.kvd = kvd_;
    gather_kernel<<<dim3(blocks_for(static_cast<int64_t>(rows) * kvd_), 3), kThreads, 0, stream>>>(g);
    ANTKV_LAUNCH_CHECK("gather_kernel");
  }
  float* work(int which, int row) const {
    return work_.get() + (static_cast<int64_t>(which) * work_rows_ + (row - work_lo_)) * kvd_;
  }
  // Stores work rows [first, first + n) of k_post and v as they are (FP16 copies) into the arena.
  void store_rows(const GpuKvLayerChunk& c, int first, int n, bool keys, bool values, cudaStream_t stream) {
    StoreArgs s;
    s.n = n, s.kv_heads = KV_, s.d = d_, s.capacity = c.capacity, s.slot0 = first;
    if (keys) {
      s.src = work(1, first);
      s.cache = c.k_cache;
      launch_store(s, stream);
    }
    if (values) {
      s.src = work(2, first);
      s.cache = c.v_cache;
      launch_store(s, stream);
    }
  }
  // Saves the newest min(R, n) chunk rows (fp16 copies) into the layer's ring.
  void save_ring(const GpuKvLayerChunk& c, cudaStream_t stream) {
    const int len = c.position0 + c.n_tokens;
    const int first = std::max(c.position0, len - R_);
    if (len - first <= 0) return;
    RingWriteArgs a;
    a.work = work_.get();
    a.ring = ring_[c.layer].get();
    a.lo = work_lo_, a.rows = work_rows_, a.first = first, a.n = len - first, a.R = R_, a.kvd = kvd_;
    ring_write_kernel<<<dim3(blocks_for(static_cast<int64_t>(a.n) * kvd_), 3), kThreads, 0, stream>>>(a);
    ANTKV_LAUNCH_CHECK("ring_write_kernel");
  }

  // KIVI-style, as QuantizedKvCache::append's uniform branch.
  void uniform(const GpuKvLayerChunk& c, cudaStream_t stream) {
    const int l = c.layer, row0 = c.position0, len = row0 + c.n_tokens, G = m_.group;
    int& k_upto = k_upto_[l];
    int& v_upto = v_upto_[l];
    const int quantizable = std::max(0, len - m_.window);
    const int k_end = quantizable / G * G;
    const int lo = std::min({row0, k_upto, v_upto});
    stage(c, lo, ring_[l].get(), stream);
    store_rows(c, row0, c.n_tokens, true, true, stream);  // FP16 until quantized
    save_ring(c, stream);                                 // before the in-place quantization below
    if (k_end > k_upto) {
      UniformKeyArgs a;
      a.x = work(1, lo);
      a.first = k_upto - lo;
      a.n_groups = (k_end - k_upto) / G;
      a.group = G;
      a.kvd = kvd_;
      a.bits = m_.bits;
      uniform_keys_kernel<<<blocks_for(static_cast<int64_t>(a.n_groups) * kvd_), kThreads, 0, stream>>>(a);
      ANTKV_LAUNCH_CHECK("uniform_keys_kernel");
      store_rows(c, k_upto, k_end - k_upto, true, false, stream);
    }
    k_upto = std::max(k_upto, k_end);
    if (quantizable > v_upto) {
      UniformValueArgs a;
      a.x = work(2, lo);
      a.first = v_upto - lo;
      a.n = quantizable - v_upto;
      a.gs = vgs_;
      a.kvd = kvd_;
      a.bits = m_.bits;
      const int64_t threads = static_cast<int64_t>(a.n) * (kvd_ / vgs_) * 32;
      uniform_values_kernel<<<static_cast<int>((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
      ANTKV_LAUNCH_CHECK("uniform_values_kernel");
      store_rows(c, v_upto, quantizable - v_upto, false, true, stream);
    }
    v_upto = std::max(v_upto, quantizable);
  }

  // One tensor (side 0 keys, 1 values) of n rows, as QuantizedKvCache::quantize_rows' quantize_head for every
  // KV head: x' = R (x - mean) (rotate=pca), fp16 norm and unit direction (gain), nearest centroids, renormalized,
  // rotated back. src, out: [n][kvd] (src is left as it is: it also holds the anchors' exact values).
  void quantize_tensor(int l, int side, const float* src, float* out, int n, cudaStream_t stream) {
    const VqConfig q = side ? m_.value_config(l) : m_.key_config(l);
    const bool gain = side ? m_.gain_values() : m_.gain_keys();
    // key_rope=commute: keys coded in RoPE pair order, the reconstruction put back in channel order at the end
    const bool pairs = side == 0 && !kpair_.empty();
    if (pairs) {
      pair_.ensure(static_cast<size_t>(n) * kvd_);
      cuda::permute_pair_order(src, kvd_, pair_.get(), kvd_, n, KV_, d_, kpair_[l].get(), true, stream);
      src = pair_.get();
    }
    VqArgs a;
    a.n = n, a.d = d_, a.kvd = kvd_;
    a.x = src;
    a.cents = (side ? vcent_ : kcent_)[l].get();
    a.out_cents = a.cents;
    a.out = out;
    a.groups = d_ / q.c;
    a.k = 1 << q.b;
    if (gain || rotate_) {
      unit_.ensure(static_cast<size_t>(n) * kvd_);
      a.x = unit_.get();
    }
    RotateArgs ra;
    ra.n = n, ra.d = d_, ra.kvd = kvd_;
    if (rotate_) {
      ra.mean = mean_[side][l].get();
      ra.in = src, ra.out = unit_.get(), ra.mat = rot_t_[side][l].get(), ra.inverse = false;
      launch_rotate(ra, KV_, stream);
    }
    GainArgs ga;
    ga.n = n, ga.kv_heads = KV_, ga.d = d_, ga.kvd = kvd_;
    ga.fp8_norm = m_.norm == Norm::kFp8;
    if (gain) {
      norms_.ensure(static_cast<size_t>(n) * KV_);
      ga.norms = norms_.get();
      ga.in = rotate_ ? unit_.get() : src, ga.out = unit_.get(), ga.restore = false;
      launch_gain(ga, stream);
    }
    if (task_) {  // searched in the metric: L^T x against L^T c, the original-space centroid written
      metric_x_.ensure(static_cast<size_t>(n) * kvd_);
      MetricArgs ma;
      ma.in = a.x, ma.out = metric_x_.get(), ma.metric = metric_[side][l].get();
      ma.n = n, ma.c = q.c, ma.d = d_, ma.kvd = kvd_;
      launch_metric_forward(ma, stream);
      a.x = metric_x_.get();
      a.cents = mcent_[side][l].get();
    }
    launch_vq(a, KV_, q.c, stream);
    if (gain) {
      ga.in = out, ga.out = out, ga.restore = true;
      launch_gain(ga, stream);
    }
    if (rotate_) {
      ra.in = out, ra.out = out, ra.mat = rot_[side][l].get(), ra.inverse = true;
      launch_rotate(ra, KV_, stream);
    }
    if (pairs) {  // src (pair_) is no longer read: it takes the pair-ordered result, out the channel-ordered one
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(pair_.get(), out, static_cast<size_t>(n) * kvd_ * sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream));
      cuda::permute_pair_order(pair_.get(), kvd_, out, kvd_, n, KV_, d_, kpair_[l].get(), false, stream);
    }
  }

  // rsq of one tensor's n rows: src, out [n][kvd].
  void rsq_tensor(int l, int side, const float* src, float* out, int n, cudaStream_t stream) {
    RsqArgs a;
    a.in = src, a.out = out;
    a.signs = rsq_signs_[l].get() + static_cast<size_t>(side) * kvd_;
    std::copy(rsq_levels_.begin(), rsq_levels_.end(), a.levels);
    a.n_levels = 1 << m_.bits;
    a.inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d_));  // as rsq_quantize
    a.n = n, a.kv_heads = KV_, a.d = d_, a.kvd = kvd_;
    launch_rsq(a, stream);
  }

  // Quantizes rows [first, first + n) (positions first..) into the arena; keep: device [n][KV] or null. The rows
  // are the staged work rows, or src[0..2] (k_pre, k_post, v; [n][kvd] each): a displaced anchor's exact copy.
  void quantize_rows(const GpuKvLayerChunk& c, int first, int n, const uint8_t* keep, cudaStream_t stream,
                     const float* const* src = nullptr) {
    if (n <= 0) return;
    const int l = c.layer;
    const float* rows[3];
    for (int which = 0; which < 3; ++which) rows[which] = src ? src[which] : work(which, first);
    tmp_.ensure(static_cast<size_t>(2) * n * kvd_);
    float* tk = tmp_.get();
    float* tv = tmp_.get() + static_cast<size_t>(n) * kvd_;
    if (rsq_) {
      rsq_tensor(l, 0, rows[pre_ ? 0 : 1], tk, n, stream);
      rsq_tensor(l, 1, rows[2], tv, n, stream);
    } else {
      quantize_tensor(l, 0, rows[pre_ ? 0 : 1], tk, n, stream);
      quantize_tensor(l, 1, rows[2], tv, n, stream);
    }
    if (pre_) {  // rotate the dequantized pre-RoPE keys to their positions
      pos_.ensure(n);
      iota_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(pos_.get(), n, first);
      ANTKV_LAUNCH_CHECK("iota_kernel");
      cuda::RopeParams rp;
      rp.x = tk;
      rp.positions = pos_.get();
      rp.inv_freq = c.inv_freq;
      rp.n_tokens = n;
      rp.n_heads = KV_;
      rp.head_dim = d_;
      cuda::rope(rp, stream);
    }
    StoreArgs s;
    s.n = n, s.kv_heads = KV_, s.d = d_, s.capacity = c.capacity, s.slot0 = first;
    s.keep = m_.anchor_keys() ? keep : nullptr;  // anchors=v: anchor tokens' keys are quantized
    s.src = tk;
    s.keep_src = rows[1];
    s.cache = c.k_cache;
    launch_store(s, stream);
    s.keep = m_.anchor_values() ? keep : nullptr;  // anchors=k: their values are quantized
    s.src = tv;
    s.keep_src = rows[2];
    s.cache = c.v_cache;
    launch_store(s, stream);
  }

  // vq / antkv, as QuantizedKvCache::append's codebook branch.
  void vq(const GpuKvLayerChunk& c, cudaStream_t stream) {
    const int l = c.layer, n = c.n_tokens, row0 = c.position0, len = row0 + n;
    int& upto = k_upto_[l];
    if (n > 1) {
      // a prefill chunk: anchors from the chunk's own full-precision attention, everything else quantized now
      stage(c, row0, nullptr, stream);
      save_ring(c, stream);
      const uint8_t* keep = nullptr;
      if (anchors_in(l)) {
        select_anchors_gpu(c, stream);
        keep = keep_d_.get();
      }
      if (promote_) {  // exact copies (a displaced anchor is quantized from its own); anchors start from their scores
        save_exact(c, row0, n, stream);
        running_[l].resize(static_cast<size_t>(len) * KV_, 0.0);
        for (size_t i = 0; i < static_cast<size_t>(n) * KV_; ++i) {
          const size_t x = static_cast<size_t>(row0) * KV_ + i;
          if (anchor_[l][x]) {
            running_[l][x] = score_[l][x];
            ++anchor_count_[l][i % KV_];
          }
        }
      }
      quantize_rows(c, row0, n, keep, stream);
      upto = len;
    } else {
      // decode: the new token stays FP16; quantize what left the window (never anchors)
      const int end = std::max(upto, len - W_);
      stage(c, upto, ring_[l].get(), stream);
      store_rows(c, row0, n, true, true, stream);
      save_ring(c, stream);
      const bool rule = promote_ && anchors_in(l);  // a layer without anchors (lratio 0) has nothing to decide
      if (rule) {
        save_exact(c, row0, n, stream);
        running_[l].resize(static_cast<size_t>(len) * KV_, 0.0);
        const int budget = static_cast<int>(std::ceil(m_.ratio_of(l) * static_cast<double>(len)));
        for (int r = upto; r < end; ++r)  // the online rule, then each displaced anchor quantized from its exact copy
          for (const int64_t w : decide_leaving_token(anchor_[l], running_[l], anchor_count_[l], KV_, r, budget))
            if (w >= 0) quantize_exact_row(c, static_cast<int>(w), stream);
      }
      if (end > upto) {
        const size_t nk = static_cast<size_t>(end - upto) * KV_;
        keep_h_.assign(anchor_[l].begin() + static_cast<size_t>(upto) * KV_,
                       anchor_[l].begin() + static_cast<size_t>(upto) * KV_ + nk);
        const bool any = std::any_of(keep_h_.begin(), keep_h_.end(), [](uint8_t x) { return x != 0; });
        if (any) {
          keep_d_.ensure(nk);
          ANTKV_CUDA_CHECK(cudaMemcpyAsync(keep_d_.get(), keep_h_.data(), nk, cudaMemcpyHostToDevice, stream));
          ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));  // keep_h_ may change before the copy ran
        }
        quantize_rows(c, upto, end - upto, any ? keep_d_.get() : nullptr, stream);
      }
      upto = end;
      if (rule) add_attention_row(c, stream);
    }
  }

  // Rows [first, first + n) of the staged work (k_pre, k_post, v; fp16-rounded) into the layer's exact copies.
  void save_exact(const GpuKvLayerChunk& c, int first, int n, cudaStream_t stream) {
    DeviceBuffer<float>& e = exact_[c.layer];
    if (e.size() < static_cast<size_t>(3) * c.capacity * kvd_) {  // [3][capacity][kvd], on first use
      ANTKV_CHECK(first == 0, "GPU KV quantizer {}: internal error: exact copies start after token 0", m_.text);
      e.resize(static_cast<size_t>(3) * c.capacity * kvd_);
    }
    for (int which = 0; which < 3; ++which)
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(e.get() + (static_cast<size_t>(which) * c.capacity + first) * kvd_, work(which, first),
                                       static_cast<size_t>(n) * kvd_ * sizeof(float), cudaMemcpyDeviceToDevice, stream));
  }

  // A displaced anchor (row w): every head whose flag is now 0 quantized from the exact copy, the others kept.
  void quantize_exact_row(const GpuKvLayerChunk& c, int w, cudaStream_t stream) {
    const int l = c.layer;
    const float* e = exact_[l].get();
    const float* src[3];
    for (int which = 0; which < 3; ++which) src[which] = e + (static_cast<size_t>(which) * c.capacity + w) * kvd_;
    keep_row_h_.assign(anchor_[l].begin() + static_cast<size_t>(w) * KV_, anchor_[l].begin() + static_cast<size_t>(w + 1) * KV_);
    keep_row_d_.ensure(static_cast<size_t>(KV_));
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(keep_row_d_.get(), keep_row_h_.data(), static_cast<size_t>(KV_), cudaMemcpyHostToDevice,
                                     stream));
    quantize_rows(c, w, 1, keep_row_d_.get(), stream, src);
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));  // keep_row_h_ is reused by the next displaced row
  }

  // The decode token's attention row over the arena (as attention will read it) into the running scores of the
  // tracked tokens (anchors and the window), as QuantizedKvCache::add_attention_row; summed in double here.
  void add_attention_row(const GpuKvLayerChunk& c, cudaStream_t stream) {
    ANTKV_CHECK(c.q, "GPU KV quantizer {}: the runtime passed no query at decode (the running anchor scores need it)",
                m_.text);
    const int l = c.layer, len = c.position0 + c.n_tokens, H = cfg_.num_heads, G = H / KV_;
    ANTKV_CHECK(c.n_tokens == 1 && c.q_stride >= static_cast<int64_t>(H) * d_,
                "GPU KV quantizer {}: internal error: a decode step of {} tokens", m_.text, c.n_tokens);
    row_prob_.ensure(static_cast<size_t>(H) * c.capacity);
    row_contrib_.ensure(static_cast<size_t>(H) * c.capacity);
    AttentionRowArgs a;
    a.q = c.q, a.k_cache = c.k_cache, a.v_cache = c.v_cache, a.coef = coef_[l].get();
    a.prob = row_prob_.get(), a.contrib = row_contrib_.get();
    a.len = len, a.capacity = c.capacity, a.num_heads = H, a.kv_heads = KV_, a.d = d_;
    a.scale = 1.0f / std::sqrt(static_cast<float>(d_));
    launch_attention_row(a, stream);
    h_contrib_.resize(static_cast<size_t>(H) * c.capacity);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(h_contrib_.data(), row_contrib_.get(), h_contrib_.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream));
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    const int upto = k_upto_[l];
    for (int h = 0; h < KV_; ++h)
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < len; ++j) {
          const size_t y = static_cast<size_t>(j) * KV_ + h;
          if (j < upto && !anchor_[l][y]) continue;  // quantized: not tracked
          running_[l][y] += h_contrib_[static_cast<size_t>(h * G + g) * c.capacity + j];
        }
  }

  // S_K, S_V of the chunk on the GPU, combined and selected on the host; fills anchor_[l] and keep_d_.
  void select_anchors_gpu(const GpuKvLayerChunk& c, cudaStream_t stream) {
    ANTKV_CHECK(c.q, "GPU KV quantizer {}: the runtime passed no queries (anchor scores need them)", m_.text);
    const int l = c.layer, n = c.n_tokens;
    sk_.ensure(static_cast<size_t>(n) * KV_);
    sv_.ensure(static_cast<size_t>(n) * KV_);
    cuda::AnchorScoreGpuArgs a;
    ws_.pack(c, cfg_.num_heads, KV_, d_, a, stream);
    a.s_k = sk_.get(), a.s_v = sv_.get();
    cuda::anchor_scores_gpu(a, ws_, stream);
    const size_t ns = static_cast<size_t>(n) * KV_;
    h_sk_.resize(ns), h_sv_.resize(ns), h_score_.resize(ns);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(h_sk_.data(), sk_.get(), ns * sizeof(float), cudaMemcpyDeviceToHost, stream));
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(h_sv_.data(), sv_.get(), ns * sizeof(float), cudaMemcpyDeviceToHost, stream));
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto& ek = cb_->keys[l].error_norm;
    const auto& ev = cb_->values[l].error_norm;
    combine_anchor_scores(score_kind_, h_sk_.data(), h_sv_.data(), ek.empty() ? nullptr : ek.data(),
                          ev.empty() ? nullptr : ev.data(), n, KV_,
                          static_cast<uint64_t>(l) * 7919 + static_cast<uint64_t>(c.position0), h_score_.data());
    keep_h_.assign(ns, 0);
    const float* score = h_score_.data();
    const double ratio = m_.ratio_of(l);  // lratio: this layer's
    mark_chunk_anchors(score, n, KV_, ratio, c.position0 == 0, keep_h_.data());  // as QuantizedKvCache
    std::copy(keep_h_.begin(), keep_h_.end(), anchor_[l].begin() + static_cast<size_t>(c.position0) * KV_);
    score_[l].resize(anchor_[l].size());
    std::copy(h_score_.begin(), h_score_.end(), score_[l].begin() + static_cast<size_t>(c.position0) * KV_);
    keep_d_.ensure(ns);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(keep_d_.get(), keep_h_.data(), ns, cudaMemcpyHostToDevice, stream));
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));  // keep_h_ is reused by the next layer
  }

  const ModelConfig cfg_;
  const MethodSpec m_;
  std::shared_ptr<const CodebookSet> cb_;
  const int W_;
  int KV_ = 0, d_ = 0, kvd_ = 0;
  Kind kind_ = Kind::kFp16;
  int vgs_ = 0;                 // uniform: value group size
  int R_ = 0;                   // ring rows per layer (0: no ring)
  bool pre_ = false;
  bool rsq_ = false, rotate_ = false, task_ = false;
  AnchorScoreKind score_kind_ = AnchorScoreKind::kErrorBound;

  std::vector<int> len_, k_upto_, v_upto_;  // vq uses k_upto_ as its `upto`
  std::vector<std::vector<uint8_t>> anchor_;
  std::vector<std::vector<float>> score_;   // per layer [tokens seen, KV]: the prefill chunks' combined scores
  // decode-time anchors (promote_): per layer running scores [tokens seen, KV] (double, as the CPU cache), anchors
  // per head [KV], exact fp16-rounded rows [3][capacity][kvd], score weights [KV][2]; the attention row's scratch
  bool promote_ = false;
  std::vector<std::vector<double>> running_;
  std::vector<std::vector<int>> anchor_count_;
  std::vector<DeviceBuffer<float>> exact_, coef_;
  DeviceBuffer<float> row_prob_, row_contrib_;
  DeviceBuffer<uint8_t> keep_row_d_;
  std::vector<float> h_contrib_;
  std::vector<uint8_t> keep_row_h_;
  std::vector<DeviceBuffer<float>> ring_;   // per layer [3][R][kvd]: fp16 copies of waiting tokens
  std::vector<DeviceBuffer<float>> kcent_, vcent_;
  // rotate=pca, [side 0 keys / 1 values][layer]: R and R^T [KV][d][d], mean [KV][d] (the codebooks' fp16-rounded ones)
  std::vector<DeviceBuffer<float>> rot_[2], rot_t_[2], mean_[2];
  // metric=task, [side][layer]: the factors L [KV][d / c][c][c] and the searched centroids L^T c [KV][d / c][2^b][c]
  // (c, b of that layer and tensor)
  std::vector<DeviceBuffer<float>> metric_[2], mcent_[2];
  std::vector<DeviceBuffer<float>> rsq_signs_;  // rsq, per layer [2][KV][d]
  std::array<float, 16> rsq_levels_{};          // rsq: lloyd_max_gaussian(bits), padded

  DeviceBuffer<float> work_, tmp_;
  DeviceBuffer<float> unit_, norms_;  // gain/rotate: [n][kvd] transformed rows, [n][KV] fp16 norms
  DeviceBuffer<float> metric_x_;      // metric=task: [n][kvd] the coded rows mapped by L^T
  std::vector<DeviceBuffer<int32_t>> kpair_;  // key_rope=commute: per layer [d] rope_pair_order of its key groups
  DeviceBuffer<float> pair_;                  // key_rope=commute: [n][kvd] keys in pair order
  int work_rows_ = 0, work_lo_ = 0;
  DeviceBuffer<float> sk_, sv_;
  DeviceBuffer<uint8_t> keep_d_;
  DeviceBuffer<int32_t> pos_;
  cuda::AnchorScoreWorkspace ws_;
  std::vector<float> h_sk_, h_sv_, h_score_;
  std::vector<uint8_t> keep_h_;
};

}  // namespace

std::unique_ptr<GpuKvQuantizer> make_gpu_kv_quantizer(const ModelConfig& cfg, const MethodSpec& method,
                                                      std::shared_ptr<const CodebookSet> codebooks, int decode_window) {
  return std::make_unique<GpuKvQuantizerImpl>(cfg, method, std::move(codebooks), decode_window);
}

}  // namespace antkv
