// GPU anchor scores: fp32 flash attention forward (pass 1) and the key-block anchor-score pass (pass 2).
// See kernels/anchor/anchor_scores.h for the maths and the contract.
//
// Both kernels: 128 threads, tiles of 64 query rows x 64 keys, whole head_dim rows in shared memory (row
// stride D + 4 floats: 16-byte aligned float4 reads, and 8 consecutive rows fall in 8 different bank groups).
// Thread (tx = tid & 15, ty = tid >> 4) owns the 8 rows 8*ty + a and the 4 key columns tx + 16*b of a tile;
// a row's 16 threads are one half-warp, so row reductions are 4 shuffles. All arithmetic is fp32 FMA on
// CUDA cores (no tensor cores: calibration wants fp32), summation orders fixed -> bitwise reproducible.
#include <cmath>
#include <cstdint>

#include "kernels/anchor/anchor_scores.h"
#include "kernels/common/cuda_check.h"

namespace antkv::cuda {
namespace {

constexpr int kB = 64;         // query rows per tile = keys per tile
constexpr int kThreads = 128;  // 16 x 8 threads
constexpr int kLDP = kB + 4;   // row stride of the probability tile (pass 1)
constexpr float kLn2 = 0.6931471805599453f;
// Pass 2: |v_j - o_i|^2 = |v|^2 - 2 v.o + |o|^2 loses digits to cancellation when v_j ~ o_i (attention
// concentrated on j, e.g. T = 1 or a sink). When the expansion is below kRefine * (|v|^2 + |o|^2) the
// distance is recomputed directly from the rows in shared memory; above it the expansion's relative error
// is at most ~1/kRefine times the fp32 dot-product error (~1e-5), i.e. ~1e-4 in |v - o|^2.
constexpr float kRefine = 0.0625f;

template <int D>
struct Dims {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static constexpr int LD = D + 4;  // smem row stride (floats)
  static constexpr int C4 = D / 4;  // float4 chunks per row
  static constexpr int NC = D / 64; // float4 column groups of o per thread (pass 1)
  // 1/sqrt(d) exactly rounded, and in log2 units
  static constexpr double kScaleD = D == 64 ? 0.125 : 0.088388347648318440550;
  static constexpr float kScale = static_cast<float>(kScaleD);
  static constexpr float kSl = static_cast<float>(kScaleD * 1.4426950408889634074);
};

__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// dst[r][0:D] = src[(row0 + r) * row_stride + 0:D] for r < kB (zeros past n_rows). src is 16-byte aligned.
template <int D>
__device__ __forceinline__ void load_tile(float* dst, const float* src, int64_t row_stride, int row0, int n_rows) {
  using Dm = Dims<D>;
  for (int idx = threadIdx.x; idx < kB * Dm::C4; idx += kThreads) {
    const int r = idx / Dm::C4, c4 = idx % Dm::C4;
    const int row = row0 + r;
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < n_rows) val = __ldg(reinterpret_cast<const float4*>(src + static_cast<int64_t>(row) * row_stride) + c4);
    *reinterpret_cast<float4*>(dst + r * Dm::LD + c4 * 4) = val;
  }
}

// acc[a][b] = sum_k A[8 ty + a][k] * B[tx + 16 b][k]  (A, B: [kB][LD] smem tiles), k in order.
template <int D>
__device__ __forceinline__ void tile_dot(const float* sA, const float* sB, float (&acc)[8][4]) {
  using Dm = Dims<D>;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int a = 0; a < 8; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  const float* pa = sA + (ty * 8) * Dm::LD;
  const float* pb = sB + tx * Dm::LD;
#pragma unroll 2
  for (int k = 0; k < D; k += 4) {
    float4 bv[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) bv[b] = *reinterpret_cast<const float4*>(pb + 16 * b * Dm::LD + k);
#pragma unroll
    for (int a = 0; a < 8; ++a) {
      const float4 av = *reinterpret_cast<const float4*>(pa + a * Dm::LD + k);
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = dot4(av, bv[b], acc[a][b]);
    }
  }
}

// Sum of squares of row 8 ty + a of a [kB][LD] tile, on all 16 threads of the row.
template <int D>
__device__ __forceinline__ float row_norm2(const float* s, int a) {
  using Dm = Dims<D>;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const float* row = s + (ty * 8 + a) * Dm::LD;
  float acc = 0.f;
#pragma unroll
  for (int c4 = tx; c4 < Dm::C4; c4 += 16) {
    const float4 x = *reinterpret_cast<const float4*>(row + c4 * 4);
    acc = dot4(x, x, acc);
  }
  return half_warp_sum(acc);
}

template <int D>
constexpr int pass1_smem_bytes() {
  return (2 * kB * Dims<D>::LD + kB * kLDP) * static_cast<int>(sizeof(float));
}
template <int D>
constexpr int pass2_smem_bytes() {
  return 3 * kB * Dims<D>::LD * static_cast<int>(sizeof(float)) + kB * 16 + kB * 4;
}

// ---- pass 1: causal fp32 flash attention forward ------------------------------------------------------
// Block (query tile, query head); the longest rows first. Writes o, lse and row_stats for rows < T.
template <int D>
__global__ void __launch_bounds__(kThreads) anchor_pass1_kernel(const AnchorScoreGpuArgs p) {
  using Dm = Dims<D>;
  extern __shared__ __align__(16) float smem[];
  float* sQ = smem;               // [kB][LD] this block's queries
  float* sKV = sQ + kB * Dm::LD;  // [kB][LD] K, then V, of the current key tile
  float* sP = sKV + kB * Dm::LD;  // [kB][kLDP] probabilities of the current tile (unnormalized)

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int T = p.n_tokens, H = p.n_heads, KV = p.n_kv_heads;
  const int n_t = (T + kB - 1) / kB;
  const int qt = n_t - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y, kvh = h / (H / KV);
  const int q0 = qt * kB;
  const int64_t q_stride = static_cast<int64_t>(H) * D, kv_stride = static_cast<int64_t>(KV) * D;

  load_tile<D>(sQ, p.q + static_cast<int64_t>(h) * D, q_stride, q0, T);

  float m[8], l[8], acc[8][Dm::NC][4];
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.f;
#pragma unroll
    for (int cc = 0; cc < Dm::NC; ++cc) acc[a][cc][0] = acc[a][cc][1] = acc[a][cc][2] = acc[a][cc][3] = 0.f;
  }

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kB;
    load_tile<D>(sKV, p.k + static_cast<int64_t>(kvh) * D, kv_stride, k0, T);
    __syncthreads();
    float s[8][4];
    tile_dot<D>(sQ, sKV, s);
    // causal mask and online softmax (log2 domain). Every row of the tile sees key k0 (k0 <= q0 <= row and
    // k0 < T), so the running max is finite after the first tile.
#pragma unroll
    for (int a = 0; a < 8; ++a) {
      const int row = q0 + ty * 8 + a;
      float mx = -INFINITY;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int key = k0 + tx + 16 * b;
        s[a][b] = (key <= row && key < T) ? s[a][b] * Dm::kSl : -INFINITY;
        mx = fmaxf(mx, s[a][b]);
      }
      mx = half_warp_max(mx);
      const float m_new = fmaxf(m[a], mx);
      const float alpha = exp2f(m[a] - m_new);  // 0 on the first tile
      m[a] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        s[a][b] = exp2f(s[a][b] - m_new);
        rs += s[a][b];
      }
      l[a] = l[a] * alpha + rs;  // this thread's columns only; summed over the row at the end
