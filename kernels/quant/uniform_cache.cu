#include "kernels/quant/uniform_cache.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/error.h"
#include "kernels/attention/quant_decode.h"
#include "kernels/common/random_fill.h"
#include "kernels/common/cuda_check.h"
#include "quant/method_support.h"
#include "kernels/common/device_utils.cuh"

namespace antkv {
namespace cuda {

namespace {

constexpr int kTile = 128;  // the most tokens of a key block (group <= 128)

using dev::warp_max;
using dev::warp_min;

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
  const UniformCounts cn = uniform_counts(len, grp, p.window);
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
  const UniformCounts cn = uniform_counts(p.n_tokens, grp, p.window);
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

}  // namespace

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
  p.kernel = decode_kernel_;
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
