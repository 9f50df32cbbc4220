// Elementwise and row-wise kernels: embedding gather, RMSNorm, RoPE (plain and the fused QKV epilogue),
// SwiGLU, residual add, NLL and argmax over logits rows, conversions and fills.
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/common/cuda_check.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {

using dev::block_sum;

const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::kF32: return "f32";
    case ElemType::kF16: return "f16";
    case ElemType::kBF16: return "bf16";
  }
  return "?";
}

namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks < 1 ? 1 : blocks) : 65535 * 16);
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }

// ---- embedding ----
__global__ void embedding_kernel(const EmbeddingParams p) {
  const int t = blockIdx.x;
  const int tok = p.tokens[t];
  float* out = p.out + static_cast<int64_t>(t) * p.hidden;
  if (tok < 0 || tok >= p.vocab) {
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) out[i] = NAN;
    return;
  }
  const bf16* row = p.table + static_cast<int64_t>(tok) * p.hidden;
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) out[i] = __bfloat162float(row[i]);
}

// ---- RMSNorm: one block per row ----
template <typename OutT>
__global__ void rmsnorm_kernel(const RmsNormParams p) {
  const int64_t r = blockIdx.x;
  const float* x = p.x + r * p.n;
  OutT* y = static_cast<OutT*>(p.y) + r * p.n;
  float ss = 0.f;
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(p.n) + p.eps);
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) store(y + i, p.weight[i] * (x[i] * inv));
}

// cos/sin of position * inv_freq[i] for i < half, in shared memory: the angle in fp32 (as transformers
// and rope_apply), its cos/sin in double, rounded to fp32.
__device__ __forceinline__ void rope_table(float* cs, float* sn, int pos, const float* inv_freq, int half) {
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(static_cast<float>(pos), inv_freq[i]);
    double s, c;
    sincos(static_cast<double>(angle), &s, &c);
    cs[i] = static_cast<float>(c);
    sn[i] = static_cast<float>(s);
  }
  __syncthreads();
}

// ---- RoPE in place: one block per token ----
__global__ void rope_kernel(const RopeParams p) {
  extern __shared__ float tab[];
  const int half = p.head_dim / 2;
  float* cs = tab;
  float* sn = tab + half;
  const int t = blockIdx.x;
  rope_table(cs, sn, p.positions[t], p.inv_freq, half);
  float* x = p.x + static_cast<int64_t>(t) * p.n_heads * p.head_dim;
  for (int idx = threadIdx.x; idx < p.n_heads * half; idx += blockDim.x) {
    const int h = idx / half, i = idx % half;
    float* xh = x + h * p.head_dim;
    const float a = xh[i], b = xh[i + half];
    xh[i] = a * cs[i] - b * sn[i];
    xh[i + half] = b * cs[i] + a * sn[i];
  }
}

// ---- fused QKV epilogue: one block per (token, group of kQkvHeadsPerBlock heads of q | k | v) ----
constexpr int kQkvHeadsPerBlock = 4;
__global__ void qkv_rope_store_kernel(const QkvRopeStoreParams p) {
  extern __shared__ float tab[];
  const int d = p.head_dim, half = d / 2;
  float* cs = tab;
  float* sn = tab + half;
  const int t = blockIdx.x;
  const int n_rot = p.n_heads + p.n_kv_heads;  // q heads then k heads are rotated; v heads follow
  const int n_all = n_rot + p.n_kv_heads;
  const int h0 = blockIdx.y * kQkvHeadsPerBlock;
  const int h1 = min(h0 + kQkvHeadsPerBlock, n_all);
  const int pos = p.positions[t];
  const int seq = p.seq_index ? p.seq_index[t] : 0;
  if (h0 < n_rot) rope_table(cs, sn, pos, p.inv_freq, half);  // block-uniform condition
  const int qdim = p.n_heads * d, kvdim = p.n_kv_heads * d;
  float* row = p.qkv + static_cast<int64_t>(t) * (qdim + 2 * kvdim);
  // rotated heads h0 .. min(h1, n_rot) - 1: pairs (i, i + half)
  const int n_pairs = max(0, min(h1, n_rot) - h0) * half;
  for (int idx = threadIdx.x; idx < n_pairs; idx += blockDim.x) {
    const int h = h0 + idx / half, i = idx % half;
    const int col = h * d + i;  // q heads first, then k heads (contiguous in the row)
    float a = row[col], b = row[col + half];
    if (p.bias) {
      a += p.bias[col];
      b += p.bias[col + half];
    }
    const float ra = a * cs[i] - b * sn[i];
    const float rb = b * cs[i] + a * sn[i];
    if (h < p.n_heads) {
      bf16* qo = p.q_out + (static_cast<int64_t>(t) * p.n_heads + h) * d;
      qo[i] = __float2bfloat16_rn(ra);
      qo[i + half] = __float2bfloat16_rn(rb);
    } else {
      const int kh = h - p.n_heads;
      if (p.k_cache) {
        bf16* kc = p.k_cache + ((static_cast<int64_t>(seq) * p.n_kv_heads + kh) * p.capacity + pos) * d;
        kc[i] = __float2bfloat16_rn(ra);
        kc[i + half] = __float2bfloat16_rn(rb);
      }
      if (p.k_pre_rope) {
        float* kp = p.k_pre_rope + (static_cast<int64_t>(t) * p.n_kv_heads + kh) * d;
        kp[i] = a;
        kp[i + half] = b;
      }
    }
    if (p.write_back) {
      row[col] = ra;
      row[col + half] = rb;
    }
  }
  // v heads max(h0, n_rot) .. h1 - 1: bias and store
  const int v0 = max(h0, n_rot);
  const int n_v = max(0, h1 - v0) * d;
  for (int idx = threadIdx.x; idx < n_v; idx += blockDim.x) {
    const int h = v0 - n_rot + idx / d, c = idx % d;
    const int col = qdim + kvdim + h * d + c;
    float v = row[col];
    if (p.bias) v += p.bias[col];
    if (p.v_cache)
      p.v_cache[((static_cast<int64_t>(seq) * p.n_kv_heads + h) * p.capacity + pos) * d + c] = __float2bfloat16_rn(v);
    if (p.write_back) row[col] = v;
  }
}