#pragma unroll
      for (int cc = 0; cc < Dm::NC; ++cc)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][cc][e] *= alpha;
#pragma unroll
      for (int b = 0; b < 4; ++b) sP[(ty * 8 + a) * kLDP + tx + 16 * b] = s[a][b];
    }
    __syncthreads();  // K no longer read; P visible
    load_tile<D>(sKV, p.v + static_cast<int64_t>(kvh) * D, kv_stride, k0, T);
    __syncthreads();
    // acc[a][cols] += sum_j P[8 ty + a][j] V[j][cols], cols = 64 cc + 4 tx + e
#pragma unroll 2
    for (int j = 0; j < kB; j += 4) {
      float4 pr[8];
#pragma unroll
      for (int a = 0; a < 8; ++a) pr[a] = *reinterpret_cast<const float4*>(sP + (ty * 8 + a) * kLDP + j);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int cc = 0; cc < Dm::NC; ++cc) {
          const float4 vv = *reinterpret_cast<const float4*>(sKV + (j + jj) * Dm::LD + 64 * cc + 4 * tx);
#pragma unroll
          for (int a = 0; a < 8; ++a) {
            const float pj = jj == 0 ? pr[a].x : jj == 1 ? pr[a].y : jj == 2 ? pr[a].z : pr[a].w;
            acc[a][cc][0] = fmaf(pj, vv.x, acc[a][cc][0]);
            acc[a][cc][1] = fmaf(pj, vv.y, acc[a][cc][1]);
            acc[a][cc][2] = fmaf(pj, vv.z, acc[a][cc][2]);
            acc[a][cc][3] = fmaf(pj, vv.w, acc[a][cc][3]);
          }
        }
      }
    }
    __syncthreads();  // sKV and sP are refilled by the next tile
  }

  // epilogue: o = acc / l, L = m + log2(l), |q| / sqrt(d), |o|^2
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    const int row = q0 + ty * 8 + a;
    const float lt = half_warp_sum(l[a]);
    const float inv = 1.f / lt;
    float on2 = 0.f;