// ---- SwiGLU ----
template <typename OutT>
__global__ void swiglu_kernel(const SwigluParams p) {
  const int64_t total = p.n_rows * p.n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / p.n;
    const int c = static_cast<int>(idx % p.n);
    const float g = p.gate[r * p.ld_in + c];
    const float u = p.up[r * p.ld_in + c];
    store(static_cast<OutT*>(p.out) + idx, g / (1.0f + expf(-g)) * u);
  }
}

// ---- residual add ----
template <typename YT>
__global__ void residual_add_kernel(const ResidualAddParams p) {
  const YT* y = static_cast<const YT*>(p.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p.x[i] += load(y + i);
}

// ---- NLL: one block per row; online max / sum of exp per thread, merged over the block ----
__global__ void nll_kernel(const NllParams p) {
  __shared__ float sm[32], ss[32];
  const int64_t r = blockIdx.x;
  const int target = p.targets[r];
  if (target < 0) {
    if (threadIdx.x == 0) p.nll[r] = 0.f;
    return;
  }
  const float* row = p.logits + r * p.ld;
  float m = -INFINITY, s = 0.f;
  for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
    const float x = row[i];
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  // merge (m, s) within the warp, then across warps
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const float mm = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mm));
    m = mm;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = -INFINITY;
    for (int w = 0; w < nw; ++w) M = fmaxf(M, sm[w]);
    float S = 0.f;
    for (int w = 0; w < nw; ++w)
      if (sm[w] != -INFINITY) S += ss[w] * expf(sm[w] - M);
    const float lt = (target < p.vocab) ? row[target] : NAN;
    p.nll[r] = M + logf(S) - lt;
  }
}

// ---- argmax: one block per row ----
__global__ void argmax_kernel(const ArgmaxParams p) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int64_t r = blockIdx.x;
  const float* row = p.logits + r * p.ld;
  float best = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
    const float x = row[i];
    if (x > best) {  // ascending i per thread: ties keep the first
      best = x;
      bi = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, best, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, bi, o);
    if (v2 > best || (v2 == best && i2 < bi)) {
      best = v2;
      bi = i2;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    best = sv[0];
    bi = si[0];
    for (int w = 1; w < nw; ++w)
      if (sv[w] > best || (sv[w] == best && si[w] < bi)) {
        best = sv[w];
        bi = si[w];
      }
    p.out[r] = bi == 0x7fffffff ? 0 : bi;
  }
}

// ---- conversions and fills ----
template <typename S, typename D>
__global__ void convert_kernel(const S* src, D* dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(dst + i, load(src + i));
}

__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
}

template <typename D>
__global__ void fill_random_kernel(D* dst, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(dst + i, (2.f * hash_uniform(seed, static_cast<uint64_t>(i)) - 1.f) * scale);
}

template <typename D>
__global__ void fill_kernel(D* dst, int64_t n, float value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(dst + i, value);
}

}  // namespace

void embedding(EmbeddingParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.table && p.tokens && p.out, "embedding: null pointer");
  ANTKV_CHECK(p.n_tokens >= 0 && p.hidden > 0 && p.vocab > 0, "embedding: bad sizes");
  if (p.n_tokens == 0) return;
  embedding_kernel<<<p.n_tokens, kThreads, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("embedding_kernel");
}

void rmsnorm(RmsNormParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.x && p.weight && p.y, "rmsnorm: null pointer");
  ANTKV_CHECK(p.n > 0 && p.n_rows >= 0 && p.n_rows < (1ll << 31), "rmsnorm: bad sizes");
  if (p.n_rows == 0) return;
  const int threads = p.n >= 4096 ? 1024 : (p.n >= 1024 ? 512 : 128);
  switch (p.y_type) {
    case ElemType::kF32:
      rmsnorm_kernel<float><<<static_cast<unsigned>(p.n_rows), threads, 0, stream>>>(p);
      ANTKV_LAUNCH_CHECK("rmsnorm_kernel<f32>");
      break;
    case ElemType::kBF16:
      ANTKV_CHECK(p.y != static_cast<const void*>(p.x), "rmsnorm: a bf16 output cannot alias the input");
      rmsnorm_kernel<bf16><<<static_cast<unsigned>(p.n_rows), threads, 0, stream>>>(p);
      ANTKV_LAUNCH_CHECK("rmsnorm_kernel<bf16>");
      break;
    default:
      fail("rmsnorm: unsupported output type {} (f32 or bf16)", elem_type_name(p.y_type));
  }
}

void rope(RopeParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.x && p.positions && p.inv_freq, "rope: null pointer");
  ANTKV_CHECK(p.head_dim > 0 && p.head_dim % 2 == 0 && p.n_heads > 0 && p.n_tokens >= 0,
              "rope: bad sizes (head_dim {} must be even)", p.head_dim);
  if (p.n_tokens == 0) return;
  rope_kernel<<<p.n_tokens, kThreads, p.head_dim * sizeof(float), stream>>>(p);
  ANTKV_LAUNCH_CHECK("rope_kernel");
}

void qkv_rope_store(QkvRopeStoreParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.qkv && p.positions && p.inv_freq && p.q_out, "qkv_rope_store: null pointer");
  ANTKV_CHECK((p.k_cache != nullptr) == (p.v_cache != nullptr) && (p.k_cache || p.write_back),
              "qkv_rope_store: K and V go to a cache (both pointers set) or back into qkv (write_back)");
  ANTKV_CHECK(p.head_dim > 0 && p.head_dim % 2 == 0 && p.n_heads > 0 && p.n_kv_heads > 0 &&
                  (p.capacity > 0 || !p.k_cache),
              "qkv_rope_store: bad sizes");
  if (p.n_tokens == 0) return;
  const int n_all = p.n_heads + 2 * p.n_kv_heads;
  const dim3 grid(p.n_tokens, (n_all + kQkvHeadsPerBlock - 1) / kQkvHeadsPerBlock);
  ANTKV_CHECK(grid.y <= 65535, "qkv_rope_store: too many heads ({})", n_all);
  qkv_rope_store_kernel<<<grid, 128, p.head_dim * sizeof(float), stream>>>(p);
  ANTKV_LAUNCH_CHECK("qkv_rope_store_kernel");
}

void swiglu(SwigluParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.gate && p.up && p.out, "swiglu: null pointer");
  ANTKV_CHECK(p.n > 0 && p.n_rows >= 0 && p.ld_in >= p.n, "swiglu: bad sizes");
  if (p.n_rows == 0) return;
  const int grid = grid_for(p.n_rows * p.n);
  switch (p.out_type) {
    case ElemType::kF32:
      swiglu_kernel<float><<<grid, kThreads, 0, stream>>>(p);
      ANTKV_LAUNCH_CHECK("swiglu_kernel<f32>");
      break;
    case ElemType::kBF16:
      swiglu_kernel<bf16><<<grid, kThreads, 0, stream>>>(p);
      ANTKV_LAUNCH_CHECK("swiglu_kernel<bf16>");
      break;
    default:
      fail("swiglu: unsupported output type {} (f32 or bf16)", elem_type_name(p.out_type));
  }
}