#pragma unroll
    for (int cc = 0; cc < Dm::NC; ++cc)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[a][cc][e] *= inv;
        on2 = fmaf(acc[a][cc][e], acc[a][cc][e], on2);
      }
    on2 = half_warp_sum(on2);
    const float qn = sqrtf(row_norm2<D>(sQ, a)) * Dm::kScale;
    if (row < T) {
      float* orow = p.o + (static_cast<int64_t>(row) * H + h) * D;
#pragma unroll
      for (int cc = 0; cc < Dm::NC; ++cc)
        *reinterpret_cast<float4*>(orow + 64 * cc + 4 * tx) =
            make_float4(acc[a][cc][0], acc[a][cc][1], acc[a][cc][2], acc[a][cc][3]);
      if (tx == 0) {
        const float lse2 = m[a] + log2f(lt);
        const int64_t hr = static_cast<int64_t>(h) * T + row;
        p.lse[hr] = lse2 * kLn2;
        reinterpret_cast<float4*>(p.row_stats)[hr] = make_float4(lse2, qn, on2, 0.f);
      }
    }
  }
}

// ---- pass 2: per key block, accumulate S_V and S_K over all query blocks i >= j of the G heads ----------
template <int D>
__global__ void __launch_bounds__(kThreads) anchor_pass2_kernel(const AnchorScoreGpuArgs p) {
  using Dm = Dims<D>;
  extern __shared__ __align__(16) float smem[];
  float* sK = smem;                 // [kB][LD] this block's keys
  float* sV = sK + kB * Dm::LD;     // [kB][LD] this block's values
  float* sX = sV + kB * Dm::LD;     // [kB][LD] queries, then outputs, of the current query tile
  float4* sStat = reinterpret_cast<float4*>(sX + kB * Dm::LD);  // [kB] row stats of the query tile
  float* sVn = reinterpret_cast<float*>(sStat + kB);             // [kB] |v_j|^2

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int T = p.n_tokens, H = p.n_heads, KV = p.n_kv_heads, G = H / KV;
  const int n_t = (T + kB - 1) / kB;
  const int jb = blockIdx.x;  // low key blocks have the most query tiles: launched first
  const int kvh = blockIdx.y;
  const int j0 = jb * kB;
  const int64_t q_stride = static_cast<int64_t>(H) * D, kv_stride = static_cast<int64_t>(KV) * D;

  load_tile<D>(sK, p.k + static_cast<int64_t>(kvh) * D, kv_stride, j0, T);
  load_tile<D>(sV, p.v + static_cast<int64_t>(kvh) * D, kv_stride, j0, T);
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    const float n2 = row_norm2<D>(sV, a);
    if (tx == 0) sVn[ty * 8 + a] = n2;
  }
  __syncthreads();
  float vn2[4];
#pragma unroll
  for (int b = 0; b < 4; ++b) vn2[b] = sVn[tx + 16 * b];

  double acc_k[4] = {0, 0, 0, 0}, acc_v[4] = {0, 0, 0, 0};
  for (int g = 0; g < G; ++g) {
    const int h = kvh * G + g;
    const float4* stats = reinterpret_cast<const float4*>(p.row_stats) + static_cast<int64_t>(h) * T;
    for (int it = jb; it < n_t; ++it) {
      const int i0 = it * kB;
      load_tile<D>(sX, p.q + static_cast<int64_t>(h) * D, q_stride, i0, T);
      if (tid < kB) sStat[tid] = i0 + tid < T ? stats[i0 + tid] : make_float4(0.f, 0.f, 0.f, 0.f);
      __syncthreads();
      float s[8][4];
      tile_dot<D>(sX, sK, s);  // q_i . k_j
      __syncthreads();
      load_tile<D>(sX, p.o + static_cast<int64_t>(h) * D, q_stride, i0, T);
      __syncthreads();
      float vo[8][4];
      tile_dot<D>(sX, sV, vo);  // o_i . v_j
#pragma unroll
      for (int a = 0; a < 8; ++a) {
        const int r = ty * 8 + a, row = i0 + r;
        if (row >= T) continue;
        const float4 st = sStat[r];  // {L_i log2 e, |q_i| / sqrt(d), |o_i|^2, 0}
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int c = tx + 16 * b;
          if (j0 + c > row) continue;  // causal (also excludes keys >= T)
          const float pr = exp2f(s[a][b] * Dm::kSl - st.x);
          float d2 = fmaf(-2.f, vo[a][b], vn2[b] + st.z);
          if (d2 < kRefine * (vn2[b] + st.z)) {  // cancellation: recompute |v_j - o_i|^2 directly
            const float* vr = sV + c * Dm::LD;
            const float* orr = sX + r * Dm::LD;
            d2 = 0.f;
            for (int k = 0; k < D; k += 4) {
              const float4 x = *reinterpret_cast<const float4*>(vr + k);
              const float4 y = *reinterpret_cast<const float4*>(orr + k);
              const float4 df = make_float4(x.x - y.x, x.y - y.y, x.z - y.z, x.w - y.w);
              d2 = dot4(df, df, d2);
            }
          }
          acc_v[b] += static_cast<double>(pr);
          acc_k[b] += static_cast<double>(pr * st.y * sqrtf(fmaxf(d2, 0.f)));
        }
      }
      __syncthreads();  // sX / sStat are refilled by the next tile
    }
  }

  // reduce the 8 row groups of each key column in a fixed order; one plain store per key
  double* red = reinterpret_cast<double*>(sX);  // [2][8][kB]; sX is 16-byte aligned and >= 8 KiB
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    red[ty * kB + tx + 16 * b] = acc_k[b];
    red[8 * kB + ty * kB + tx + 16 * b] = acc_v[b];
  }
  __syncthreads();
  if (tid < kB && j0 + tid < T) {
    double sk = 0, sv = 0;
    for (int y = 0; y < 8; ++y) {
      sk += red[y * kB + tid];
      sv += red[8 * kB + y * kB + tid];
    }
    const int64_t x = static_cast<int64_t>(j0 + tid) * KV + kvh;
    p.s_k[x] = static_cast<float>(sk);
    p.s_v[x] = static_cast<float>(sv);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_shape(const AnchorScoreGpuArgs& p, const char* who) {
  ANTKV_CHECK(p.n_tokens > 0 && p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "{}: bad shape (T={}, heads={}, kv_heads={}; heads must be a positive multiple of kv_heads)", who,
              p.n_tokens, p.n_heads, p.n_kv_heads);
  ANTKV_CHECK(p.head_dim == 64 || p.head_dim == 128, "{}: head_dim {} is not supported (64 or 128)", who,
              p.head_dim);
  ANTKV_CHECK(p.n_heads <= 65535 && p.n_kv_heads <= 65535, "{}: too many heads ({})", who, p.n_heads);
}

void check_ptrs(const AnchorScoreGpuArgs& p, bool pass2, const char* who) {
  ANTKV_CHECK(p.q && p.k && p.v && p.o && p.lse && p.row_stats, "{}: null pointer (q, k, v, o, lse, row_stats)",
              who);
  ANTKV_CHECK(!pass2 || (p.s_k && p.s_v), "{}: null output pointer (s_k, s_v)", who);
  ANTKV_CHECK(aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.o) && aligned16(p.row_stats),
              "{}: q, k, v, o and row_stats must be 16-byte aligned", who);
}