void residual_add(ResidualAddParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.x && p.y, "residual_add: null pointer");
  if (p.n <= 0) return;
  const int grid = grid_for(p.n);
  switch (p.y_type) {
    case ElemType::kF32:
      residual_add_kernel<float><<<grid, kThreads, 0, stream>>>(p);
      ANTKV_LAUNCH_CHECK("residual_add_kernel<f32>");
      break;
    case ElemType::kBF16:
      residual_add_kernel<bf16><<<grid, kThreads, 0, stream>>>(p);
      ANTKV_LAUNCH_CHECK("residual_add_kernel<bf16>");
      break;
    default:
      fail("residual_add: unsupported input type {} (f32 or bf16)", elem_type_name(p.y_type));
  }
}

void nll_rows(NllParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.logits && p.targets && p.nll, "nll_rows: null pointer");
  ANTKV_CHECK(p.vocab > 0 && p.ld >= p.vocab && p.n_rows >= 0 && p.n_rows < (1ll << 31), "nll_rows: bad sizes");
  if (p.n_rows == 0) return;
  nll_kernel<<<static_cast<unsigned>(p.n_rows), 512, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("nll_kernel");
}

void argmax_rows(ArgmaxParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.logits && p.out, "argmax_rows: null pointer");
  ANTKV_CHECK(p.vocab > 0 && p.ld >= p.vocab && p.n_rows >= 0 && p.n_rows < (1ll << 31), "argmax_rows: bad sizes");
  if (p.n_rows == 0) return;
  argmax_kernel<<<static_cast<unsigned>(p.n_rows), 1024, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("argmax_kernel");
}

void convert_to_bf16(const void* src, ElemType src_type, bf16* dst, int64_t n, cudaStream_t stream) {
  ANTKV_CHECK(src && dst, "convert_to_bf16: null pointer");
  if (n <= 0) return;
  const int grid = grid_for(n);
  switch (src_type) {
    case ElemType::kF32:
      convert_kernel<float, bf16><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(src), dst, n);
      break;
    case ElemType::kF16:
      convert_kernel<__half, bf16><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(src), dst, n);
      break;
    case ElemType::kBF16:
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(bf16), cudaMemcpyDeviceToDevice, stream));
      return;
    default:
      fail("convert_to_bf16: unsupported source type {}", elem_type_name(src_type));
  }
  ANTKV_LAUNCH_CHECK("convert_kernel<*, bf16>");
}

void convert_to_f32(const void* src, ElemType src_type, float* dst, int64_t n, cudaStream_t stream) {
  ANTKV_CHECK(src && dst, "convert_to_f32: null pointer");
  if (n <= 0) return;
  const int grid = grid_for(n);
  switch (src_type) {
    case ElemType::kF32:
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      return;
    case ElemType::kF16:
      convert_kernel<__half, float><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(src), dst, n);
      break;
    case ElemType::kBF16:
      convert_kernel<bf16, float><<<grid, kThreads, 0, stream>>>(static_cast<const bf16*>(src), dst, n);
      break;
    default:
      fail("convert_to_f32: unsupported source type {}", elem_type_name(src_type));
  }
  ANTKV_LAUNCH_CHECK("convert_kernel<*, f32>");
}

void fill_random_bf16(bf16* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  ANTKV_CHECK(dst, "fill_random_bf16: null pointer");
  if (n <= 0) return;
  fill_random_kernel<bf16><<<grid_for(n), kThreads, 0, stream>>>(dst, n, seed, scale);
  ANTKV_LAUNCH_CHECK("fill_random_kernel<bf16>");
}

void fill_random_f32(float* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  ANTKV_CHECK(dst, "fill_random_f32: null pointer");
  if (n <= 0) return;
  fill_random_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(dst, n, seed, scale);
  ANTKV_LAUNCH_CHECK("fill_random_kernel<f32>");
}

void fill_bf16(bf16* dst, int64_t n, float value, cudaStream_t stream) {
  ANTKV_CHECK(dst, "fill_bf16: null pointer");
  if (n <= 0) return;
  fill_kernel<bf16><<<grid_for(n), kThreads, 0, stream>>>(dst, n, value);
  ANTKV_LAUNCH_CHECK("fill_kernel<bf16>");
}

void fill_f32(float* dst, int64_t n, float value, cudaStream_t stream) {
  ANTKV_CHECK(dst, "fill_f32: null pointer");
  if (n <= 0) return;
  fill_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(dst, n, value);
  ANTKV_LAUNCH_CHECK("fill_kernel<f32>");
}

int device_sm_count() {
  static const int n = [] {
    int dev = 0, count = 0;
    ANTKV_CUDA_CHECK(cudaGetDevice(&dev));
    ANTKV_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  }();
  return n;
}

}  // namespace antkv::cuda