template <int D>
void launch_pass1(const AnchorScoreGpuArgs& p, cudaStream_t stream) {
  constexpr int smem = pass1_smem_bytes<D>();
  ANTKV_CUDA_CHECK(cudaFuncSetAttribute(anchor_pass1_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.n_tokens + kB - 1) / kB, p.n_heads);
  anchor_pass1_kernel<D><<<grid, kThreads, smem, stream>>>(p);
  ANTKV_LAUNCH_CHECK(D == 64 ? "anchor_pass1_kernel<64>" : "anchor_pass1_kernel<128>");
}

template <int D>
void launch_pass2(const AnchorScoreGpuArgs& p, cudaStream_t stream) {
  constexpr int smem = pass2_smem_bytes<D>();
  ANTKV_CUDA_CHECK(cudaFuncSetAttribute(anchor_pass2_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.n_tokens + kB - 1) / kB, p.n_kv_heads);
  anchor_pass2_kernel<D><<<grid, kThreads, smem, stream>>>(p);
  ANTKV_LAUNCH_CHECK(D == 64 ? "anchor_pass2_kernel<64>" : "anchor_pass2_kernel<128>");
}

}  // namespace

void AnchorScoreWorkspace::bind(AnchorScoreGpuArgs& p) {
  check_shape(p, "AnchorScoreWorkspace");
  const size_t rows = static_cast<size_t>(p.n_tokens) * p.n_heads;
  o_.ensure(rows * p.head_dim);
  lse_.ensure(rows);
  stats_.ensure(rows * 4);
  p.o = o_.get();
  p.lse = lse_.get();
  p.row_stats = stats_.get();
}

void AnchorScoreWorkspace::pack(const DeviceLayerActivations& a, int n_heads, int n_kv_heads, int head_dim,
                                AnchorScoreGpuArgs& p, cudaStream_t stream) {
  ANTKV_CHECK(a.n_tokens >= 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 && a.q && a.k_post && a.v,
              "AnchorScoreWorkspace::pack: bad activations");
  const int T = a.n_tokens;
  const size_t qd = static_cast<size_t>(n_heads) * head_dim, kvd = static_cast<size_t>(n_kv_heads) * head_dim;
  q_.ensure(T * qd);
  k_.ensure(T * kvd);
  v_.ensure(T * kvd);
  auto copy2d = [&](float* dst, size_t width, const float* src, int64_t stride) {
    if (T == 0) return;
    ANTKV_CUDA_CHECK(cudaMemcpy2DAsync(dst, width * sizeof(float), src, stride * sizeof(float), width * sizeof(float),
                                       T, cudaMemcpyDeviceToDevice, stream));
  };
  copy2d(q_.get(), qd, a.q, a.q_stride);
  copy2d(k_.get(), kvd, a.k_post, a.k_post_stride);
  copy2d(v_.get(), kvd, a.v, a.v_stride);
  p.q = q_.get(), p.k = k_.get(), p.v = v_.get();
  p.n_tokens = T, p.n_heads = n_heads, p.n_kv_heads = n_kv_heads, p.head_dim = head_dim;
}

void anchor_scores_pass1(const AnchorScoreGpuArgs& p, cudaStream_t stream) {
  check_shape(p, "anchor_scores_pass1");
  check_ptrs(p, false, "anchor_scores_pass1");
  if (p.head_dim == 64)
    launch_pass1<64>(p, stream);
  else
    launch_pass1<128>(p, stream);
}

void anchor_scores_pass2(const AnchorScoreGpuArgs& p, cudaStream_t stream) {
  check_shape(p, "anchor_scores_pass2");
  check_ptrs(p, true, "anchor_scores_pass2");
  if (p.head_dim == 64)
    launch_pass2<64>(p, stream);
  else
    launch_pass2<128>(p, stream);
}

void anchor_scores_gpu(const AnchorScoreGpuArgs& p, cudaStream_t stream) {
  check_shape(p, "anchor_scores_gpu");
  check_ptrs(p, true, "anchor_scores_gpu");
  anchor_scores_pass1(p, stream);
  anchor_scores_pass2(p, stream);
}

void anchor_scores_gpu(AnchorScoreGpuArgs p, AnchorScoreWorkspace& ws, cudaStream_t stream) {
  ws.bind(p);
  anchor_scores_gpu(p, stream);
}

}  // namespace antkv::cuda
