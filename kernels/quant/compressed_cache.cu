// The compressed KV cache (see compressed_cache.h): buffers, the prefill writer, the decode-step append and
// attention, synthetic fills.
#include "kernels/quant/compressed_cache.h"

#include <cuda_fp16.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/error.h"
#include "kernels/attention/commute_decode.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/fp8_round.cuh"
#include "kernels/common/random_fill.h"
#include "quant/codebook_fit.h"
#include "quant/method_support.h"
#include "quant/vq.h"
#include "anchor/anchor_scores.h"
#include "runtime/rope.h"

namespace antkv {

using cuda::bf16;
using cuda::DeviceBuffer;

struct GpuCompressedKvCache::Layer {
  // the layer's configurations of keys and values (per-layer widths, lkbits/lvbits: each layer its own; kbits !=
  // vbits: two), their record bytes R and centroids 2^b, and whether the keys' lookup tables are fp16
  cuda::VqKernelConfig k_config = cuda::VqKernelConfig::kC8B8, v_config = cuda::VqKernelConfig::kC8B8;
  int k_rec = 0, v_rec = 0, k_count = 0, v_count = 0;
  bool lut_half = false;
  // the layer's anchor ratio (lratio: each layer its own) and anchor slots per (sequence, KV head); decode-time
  // anchors run in the layers that keep anchors (acap > 0)
  double ratio = 0;
  int acap = 0;
  bool promote = false;
  DeviceBuffer<uint8_t> k_codes, v_codes;    // [max_batch, KV, capacity, R] (each tensor its own R)
  DeviceBuffer<__half> k_cent, v_cent;       // [KV, NG, 2^b, c] (each tensor its own NG, b, c)
  DeviceBuffer<__half> anchor_k, anchor_v;   // [max_batch, KV, anchor_capacity, d]
  DeviceBuffer<int32_t> anchor_pos;          // [max_batch, KV, anchor_capacity]
  DeviceBuffer<__half> window_k, window_v;   // [max_batch, KV, window, d]
  DeviceBuffer<int32_t> code_pos;            // pre_rope: [max_batch, KV, capacity] position of each code slot
  DeviceBuffer<__half> window_kpre;          // pre_rope: [max_batch, KV, window, d] pre-RoPE window keys
  // decode-time anchors (promote): running anchor scores, the anchors' pre-RoPE keys (pre_rope: a displaced
  // anchor is quantized from them) and the score's weights of S_K and S_V per KV head
  DeviceBuffer<float> anchor_score;          // [max_batch, KV, anchor_capacity]
  DeviceBuffer<float> window_score;          // [max_batch, KV, window]
  // what a displaced anchor's key / value is coded from when its anchor slot does not hold it: anchor_kpre the
  // pre-RoPE key (pre_rope) or the exact key (anchors=v: its anchor_k slot holds the dequantized key),
  // anchor_vsrc the exact value (anchors=k); [max_batch, KV, anchor_capacity, d]
  DeviceBuffer<__half> anchor_kpre;
  DeviceBuffer<__half> anchor_vsrc;
  DeviceBuffer<float> score_coef;            // [KV, 2]: (e_K, e_V) for error_bound, (0, 1) / (1, 0) otherwise
  DeviceBuffer<__half> k_scale, v_scale;     // gain: [max_batch, KV, capacity] the scale of each code slot
  // rotate=pca: R^T [KV, d, d] ([k][j] = R[j][k]: the encode, and for post-RoPE keys the query rotation), the mean
  // [KV, d], and R [KV, d, d] for values (the decode's rotation back) and pre-RoPE keys (each key mapped back)
  DeviceBuffer<float> k_rot_t, v_rot_t, v_rot, k_rot, k_mean, v_mean;
  // metric=task: the factors L [KV, NG, c, c] and the searched centroids L^T c [KV, NG, 2^b, c]
  DeviceBuffer<float> k_metric, v_metric, k_search, v_search;
};

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)); }

// fp32 rows [T][KV*d] (row stride `stride`) -> fp16 [T][KV*d]
__global__ void round_rows_kernel(const float* __restrict__ x, int64_t stride, __half* __restrict__ out, int T,
                                  int kvd) {
  const int64_t n = static_cast<int64_t>(T) * kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / kvd, c = i % kvd;
    out[i] = __float2half_rn(x[t * stride + c]);
  }
}

// anchors of sequence seq: anchor_k[seq][h][a][:] = stage_k[idx[h][a]][h][:] (and v, positions)
struct AnchorGatherArgs {
  const __half* sk = nullptr;   // [T, KV, d]
  const __half* sv = nullptr;
  const __half* skpre = nullptr;  // [T, KV, d] pre-RoPE keys, or null
  const float* score = nullptr;   // [T, KV] the prefill's anchor scores, or null
  const int32_t* idx = nullptr; // [KV, A] token indices
  __half* ak = nullptr;         // [max_batch, KV, cap, d]
  __half* av = nullptr;
  __half* akpre = nullptr;      // [max_batch, KV, cap, d] (with skpre)
  __half* avsrc = nullptr;      // [max_batch, KV, cap, d] a copy of the values (anchors=k with promote), or null
  float* ascore = nullptr;      // [max_batch, KV, cap] (with score)
  int32_t* pos = nullptr;       // [max_batch, KV, cap]
  int seq = 0, A = 0, KV = 0, d = 0, cap = 0;
};

__global__ void anchor_gather_kernel(const AnchorGatherArgs p) {
  const int64_t n = static_cast<int64_t>(p.KV) * p.A * p.d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % p.d);
    const int a = static_cast<int>((i / p.d) % p.A);
    const int h = static_cast<int>(i / (static_cast<int64_t>(p.d) * p.A));
    const int t = p.idx[h * p.A + a];
    const int64_t src = (static_cast<int64_t>(t) * p.KV + h) * p.d + c;
    const int64_t slot = (static_cast<int64_t>(p.seq) * p.KV + h) * p.cap + a;
    p.ak[slot * p.d + c] = p.sk[src];
    p.av[slot * p.d + c] = p.sv[src];
    if (p.skpre) p.akpre[slot * p.d + c] = p.skpre[src];
    if (p.avsrc) p.avsrc[slot * p.d + c] = p.sv[src];
    if (c == 0) p.pos[slot] = t;
    if (c == 0 && p.score) p.ascore[slot] = p.score[static_cast<int64_t>(t) * p.KV + h];
  }
}

// One decode step of one layer, block (b, h), threads over channels: the token leaving a full ring (slot
// evict_slot[b] >= 0) is copied to the staging rows (quantized next by quantize_kv), then the new token
// (fp16-rounded) takes ring slot new_slot[b]. Without a window (W = 0) the new token goes straight to staging.
struct WindowAppendArgs {
  const float* k = nullptr;         // [B, KV*d] fp32 post-RoPE, row stride `stride`
  const float* v = nullptr;
  int64_t stride = 0;
  const float* k_pre = nullptr;     // pre_rope: [B, KV*d] fp32 pre-RoPE keys (dense)
  __half* wkpre = nullptr;          // pre_rope: [max_batch, KV, W, d]
  int32_t* code_pos = nullptr;      // pre_rope: [max_batch, KV, cap]
  const int32_t* code_slot = nullptr;   // [B]
  const int32_t* evict_pos = nullptr;   // [B] position of the token that is quantized this step
  int cap = 0;
  const int32_t* evict_slot = nullptr;  // [B]
  const int32_t* new_slot = nullptr;    // [B]
  __half* wk = nullptr;             // [max_batch, KV, W, d]
  __half* wv = nullptr;
  __half* sk = nullptr;             // [B, KV, d]
  __half* sv = nullptr;
  int KV = 0, d = 0, W = 0;
  // promotion (design note §2's online rule; null: every leaving token is quantized). The host has decided
  // whether the anchor budget grew (then code_slot is -1 and n_anchor already counts the new anchor).
  float* ascore = nullptr;          // [max_batch, KV, acap] running scores of the anchors
  float* wscore = nullptr;          // [max_batch, KV, W] running scores of the window tokens
  __half* ak = nullptr;             // [max_batch, KV, acap, d] anchors (post-RoPE keys, values)
  __half* av = nullptr;
  __half* akpre = nullptr;          // pre_rope or anchors=v: [max_batch, KV, acap, d] the keys anchors are coded from
  __half* avsrc = nullptr;          // anchors=k: [max_batch, KV, acap, d] the values anchors are coded from
  int32_t* promo_slot = nullptr;    // anchors=k|v: [B, KV] the anchor slot the leaving token took, -1: none
  int32_t* apos = nullptr;          // [max_batch, KV, acap]
  const int32_t* n_anchor = nullptr;  // [B] after this step
  int acap = 0;
};

// Where the token leaving the window goes, decided by the whole block (b, h): -1 = quantized; else the anchor
// slot it takes; *displaced = 1 when that slot's anchor (the weakest, token 0 never) is quantized instead.
__device__ int promotion_slot(const WindowAppendArgs& p, int b, int h, float x_score, bool grow, int* displaced) {
  __shared__ float s_score[128];
  __shared__ int s_pos[128], s_slot[128];
  const int64_t base = (static_cast<int64_t>(b) * p.KV + h) * p.acap;
  const int na = p.n_anchor[b];
  *displaced = 0;
  if (grow) return na - 1;
  float best = INFINITY;
  int best_pos = INT_MAX, best_slot = -1;
  for (int a = threadIdx.x; a < na; a += blockDim.x) {
    const int pos = p.apos[base + a];
    const float sc = p.ascore[base + a];
    if (pos != 0 && (sc < best || (sc == best && pos < best_pos))) best = sc, best_pos = pos, best_slot = a;
  }
  s_score[threadIdx.x] = best, s_pos[threadIdx.x] = best_pos, s_slot[threadIdx.x] = best_slot;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      const int o = threadIdx.x + w;
      if (s_score[o] < s_score[threadIdx.x] || (s_score[o] == s_score[threadIdx.x] && s_pos[o] < s_pos[threadIdx.x]))
        s_score[threadIdx.x] = s_score[o], s_pos[threadIdx.x] = s_pos[o], s_slot[threadIdx.x] = s_slot[o];
    }
    __syncthreads();
  }
  const int slot = s_slot[0];
  const bool swap = slot >= 0 && x_score > s_score[0];
  __syncthreads();  // s_* are read by every thread before any later call could reuse them
  if (!swap) return -1;
  *displaced = 1;
  return slot;
}

__global__ void __launch_bounds__(128) window_append_kernel(const WindowAppendArgs p) {
  const int b = blockIdx.x, h = blockIdx.y;
  const int64_t src = static_cast<int64_t>(b) * p.stride + static_cast<int64_t>(h) * p.d;
  const int64_t stage = (static_cast<int64_t>(b) * p.KV + h) * p.d;
  const bool pre = p.k_pre != nullptr;
  const int64_t src_pre = (static_cast<int64_t>(b) * p.KV + h) * p.d;
  const int64_t ring = (static_cast<int64_t>(b) * p.KV + h) * p.W;
  const int e = p.W > 0 ? p.evict_slot[b] : -1;
  const bool leaving = p.W == 0 || e >= 0;
  int target = -1, displaced = 0;
  if (p.ascore && leaving) {
    const float x_score = p.W > 0 ? p.wscore[ring + e] : 0.0f;  // W = 0: the new token, before its own row
    target = promotion_slot(p, b, h, x_score, p.code_slot[b] < 0, &displaced);
    const int64_t aslot = (static_cast<int64_t>(b) * p.KV + h) * p.acap + (target >= 0 ? target : 0);
    if (target >= 0) {
      if (threadIdx.x == 0) {
        if (displaced && pre) p.code_pos[(static_cast<int64_t>(b) * p.KV + h) * p.cap + p.code_slot[b]] = p.apos[aslot];
        p.apos[aslot] = p.evict_pos[b];
        p.ascore[aslot] = x_score;
      }
      for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
        if (displaced) {  // the weakest anchor goes to the code stream (pre-RoPE keys when pre)
          p.sk[stage + c] = p.akpre ? p.akpre[aslot * p.d + c] : p.ak[aslot * p.d + c];
          p.sv[stage + c] = p.avsrc ? p.avsrc[aslot * p.d + c] : p.av[aslot * p.d + c];
        }
        __half xk, xv, xkp;
        if (p.W > 0) {
          xk = p.wk[(ring + e) * p.d + c], xv = p.wv[(ring + e) * p.d + c];
          xkp = pre ? p.wkpre[(ring + e) * p.d + c] : xk;
        } else {
          xk = __float2half_rn(p.k[src + c]), xv = __float2half_rn(p.v[src + c]);
          xkp = pre ? __float2half_rn(p.k_pre[src_pre + c]) : xk;
        }
        p.ak[aslot * p.d + c] = xk;
        p.av[aslot * p.d + c] = xv;
        if (p.akpre) p.akpre[aslot * p.d + c] = xkp;  // pre-RoPE, or (anchors=v) the exact key
        if (p.avsrc) p.avsrc[aslot * p.d + c] = xv;
      }
    }
  }
  if (p.promo_slot && threadIdx.x == 0) p.promo_slot[static_cast<int64_t>(b) * p.KV + h] = target;
  if (pre && threadIdx.x == 0 && p.code_slot[b] >= 0 && !displaced)
    p.code_pos[(static_cast<int64_t>(b) * p.KV + h) * p.cap + p.code_slot[b]] = p.evict_pos[b];
  if (p.wscore && p.W > 0 && threadIdx.x == 0) p.wscore[ring + p.new_slot[b]] = 0.0f;  // after the read above
  const bool staged = target >= 0;  // the stage holds the displaced anchor, or nothing (the budget grew)
  for (int c = threadIdx.x; c < p.d; c += blockDim.x) {
    const __half nk = __float2half_rn(p.k[src + c]), nv = __float2half_rn(p.v[src + c]);
    const __half nkp = pre ? __float2half_rn(p.k_pre[src_pre + c]) : nk;
    if (p.W == 0) {
      if (!staged) {
        p.sk[stage + c] = pre ? nkp : nk;  // the code stream holds pre-RoPE keys when pre
        p.sv[stage + c] = nv;
      }
      continue;
    }
    if (e >= 0 && !staged) {  // read before the write below (same thread, same address when e == new_slot)
      p.sk[stage + c] = pre ? p.wkpre[(ring + e) * p.d + c] : p.wk[(ring + e) * p.d + c];
      p.sv[stage + c] = p.wv[(ring + e) * p.d + c];
    }
    const int s = p.new_slot[b];
    p.wk[(ring + s) * p.d + c] = nk;
    p.wv[(ring + s) * p.d + c] = nv;
    if (pre) p.wkpre[(ring + s) * p.d + c] = nkp;
  }
}

// The running anchor scores after one decode step's attention (design note §2): block (b, h, chunk) covers 64
// tracked tokens j (the anchors, then the window ring's valid slots). For each of the G query heads g of KV
// head h: A = exp(s_gj - lse_g), with s the scaled score quant_decode wrote for the token (fp16_logits), S_V +=
// A, S_K += A |q_g| |v_j - o_g| / sqrt(d); the score grows by e_K S_K + e_V S_V (coef). As
// QuantizedKvCache::add_attention_row, from the attention actually run. Only the values are read again (the
// keys' part came with the attention's own pass: half the bytes of a pass that re-reads K too). The chunks
// spread the ~1% anchors over many blocks: one block per (b, h) was latency-bound (8x the attention).
constexpr int kScoreTokensPerBlock = 64;
struct RunningScoreArgs {
  const bf16* q = nullptr;        // [B, H, d] post-RoPE queries of this step
  const bf16* o = nullptr;        // [B, H, d] this step's attention output
  const float* lse = nullptr;     // [B, H] natural log-sum-exp of the scaled scores
  const float* logits = nullptr;  // [B, H, acap + W] scaled scores of the tracked tokens (quant_decode's fp16_logits)
  const __half* av = nullptr;     // [max_batch, KV, acap, d]
  const __half* wv = nullptr;     // [max_batch, KV, W, d]
  float* ascore = nullptr;        // [max_batch, KV, acap]
  float* wscore = nullptr;        // [max_batch, KV, W]
  const int32_t* n_anchor = nullptr;  // [B]
  const int32_t* n_window = nullptr;  // [B]
  const float* coef = nullptr;    // [KV, 2]
  int KV = 0, H = 0, d = 0, acap = 0, W = 0;
  float scale = 0.f;              // the anchor score's 1/sqrt(d)
};

// head_dim D in {64, 128} (closed set: quant_decode's): D / 16 lanes per token, each holding 16 channels of V:
// channels 8l..8l+7 and D/2+8l..D/2+8l+7 of lane l (two 16-byte loads, each a whole 128-byte row segment per
// token across the lanes), every token of the warp's share loaded before the sums. At most 64 registers (4
// blocks per multiprocessor): with 118 (K and V in registers) the kernel ran at 25% occupancy, issue-latency
// bound (ncu). GT = G (query heads per KV head) when it is 1, 2, 4 or 8 (the head loop unrolled: independent
// shuffle chains in flight), 0 for any other G (a loop).
template <int D, int GT>
__global__ void __launch_bounds__(256, 4) running_score_kernel(const RunningScoreArgs p) {
  constexpr int CPL = 16, LPT = D / CPL, TPW = 32 / LPT, ITERS = kScoreTokensPerBlock / (8 * TPW);
  static_assert(ITERS >= 1 && kScoreTokensPerBlock % (8 * TPW) == 0, "tokens per block");
  // o in shared memory: a lane's 16 channels padded to 20 floats, so that the 8 lanes of a quarter warp read
  // 8 distinct bank quads with each float4 (unpadded: 4-way conflicts, L1 at 79% in ncu)
  constexpr int OS = LPT * (CPL + 4);
  extern __shared__ float smem[];  // o [G][OS] | |q| [G] | lse [G] | |o|^2 [G] | logits [G][64]
  const int b = blockIdx.x, h = blockIdx.y, G = GT ? GT : p.H / p.KV;
  const int na = p.n_anchor[b], nw = p.n_window[b], n = na + nw;
  const int j0 = blockIdx.z * kScoreTokensPerBlock;
  if (j0 >= n) return;
  // the values first: their loads are in flight while o, |q|, lse and the scores are staged
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t abase = (static_cast<int64_t>(b) * p.KV + h) * p.acap, wbase = (static_cast<int64_t>(b) * p.KV + h) * p.W;
  const int sub = lane / LPT, c0 = (lane % LPT) * 8;
  uint4 vr[ITERS][2];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {  // token j0 + (it * 8 + warp) * TPW + sub
    const int j = j0 + (it * 8 + warp) * TPW + sub;
    vr[it][0] = vr[it][1] = make_uint4(0, 0, 0, 0);
    if (j < n) {
      const bool anchor = j < na;
      const int64_t row = anchor ? abase + j : wbase + (j - na);
      const __half* src = (anchor ? p.av : p.wv) + row * D + c0;
      vr[it][0] = __ldg(reinterpret_cast<const uint4*>(src));
      vr[it][1] = __ldg(reinterpret_cast<const uint4*>(src + D / 2));
    }
  }
  float* so = smem;
  float* sqn = so + G * OS;
  float* slse = sqn + G;
  float* son = slse + G;
  float* slog = son + G;
  const int64_t head0 = static_cast<int64_t>(b) * p.H + static_cast<int64_t>(h) * G;
  const int64_t n_logit = static_cast<int64_t>(p.acap) + p.W;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, c = i % D;  // channel c is lane (c mod D/2) / 8's, in its first or second 8
    so[g * OS + ((c % (D / 2)) / 8) * (CPL + 4) + (c / (D / 2)) * 8 + c % 8] = __bfloat162float(p.o[head0 * D + i]);
  }
  for (int i = threadIdx.x; i < G * kScoreTokensPerBlock; i += blockDim.x) {
    const int g = i / kScoreTokensPerBlock, j = j0 + i % kScoreTokensPerBlock;
    slog[i] = j < n ? p.logits[(head0 + g) * n_logit + j] : 0.f;
  }
  for (int g = warp; g < G; g += 8) {  // |q_g|, |o_g|^2
    float s = 0, t = 0;
    for (int c = lane; c < D; c += 32) {
      const float x = __bfloat162float(p.q[(head0 + g) * D + c]), y = __bfloat162float(p.o[(head0 + g) * D + c]);
      s += x * x;
      t += y * y;
    }
    for (int off = 16; off > 0; off /= 2) {
      s += __shfl_xor_sync(0xffffffffu, s, off);
      t += __shfl_xor_sync(0xffffffffu, t, off);
    }
    if (lane == 0) sqn[g] = sqrtf(s), son[g] = t, slse[g] = p.lse[head0 + g];
  }
  const float ck = p.coef[2 * h], cv = p.coef[2 * h + 1];
  __syncthreads();  // o, |q|, lse, logits staged (the loads above are in flight meanwhile)
  // |v - o|^2 = |v|^2 - 2 v.o + |o|^2: V converted and |v|^2 summed once per token, then one dot per head (the
  // difference form took a subtraction and a conversion per channel and head: issue-bound at 75% SM in ncu)
  float vf[ITERS][CPL], vsq[ITERS], add[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const __half2* vh = reinterpret_cast<const __half2*>(vr[it]);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < CPL / 2; ++i) {
      const float2 f = __half22float2(vh[i]);
      vf[it][2 * i] = f.x, vf[it][2 * i + 1] = f.y;
      s = fmaf(f.x, f.x, fmaf(f.y, f.y, s));
    }
#pragma unroll
    for (int off = LPT / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);  // the token's lanes
    vsq[it] = s;
    add[it] = 0.f;
  }
#pragma unroll
  for (int g = 0; g < (GT ? GT : G); ++g) {
    float dot[ITERS];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) dot[it] = 0.f;
#pragma unroll
    for (int i = 0; i < CPL; i += 4) {  // 4 channels of o_g at a time
      const float4 o4 = *reinterpret_cast<const float4*>(so + g * OS + (lane % LPT) * (CPL + 4) + i);
#pragma unroll
      for (int it = 0; it < ITERS; ++it)
        dot[it] = fmaf(vf[it][i], o4.x, fmaf(vf[it][i + 1], o4.y, fmaf(vf[it][i + 2], o4.z, fmaf(vf[it][i + 3], o4.w, dot[it]))));
    }
    const float qn = sqn[g], lse = slse[g], on = son[g];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      float dd = dot[it];
#pragma unroll
      for (int off = LPT / 2; off > 0; off /= 2) dd += __shfl_xor_sync(0xffffffffu, dd, off);
      const float dist = fmaxf(0.f, vsq[it] - 2.f * dd + on);
      const float a = __expf(slog[g * kScoreTokensPerBlock + (it * 8 + warp) * TPW + sub] - lse);
      add[it] += ck * a * qn * sqrtf(dist) * p.scale + cv * a;
    }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int j = j0 + (it * 8 + warp) * TPW + sub;
    if (j < n && lane % LPT == 0) {
      if (j < na) p.ascore[abase + j] += add[it];
      else p.wscore[wbase + (j - na)] += add[it];
    }
  }
}

// pre_rope prefill: code_pos[seq][h][slot] = t for every non-anchor token t of head h (slots [T, KV], -1 = anchor)
__global__ void prefill_code_pos_kernel(const int32_t* __restrict__ slots, int T, int KV, int seq, int cap,
                                        int32_t* __restrict__ code_pos) {
  const int64_t n = static_cast<int64_t>(T) * KV;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i / KV), h = static_cast<int>(i % KV), s = slots[i];
    if (s >= 0) code_pos[(static_cast<int64_t>(seq) * KV + h) * cap + s] = t;
  }
}

// The CPU reference's coding transform of one (token, KV head) row before the nearest-centroid search
// (quant/quantized_cache.cpp quantize_head): x' = R (x - mean) (rotate=pca; R^T read column by column, fp64
// sums as rotate_forward), x' / |x'| with the fp16-rounded norm kept (gain, as gain_normalize), L_g^T x' per group
// (metric=task, as metric_forward). Block (token, head), one thread per channel (head_dim 64 or 128).
struct EncodeArgs {
  const __half* x = nullptr;      // [n, KV, d] fp16 rows
  float* out = nullptr;           // [n, KV, d]
  float* norms = nullptr;         // [n, KV] (gain)
  const float* rot_t = nullptr;   // [KV, d, d] R^T, or null
  const float* mean = nullptr;    // [KV, d] (with rot_t)
  const float* metric = nullptr;  // [KV, d / c, c, c] lower-triangular factors, or null
  int KV = 0, d = 0, c = 0;
  bool gain = false;
  bool fp8_norm = false;          // norm=fp8: the norm kept is E4M3-rounded (quant/vq.cpp gain_normalize), not fp16
};

// Channel j of head h's row x (the whole block of d threads calls it; sx: d floats, sred: 4 doubles of shared
// memory) -> its coded value; *norm: the fp16-rounded norm (gain) or 1.
__device__ float encode_channel(const EncodeArgs& p, int h, int j, float x, float* sx, double* sred, float* norm) {
  const int lane = j & 31, warp = j >> 5;
  *norm = 1.f;
  if (p.rot_t) {
    sx[j] = __fsub_rn(x, p.mean[static_cast<int64_t>(h) * p.d + j]);
    __syncthreads();
    const float* col = p.rot_t + static_cast<int64_t>(h) * p.d * p.d + j;
    double acc = 0.0;
    for (int k = 0; k < p.d; ++k) acc = fma(static_cast<double>(col[static_cast<int64_t>(k) * p.d]), static_cast<double>(sx[k]), acc);
    x = __double2float_rn(acc);
  }
  if (p.gain) {
    double sq = static_cast<double>(x) * x;
    for (int o = 16; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (lane == 0) sred[warp] = sq;
    __syncthreads();
    sq = 0.0;
    for (int w = 0; w < p.d / 32; ++w) sq += sred[w];
    const double nd = sqrt(sq);
    const float nf = __double2float_rn(nd);  // rounded as the CPU reference rounds it (via float)
    *norm = p.fp8_norm ? cuda::round_fp8_e4m3(nf) : __half2float(__float2half_rn(nf));  // stored in fp8 or fp16
    x = __double2float_rn(static_cast<double>(x) * (nd > 0 ? 1.0 / nd : 0.0));
  }
  if (p.metric) {
    __syncthreads();  // every read of sx above is done
    sx[j] = x;
    __syncthreads();
    const int g = j / p.c, jj = j % p.c;
    const float* L = p.metric + (static_cast<int64_t>(h) * (p.d / p.c) + g) * p.c * p.c;
    double y = 0.0;
    for (int k = jj; k < p.c; ++k) y = fma(static_cast<double>(L[k * p.c + jj]), static_cast<double>(sx[g * p.c + k]), y);
    x = __double2float_rn(y);
  }
  return x;
}

__global__ void __launch_bounds__(128) encode_rows_kernel(const EncodeArgs p) {
  __shared__ float sx[128];
  __shared__ double sred[4];
  const int i = blockIdx.x, h = blockIdx.y, j = threadIdx.x;
  const int64_t off = (static_cast<int64_t>(i) * p.KV + h) * p.d;
  float norm;
  p.out[off + j] = encode_channel(p, h, j, __half2float(p.x[off + j]), sx, sred, &norm);
  if (p.gain && j == 0) p.norms[static_cast<int64_t>(i) * p.KV + h] = norm;
}

// anchors=k|v: the anchors of the tensor that keeps none FP16 (the other one's anchors) are quantized too; the
// compressed cache keeps them, dequantized, in their FP16 anchor slots (so decode reads them as any anchor):
// block (anchor a of sequence seq, KV head h), one thread per channel: the row coded as encode_rows_kernel and
// quantize_kv code it (nearest centroid per group, summed channel by channel without FMA, ties to the lowest
// index; metric=task: the nearest searched centroid L^T c), then decoded as the CPU reference decodes it:
// u = the codes' fp16 centroids, u * fp16(norm / |u|) (gain), mean + R^T u (rotate=pca), rounded to fp16.
struct AnchorRequantArgs {
  EncodeArgs enc;                     // the tensor's transform (x, out, norms unused)
  __half* slots = nullptr;            // [max_batch, KV, cap, d]: the tensor's anchor slots, rewritten in place
  const __half* centroids = nullptr;  // [KV, NG, K, c] fp16 (decoded)
  const float* search = nullptr;      // [KV, NG, K, c] L^T c (metric=task) or null (the fp16 centroids)
  int seq = 0, cap = 0, K = 0;
  // decode steps (decode-time anchors): block (b, h) requantizes sequence b's slot slot_of[b][h] (-1: none), which
  // window_append_kernel has just filled with the promoted token's exact row; null: block (a, h) of sequence seq
  const int32_t* slot_of = nullptr;  // [B, KV]
};

__global__ void __launch_bounds__(128) anchor_requantize_kernel(const AnchorRequantArgs p) {
  __shared__ float sx[128];
  __shared__ double sred[4];
  __shared__ float sy[128];
  __shared__ int32_t sCode[64];
  __shared__ float sq[4];
  const int h = blockIdx.y, j = threadIdx.x, lane = j & 31, warp = j >> 5, nwarps = blockDim.x / 32;
  const int seq = p.slot_of ? static_cast<int>(blockIdx.x) : p.seq;
  const int a = p.slot_of ? p.slot_of[static_cast<int64_t>(seq) * p.enc.KV + h] : static_cast<int>(blockIdx.x);
  if (a < 0) return;  // block-uniform: this head kept no new anchor this step
  const int d = p.enc.d, C = p.enc.c, NG = d / C;
  __half* row = p.slots + ((static_cast<int64_t>(seq) * p.enc.KV + h) * p.cap + a) * d;
  float norm;
  sy[j] = encode_channel(p.enc, h, j, __half2float(row[j]), sx, sred, &norm);
  __syncthreads();
  for (int g = warp; g < NG; g += nwarps) {
    float best = INFINITY;
    int arg = 0;
    for (int code = lane; code < p.K; code += 32) {
      const int64_t base = ((static_cast<int64_t>(h) * NG + g) * p.K + code) * C;
      float dd = 0.f;
      for (int t = 0; t < C; ++t) {
        const float cen = p.search ? p.search[base + t] : __half2float(p.centroids[base + t]);
        const float diff = __fsub_rn(sy[g * C + t], cen);
        dd = __fadd_rn(dd, __fmul_rn(diff, diff));  // quantize_kv's (and vq_encode's) rounding
      }
      if (dd < best) best = dd, arg = code;
    }
    for (int off = 16; off > 0; off >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, off);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, off);
      if (ob < best || (ob == best && oa < arg)) best = ob, arg = oa;
    }
    if (lane == 0) sCode[g] = arg;
  }
  __syncthreads();
  const int g = j / C;
  float u = __half2float(p.centroids[((static_cast<int64_t>(h) * NG + g) * p.K + sCode[g]) * C + j % C]);
  if (p.enc.gain) {  // quantize_kv's fp16 scale norm / |u|
    float s2 = u * u;
    for (int off = 16; off > 0; off >>= 1) s2 += __shfl_xor_sync(0xffffffffu, s2, off);
    if (lane == 0) sq[warp] = s2;
    __syncthreads();
    float usq = 0.f;
    for (int w = 0; w < nwarps; ++w) usq += sq[w];
    u *= __half2float(__float2half_rn(usq > 0.f ? norm / sqrtf(usq) : 0.f));
  }
  if (p.enc.rot_t) {  // mean + R^T u: channel j = mean_j + sum_i R[i][j] u_i = sum_i R^T[j][i] u_i
    __syncthreads();  // sy is read above by every warp's search
    sy[j] = u;
    __syncthreads();
    const float* rt = p.enc.rot_t + (static_cast<int64_t>(h) * d + j) * d;
    double y = p.enc.mean[static_cast<int64_t>(h) * d + j];
    for (int i = 0; i < d; ++i) y = fma(static_cast<double>(rt[i]), static_cast<double>(sy[i]), y);
    u = __double2float_rn(y);
  }
  row[j] = __float2half_rn(u);
}

// The coded transform's query side, block (head, sequence), one thread per channel: q_rot = R_k q (rotate=pca)
// and q_mean = q . k_mean, from the bf16 query the decode reads.
struct QueryRotateArgs {
  const bf16* q = nullptr;      // [B, H, d]
  const float* rot_t = nullptr; // [KV, d, d] R_k^T
  const float* mean = nullptr;  // [KV, d]
  float* q_rot = nullptr;       // [B, H, d]
  float* q_mean = nullptr;      // [B, H]
  int H = 0, KV = 0, d = 0;
};

// D: head_dim (64 or 128, quant_decode's closed set), the column loop unrolled so that 16 loads are in flight
// (one at a time it was latency-bound, ~20 us per layer)
template <int D>
__global__ void __launch_bounds__(D) query_rotate_kernel(const QueryRotateArgs p) {
  __shared__ float sq[D];
  __shared__ float sred[D / 32];
  const int h = blockIdx.x, b = blockIdx.y, j = threadIdx.x, lane = j & 31, warp = j >> 5;
  const int kvh = h / (p.H / p.KV);
  const int64_t row = (static_cast<int64_t>(b) * p.H + h) * D;
  const float x = __bfloat162float(p.q[row + j]);
  sq[j] = x;
  __syncthreads();
  const float* col = p.rot_t + static_cast<int64_t>(kvh) * D * D + j;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 16
  for (int k = 0; k < D; ++k) acc[k & 3] = fmaf(__ldg(col + static_cast<int64_t>(k) * D), sq[k], acc[k & 3]);
  p.q_rot[row + j] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float dm = x * p.mean[static_cast<int64_t>(kvh) * D + j];
  for (int o = 16; o > 0; o /= 2) dm += __shfl_xor_sync(0xffffffffu, dm, o);
  if (lane == 0) sred[warp] = dm;
  __syncthreads();
  if (j == 0) {
    float t = 0.f;
    for (int w = 0; w < D / 32; ++w) t += sred[w];
    p.q_mean[static_cast<int64_t>(b) * p.H + h] = t;
  }
}

// synthetic gain scales: uniform in [0.5, 1.5) (a hash of (seed, i)), fp16
__global__ void synthetic_scale_kernel(__half* __restrict__ dst, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 0x9e3779b9u ^ seed ^ static_cast<uint32_t>(i >> 32) * 0x85ebca6bu;
    x ^= x >> 16, x *= 0x7feb352du, x ^= x >> 15, x *= 0x846ca68bu, x ^= x >> 16;
    dst[i] = __float2half_rn(0.5f + static_cast<float>(x >> 8) * (1.0f / 16777216.0f));
  }
}

// synthetic contents: code_pos[.][.][slot] = slot
__global__ void iota_code_pos_kernel(int32_t* __restrict__ code_pos, int64_t n, int cap) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    code_pos[i] = static_cast<int32_t>(i % cap);
}

// The kernel configuration of width q of a method that method_support accepted for the real path.
cuda::VqKernelConfig kernel_config_of(const MethodSpec& m, VqConfig q) {
  const std::string name = fmt::format("c{}b{}", q.c, q.b);
  for (cuda::VqKernelConfig c : cuda::kVqKernelConfigs)
    if (name == cuda::vq_kernel_config_info(c).name) return c;
  fail("compressed KV cache: internal error: method {} passed method_support with {}, which quant_decode does not "
       "build (method_support.cpp's compressed_width and kVqKernelConfigs differ)",
       m.text, name);
}

// Layer l's configurations of keys and values (the method's, or its per-layer widths').
GpuCompressedKvCache::LayerWidths widths_for(const MethodSpec& m, int l) {
  ANTKV_CHECK(m.needs_codebooks(), "compressed KV cache: method {} is not vq or antkv", m.text);
  return {kernel_config_of(m, m.key_config(l)), kernel_config_of(m, m.value_config(l))};
}

}  // namespace

GpuCompressedKvCache::GpuCompressedKvCache(const ModelConfig& cfg, const MethodSpec& m, const CodebookSet& cb,
                                           int max_batch, int capacity, int window) {
  name_ = m.text;
  const ModelShapeFacts shape = ModelShapeFacts::of(cfg);
  require_support(m, MethodPath::kGpuReal, &shape);  // what the compressed cache runs: quant/method_support.h
  ANTKV_CHECK(m.listed_layers() == 0 || m.listed_layers() == cfg.num_layers,
              "method {}: lkbits/lvbits/lratio list {} layers, the model has {}", m.text, m.listed_layers(), cfg.num_layers);
  layer_cfg_.clear();
  for (int l = 0; l < cfg.num_layers; ++l) layer_cfg_.push_back(widths_for(m, l));
  config_ = layer_cfg_.at(0).keys;
  // anchors=k|v (post-RoPE keys: method_support): the other tensor's anchors are quantized (at the prefill, and at
  // promotion with decode-time anchors) and kept dequantized in their FP16 slots
  for (const LayerWidths& w : layer_cfg_) cuda::check_vq_shape(cfg.head_dim, w.keys), cuda::check_vq_shape(cfg.head_dim, w.values);
  check_codebooks_fit(m, cb, cfg);
  fp8_norm_ = m.norm == Norm::kFp8;
  gain_k_ = m.gain_keys();
  gain_v_ = m.gain_values();
  rotate_ = m.rotate == Rotate::kPca;
  task_ = m.metric == Metric::kTask;
  anchor_quant_side_ = m.anchors == AnchorTensors::kKeys ? 1 : m.anchors == AnchorTensors::kValues ? 0 : -1;
  std::vector<double> ratios;  // each layer's (lratio), 0 without anchors
  for (int l = 0; l < cfg.num_layers; ++l) ratios.push_back(m.has_anchors() ? m.ratio_of(l) : 0.0);
  allocate(cfg, max_batch, capacity, window, ratios, m.pre_rope(), m.promotes());
  for (int l = 0; l < n_layers_; ++l) upload_transforms(l, cb, m);
  if (m.commute()) set_commute(cfg, fmt::format("method {}", m.text));
  if (promote_) {  // the running score's weights: the method's score over the codebooks' error norms
    const AnchorScoreKind kind = m.score;
    for (int l = 0; l < n_layers_; ++l) {
      if (!layers_[l]->promote) continue;  // a layer without anchors (lratio 0)
      const auto& ek = cb.keys.at(l).error_norm;
      const auto& ev = cb.values.at(l).error_norm;
      ANTKV_CHECK((ek.empty() || static_cast<int>(ek.size()) == n_kv_) && (ev.empty() || static_cast<int>(ev.size()) == n_kv_),
                  "method {}: layer {} error norms do not have one entry per KV head", m.text, l);
      const std::vector<float> coef = anchor_score_weight_table(kind, ek, ev, n_kv_);
      ANTKV_CUDA_CHECK(cudaMemcpy(layers_[l]->score_coef.get(), coef.data(), coef.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
  }
  std::vector<__half> h;
  for (int l = 0; l < n_layers_; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      const size_t want = static_cast<size_t>(n_kv_) * (kv ? layers_[l]->v_count : layers_[l]->k_count) * d_;
      h.resize(want);
      const auto& src = kv ? cb.values.at(l).centroids : cb.keys.at(l).centroids;
      ANTKV_CHECK(src.size() == want, "method {}: layer {} {} centroids hold {} floats, expected {}", m.text, l,
                  kv ? "value" : "key", src.size(), want);
      for (size_t i = 0; i < want; ++i) h[i] = __float2half_rn(src[i]);
      auto& dst = kv ? layers_[l]->v_cent : layers_[l]->k_cent;
      ANTKV_CUDA_CHECK(cudaMemcpy(dst.get(), h.data(), want * sizeof(__half), cudaMemcpyHostToDevice));
    }
}

GpuCompressedKvCache::GpuCompressedKvCache(const ModelConfig& cfg, const std::vector<LayerWidths>& widths,
                                           double anchor_ratio, int max_batch, int capacity, int window, uint64_t seed,
                                           bool pre_rope, bool promote, bool gain_keys, bool gain_values, bool rotate,
                                           bool commute) {
  ANTKV_CHECK(static_cast<int>(widths.size()) == cfg.num_layers, "synthetic compressed cache: {} layer widths for {} layers",
              widths.size(), cfg.num_layers);
  layer_cfg_ = widths;
  config_ = widths.at(0).keys;
  bool one_config = true;  // every layer's keys and values of layer 0's keys' configuration
  for (const LayerWidths& w : widths) one_config = one_config && w.keys == config_ && w.values == config_;
  name_ = fmt::format("synthetic {}{}{}{}{}", one_config ? cuda::vq_kernel_config_info(config_).name : "per-layer widths",
                      commute ? " commute" : pre_rope ? " pre-RoPE" : "", promote && anchor_ratio > 0 ? " promote" : "",
                      gain_keys ? (gain_values ? " gain=kv" : " gain=k") : "", rotate ? " rotate=pca" : "");
  for (const LayerWidths& w : widths) cuda::check_vq_shape(cfg.head_dim, w.keys), cuda::check_vq_shape(cfg.head_dim, w.values);
  ANTKV_CHECK(!commute || one_config, "compressed cache {}: commute keys with several configurations", name_);
  ANTKV_CHECK(!(rotate && commute), "compressed cache {}: rotate with commute keys (the basis mixes the RoPE pairs)", name_);
  gain_k_ = gain_keys;
  gain_v_ = gain_values;
  rotate_ = rotate;
  allocate(cfg, max_batch, capacity, window, std::vector<double>(static_cast<size_t>(cfg.num_layers), anchor_ratio),
           pre_rope || commute, promote);
  if (commute) set_commute(cfg, name_);
  for (int l = 0; l < n_layers_; ++l) {
    Layer& L = *layers_[l];
    const float basis = 1.0f / std::sqrt(static_cast<float>(d_));
    // (the synthetic R_k of pre-RoPE keys is not R_k^T's transpose: decode time does not depend on the values)
    for (auto* b : {&L.k_rot_t, &L.v_rot_t, &L.v_rot, &L.k_rot, &L.k_mean, &L.v_mean}) {  // fp16-valued fp32, as the codebooks'
      if (!b->size()) continue;
      DeviceBuffer<__half> tmp(b->size());
      cuda::fill_random_f16(tmp.get(), static_cast<int64_t>(tmp.size()), seed * 977 + l, basis, nullptr);
      std::vector<__half> hh(tmp.size());
      ANTKV_CUDA_CHECK(cudaMemcpy(hh.data(), tmp.get(), hh.size() * sizeof(__half), cudaMemcpyDeviceToHost));
      std::vector<float> f(hh.size());
      for (size_t i = 0; i < f.size(); ++i) f[i] = __half2float(hh[i]);
      ANTKV_CUDA_CHECK(cudaMemcpy(b->get(), f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    if (L.promote) {
      const std::vector<float> coef(static_cast<size_t>(2) * n_kv_, 1.0f);
      ANTKV_CUDA_CHECK(cudaMemcpy(layers_[l]->score_coef.get(), coef.data(), coef.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    cuda::fill_random_f16(layers_[l]->k_cent.get(), layers_[l]->k_cent.size(), seed * 131 + 2 * l, 1.0f, nullptr);
    cuda::fill_random_f16(layers_[l]->v_cent.get(), layers_[l]->v_cent.size(), seed * 131 + 2 * l + 1, 1.0f, nullptr);
  }
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
}

GpuCompressedKvCache::~GpuCompressedKvCache() = default;

void GpuCompressedKvCache::set_commute(const ModelConfig& cfg, const std::string& who) {
  ANTKV_CHECK(cuda::commute_decode_supports(config_),
              "{}: key_rope=commute does not run {} on the compressed cache (its key codebook, head_dim x 2^b fp16 per KV "
              "head, does not fit in shared memory: use another width or eval.kv_cache: simulated)",
              who, cuda::vq_kernel_config_info(config_).name);
  const int G = cfg.num_heads / cfg.num_kv_heads;
  ANTKV_CHECK(G == 1 || G == 2 || G == 4 || G == 8,
              "{}: key_rope=commute on the compressed cache needs 1, 2, 4 or 8 query heads per KV head, the model has {}",
              who, G);
  commute_ = true;
  const std::vector<int> order = rope_pair_order(d_, cuda::vq_kernel_config_info(config_).c);
  pair_order_.resize(order.size());
  ANTKV_CUDA_CHECK(cudaMemcpy(pair_order_.get(), order.data(), order.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  pair_rows_.resize(static_cast<size_t>(max_batch_) * n_kv_ * d_);  // decode steps (B <= max_batch)
  // the decode workspace for commute_decode's plans
  int64_t ws = static_cast<int64_t>(workspace_.size());
  for (int b = 1; b <= max_batch_; ++b)
    ws = std::max(ws, cuda::quant_decode_workspace_floats(
                          b, n_heads_, d_, cuda::commute_decode_max_splits(b, n_heads_, n_kv_, d_, config_)));
  if (ws > static_cast<int64_t>(workspace_.size())) {
    device_bytes_ -= workspace_.bytes();
    workspace_.resize(static_cast<size_t>(ws));
    device_bytes_ += workspace_.bytes();
  }
  device_bytes_ += pair_order_.bytes() + pair_rows_.bytes();
}

const float* GpuCompressedKvCache::pair_ordered(const float* k_pre, int64_t& stride, int rows,
                                                cuda::DeviceBuffer<float>& buf, cudaStream_t stream) {
  if (!commute_ || !k_pre) return k_pre;
  buf.ensure(static_cast<size_t>(rows) * n_kv_ * d_);
  cuda::permute_pair_order(k_pre, stride, buf.get(), static_cast<int64_t>(n_kv_) * d_, rows, n_kv_, d_,
                           pair_order_.get(), true, stream);
  stride = static_cast<int64_t>(n_kv_) * d_;
  return buf.get();
}

void GpuCompressedKvCache::allocate(const ModelConfig& cfg, int max_batch, int capacity, int window,
                                    const std::vector<double>& ratios, bool pre_rope, bool promote) {
  ANTKV_CHECK(static_cast<int>(ratios.size()) == cfg.num_layers, "compressed KV cache: {} anchor ratios for {} layers",
              ratios.size(), cfg.num_layers);
  for (const double ratio : ratios)
    ANTKV_CHECK(max_batch >= 1 && capacity >= 1 && window >= 0 && ratio >= 0 && ratio <= 1,
                "compressed KV cache: bad sizes (batch {}, capacity {}, window {}, anchor ratio {})", max_batch, capacity,
                window, ratio);
  n_layers_ = cfg.num_layers;
  n_kv_ = cfg.num_kv_heads;
  n_heads_ = cfg.num_heads;
  d_ = cfg.head_dim;
  ANTKV_CHECK(static_cast<int>(layer_cfg_.size()) == n_layers_, "compressed cache {}: {} layer configurations for {} layers",
              name_, layer_cfg_.size(), n_layers_);
  auto lut_half_of = [](cuda::VqKernelConfig c) {
    return c == cuda::VqKernelConfig::kC8B8 || c == cuda::VqKernelConfig::kC16B12;
  };
  // config(), lut_half() and plan(): layer 0's keys' (a plan's splits are valid for any layer; the workspace below
  // holds the most splits of any layer's configuration)
  lut_half_ = lut_half_of(config_);
  pre_ = pre_rope;
  if (pre_) {
    const auto inv = rope_inv_freq(cfg);
    inv_freq_.resize(inv.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(inv_freq_.get(), inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  max_batch_ = max_batch;
  capacity_ = capacity;
  window_ = window;
  // a prefill of up to `capacity` tokens keeps ceil(ratio * T) anchors (the first token among them), per layer
  auto cap_of = [&](double ratio) {
    return ratio > 0 ? static_cast<int>(std::min<double>(capacity, std::ceil(ratio * capacity) + 1)) : 0;
  };
  anchor_cap_ = 0;
  for (const double ratio : ratios) anchor_cap_ = std::max(anchor_cap_, cap_of(ratio));
  promote_ = promote && anchor_cap_ > 0;
  const size_t BK = static_cast<size_t>(max_batch) * n_kv_;
  layers_.clear();
  device_bytes_ = 0;
  for (int l = 0; l < n_layers_; ++l) {
    auto L = std::make_unique<Layer>();
    L->k_config = layer_cfg_[l].keys, L->v_config = layer_cfg_[l].values;
    L->k_count = cuda::vq_centroid_count(L->k_config), L->v_count = cuda::vq_centroid_count(L->v_config);
    L->k_rec = cuda::vq_record_bytes(d_, L->k_config), L->v_rec = cuda::vq_record_bytes(d_, L->v_config);
    L->lut_half = lut_half_of(L->k_config);
    L->ratio = ratios[l];
    L->acap = cap_of(L->ratio);
    L->promote = promote_ && L->acap > 0;
    const int acap = L->acap;
    const size_t k_cent = static_cast<size_t>(n_kv_) * L->k_count * d_;  // [KV, NG, K, c]
    const size_t v_cent = static_cast<size_t>(n_kv_) * L->v_count * d_;
    L->k_codes.resize(BK * capacity * L->k_rec);
    L->v_codes.resize(BK * capacity * L->v_rec);
    L->k_cent.resize(k_cent);
    L->v_cent.resize(v_cent);
    L->anchor_k.resize(BK * acap * d_);
    L->anchor_v.resize(BK * acap * d_);
    L->anchor_pos.resize(BK * acap);
    L->window_k.resize(BK * window * d_);
    L->window_v.resize(BK * window * d_);
    if (pre_) {
      L->code_pos.resize(BK * capacity);
      L->window_kpre.resize(BK * window * d_);
    }
    if (gain_k_) L->k_scale.resize(BK * capacity);
    if (gain_v_) L->v_scale.resize(BK * capacity);
    if (rotate_) {
      const size_t dd = static_cast<size_t>(n_kv_) * d_ * d_;
      L->k_rot_t.resize(dd), L->v_rot_t.resize(dd), L->v_rot.resize(dd);
      if (pre_) L->k_rot.resize(dd);
      L->k_mean.resize(static_cast<size_t>(n_kv_) * d_), L->v_mean.resize(static_cast<size_t>(n_kv_) * d_);
    }
    if (task_) {
      L->k_metric.resize(static_cast<size_t>(n_kv_) * d_ * cuda::vq_kernel_config_info(L->k_config).c);
      L->v_metric.resize(static_cast<size_t>(n_kv_) * d_ * cuda::vq_kernel_config_info(L->v_config).c);
      L->k_search.resize(k_cent), L->v_search.resize(v_cent);
    }
    if (L->promote) {
      L->anchor_score.resize(BK * acap);
      L->window_score.resize(BK * window);
      L->score_coef.resize(static_cast<size_t>(2) * n_kv_);
      // the anchors' rows a displaced anchor is coded from: pre-RoPE keys, or the exact copy of the tensor
      // anchors=k|v codes (its anchor slot holds the dequantized row)
      if (pre_ || anchor_quant_side_ == 0) L->anchor_kpre.resize(BK * acap * d_);
      if (anchor_quant_side_ == 1) L->anchor_vsrc.resize(BK * acap * d_);
    }
    device_bytes_ += L->k_codes.bytes() + L->v_codes.bytes() + L->k_cent.bytes() + L->v_cent.bytes() +
                     L->anchor_k.bytes() + L->anchor_v.bytes() + L->anchor_pos.bytes() + L->window_k.bytes() +
                     L->window_v.bytes() + L->code_pos.bytes() + L->window_kpre.bytes() + L->anchor_score.bytes() +
                     L->window_score.bytes() + L->anchor_kpre.bytes() + L->anchor_vsrc.bytes() + L->score_coef.bytes() + L->k_scale.bytes() +
                     L->v_scale.bytes() + L->k_rot_t.bytes() + L->v_rot_t.bytes() + L->v_rot.bytes() + L->k_rot.bytes() + L->k_mean.bytes() +
                     L->v_mean.bytes() + L->k_metric.bytes() + L->v_metric.bytes() + L->k_search.bytes() +
                     L->v_search.bytes();
    layers_.push_back(std::move(L));
  }
  seqs_.assign(static_cast<size_t>(n_layers_), std::vector<CompressedSeqState>(max_batch));
  pending_anchors_.assign(static_cast<size_t>(n_layers_), -1);
  step_d_.resize(static_cast<size_t>(8) * n_layers_ * max_batch);
  step_h_.ensure(static_cast<size_t>(8) * n_layers_ * max_batch);
  stage_k_.resize(static_cast<size_t>(max_batch) * n_kv_ * d_);
  stage_v_.resize(static_cast<size_t>(max_batch) * n_kv_ * d_);
  // the largest workspace any decode plan of up to max_batch sequences may need
  const bool coded = coded_transform();
  int64_t ws = 0;
  for (int b = 1; b <= max_batch; ++b)
    for (const LayerWidths& w : layer_cfg_)  // (plans are made from the keys' configuration)
      ws = std::max(ws, cuda::quant_decode_workspace_floats(
                            b, cfg.num_heads, d_,
                            cuda::quant_decode_max_splits(b, cfg.num_heads, n_kv_, d_, w.keys, capacity,
                                                          lut_half_of(w.keys), 1, coded),
                            coded));
  workspace_.resize(static_cast<size_t>(ws));
  if (rotate_) {
    q_rot_.resize(static_cast<size_t>(max_batch) * n_heads_ * d_);
    q_mean_.resize(static_cast<size_t>(max_batch) * n_heads_);
  }
  if (coded || task_) {
    step_enc_.resize(static_cast<size_t>(max_batch) * n_kv_ * d_);
    step_norm_.resize(static_cast<size_t>(max_batch) * n_kv_);
  }
  if (promote_) {
    lse_.resize(static_cast<size_t>(max_batch) * n_heads_);
    logits_.resize(static_cast<size_t>(max_batch) * n_heads_ * (anchor_cap_ + window_));
    if (anchor_quant_side_ >= 0) promo_slot_.resize(BK);
  }
  device_bytes_ += step_d_.bytes() + stage_k_.bytes() + stage_v_.bytes() + workspace_.bytes() + lse_.bytes() + promo_slot_.bytes() +
                   logits_.bytes() + q_rot_.bytes() + q_mean_.bytes() + step_enc_.bytes() + step_norm_.bytes();
}

void GpuCompressedKvCache::upload_transforms(int l, const CodebookSet& cb, const MethodSpec& m) {
  Layer& L = *layers_[l];
  auto upload = [&](DeviceBuffer<float>& dst, const std::vector<float>& src, const char* what) {
    ANTKV_CHECK(src.size() == dst.size(), "method {}: layer {} {} hold {} floats, expected {}", m.text, l, what, src.size(),
                dst.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice));
  };
  const int KV = n_kv_, d = d_;
  if (rotate_) {
    for (int side = 0; side < 2; ++side) {
      const LayerCodebooks& c = side ? cb.values.at(l) : cb.keys.at(l);
      ANTKV_CHECK(c.rotation.size() == static_cast<size_t>(KV) * d * d, "method {}: layer {} {} rotation holds {} floats, "
                  "expected {}", m.text, l, side ? "value" : "key", c.rotation.size(), static_cast<size_t>(KV) * d * d);
      std::vector<float> t(c.rotation.size());
      for (int h = 0; h < KV; ++h)
        for (int i = 0; i < d; ++i)
          for (int k = 0; k < d; ++k)
            t[(static_cast<size_t>(h) * d + k) * d + i] = c.rotation[(static_cast<size_t>(h) * d + i) * d + k];
      upload(side ? L.v_rot_t : L.k_rot_t, t, side ? "value rotation" : "key rotation");
      upload(side ? L.v_mean : L.k_mean, c.mean, side ? "value mean" : "key mean");
      if (side) upload(L.v_rot, c.rotation, "value rotation");
      else if (pre_) upload(L.k_rot, c.rotation, "key rotation");
    }
  }
  if (task_) {
    for (int side = 0; side < 2; ++side) {
      const int cc = cuda::vq_kernel_config_info(side ? L.v_config : L.k_config).c;
      const LayerCodebooks& c = side ? cb.values.at(l) : cb.keys.at(l);
      upload(side ? L.v_metric : L.k_metric, c.metric, side ? "value metric=task factors" : "key metric=task factors");
      const std::vector<float> mapped = metric_centroids(
          VqHeadCodebooks{c.centroids.data(), KV * (d / cc), side ? L.v_count : L.k_count, cc}, c.metric.data());
      upload(side ? L.v_search : L.k_search, mapped, side ? "value searched centroids" : "key searched centroids");
    }
  }
}

size_t GpuCompressedKvCache::bytes_per_sequence() const {
  size_t recs = 0;  // key and value record bytes summed over the layers (per-layer widths)
  size_t per_layers = 0;  // anchors, window and their extras, summed over the layers (per-layer ratios)
  for (const auto& L : layers_) {
    recs += static_cast<size_t>(L->k_rec) + L->v_rec;
    const size_t acap = static_cast<size_t>(L->acap);
    per_layers += static_cast<size_t>(n_kv_) *
                  (2 * acap * d_ * 2 + acap * 4 + 2 * static_cast<size_t>(window_) * d_ * 2 +
                   (pre_ ? static_cast<size_t>(capacity_) * 4 + static_cast<size_t>(window_) * d_ * 2 : 0) +
                   (L->promote ? (acap + window_) * 4 + (pre_ ? acap * d_ * 2 : 0) +
                                     (anchor_quant_side_ >= 0 ? acap * d_ * 2 : 0)
                               : 0) +
                   (static_cast<size_t>(gain_k_) + gain_v_) * capacity_ * 2);  // gain: fp16 scale per code slot
  }
  // promote: this step's log-sum-exp and FP16 scores (one buffer for all layers)
  const size_t scratch = promote_ ? static_cast<size_t>(n_heads_) * (anchor_cap_ + window_ + 1) * 4 : 0;
  return per_layers + static_cast<size_t>(n_kv_) * capacity_ * recs + scratch;
}

size_t GpuCompressedKvCache::code_bytes_per_token() const {
  size_t recs = 0;
  for (const auto& L : layers_) recs += static_cast<size_t>(L->k_rec) + L->v_rec;
  return static_cast<size_t>(n_kv_) * (recs + static_cast<size_t>(n_layers_) * 2 * (static_cast<size_t>(gain_k_) + gain_v_));
}

int GpuCompressedKvCache::anchor_capacity(int layer) const {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_, "anchor_capacity: layer {} out of range", layer);
  return layers_[layer]->acap;
}

void GpuCompressedKvCache::reset() {
  for (auto& layer : seqs_) std::fill(layer.begin(), layer.end(), CompressedSeqState{});
}

void GpuCompressedKvCache::write_prefill(int layer, int seq, int T, const float* k, int64_t k_stride, const float* v,
                                         int64_t v_stride, const float* k_pre, int64_t k_pre_stride,
                                         const uint8_t* anchor_flags, const float* anchor_scores, cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_, "compressed cache: layer {} / sequence {} out of range",
              layer, seq);
  ANTKV_CHECK(seqs_[layer][seq].length() == 0,
              "compressed cache {}: a prefill into sequence {} that already holds {} tokens (chunked prefill over the "
              "compressed cache is not implemented: prefill in one chunk, then decode)",
              name_, seq, seqs_[layer][seq].length());
  ANTKV_CHECK(T >= 1 && T <= capacity_, "compressed cache {}: prefill of {} tokens, capacity {}", name_, T, capacity_);
  ANTKV_CHECK(k && v && (k_pre || !pre_), "compressed cache: null K/V");
  k_pre = pair_ordered(k_pre, k_pre_stride, T, prefill_pairs_, stream);  // commute: the code stream's keys in RoPE pair order
  const int KV = n_kv_;
  // host: per-head code slots (anchors -1) and anchor token lists
  int A = -1;
  std::vector<int32_t> anchors;  // [KV][A]
  std::vector<int32_t> slots(static_cast<size_t>(T) * KV);
  for (int h = 0; h < KV; ++h) {
    int q = 0, a = 0;
    for (int t = 0; t < T; ++t) {
      const bool anchor = anchor_flags && anchor_flags[static_cast<size_t>(t) * KV + h];
      slots[static_cast<size_t>(t) * KV + h] = anchor ? -1 : q++;
      if (anchor) ++a;
    }
    ANTKV_CHECK(A < 0 || a == A, "compressed cache {}: layer {} KV head {} has {} anchors, head 0 has {} (every head must "
                "keep the same number)", name_, layer, h, a, A);
    A = a;
  }
  ANTKV_CHECK(A <= layers_[layer]->acap, "compressed cache {}: layer {} keeps {} anchors per head, its anchor capacity is {}",
              name_, layer, A, layers_[layer]->acap);
  pending_anchors_[layer] = A;  // each layer its own (lratio)
  anchors.reserve(static_cast<size_t>(KV) * A);
  for (int h = 0; h < KV; ++h)
    for (int t = 0; t < T; ++t)
      if (slots[static_cast<size_t>(t) * KV + h] < 0) anchors.push_back(t);
  // device: ints = slot_per_head [T*KV] | seq_index [T] | anchor_idx [KV*A]
  prefill_h_.resize(slots.size() + T + anchors.size());
  std::copy(slots.begin(), slots.end(), prefill_h_.begin());
  std::fill(prefill_h_.begin() + slots.size(), prefill_h_.begin() + slots.size() + T, seq);
  std::copy(anchors.begin(), anchors.end(), prefill_h_.begin() + slots.size() + T);
  prefill_ints_.ensure(prefill_h_.size());
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(prefill_ints_.get(), prefill_h_.data(), prefill_h_.size() * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
  const size_t rows = static_cast<size_t>(T) * KV * d_;
  prefill_k_.ensure(rows);  // not the decode staging: captured decode graphs hold those pointers
  prefill_v_.ensure(rows);
  if (pre_) prefill_kpre_.ensure(rows);
  round_rows_kernel<<<blocks_for(static_cast<int64_t>(rows)), kThreads, 0, stream>>>(k, k_stride, prefill_k_.get(), T, KV * d_);
  ANTKV_LAUNCH_CHECK("round_rows_kernel");
  round_rows_kernel<<<blocks_for(static_cast<int64_t>(rows)), kThreads, 0, stream>>>(v, v_stride, prefill_v_.get(), T, KV * d_);
  ANTKV_LAUNCH_CHECK("round_rows_kernel");
  if (pre_) {
    round_rows_kernel<<<blocks_for(static_cast<int64_t>(rows)), kThreads, 0, stream>>>(k_pre, k_pre_stride,
                                                                                     prefill_kpre_.get(), T, KV * d_);
    ANTKV_LAUNCH_CHECK("round_rows_kernel");
  }
  Layer& L = *layers_[layer];
  if (pre_) {
    prefill_code_pos_kernel<<<blocks_for(static_cast<int64_t>(T) * KV), kThreads, 0, stream>>>(
        prefill_ints_.get(), T, KV, seq, capacity_, L.code_pos.get());
    ANTKV_LAUNCH_CHECK("prefill_code_pos_kernel");
  }
  if (coded_transform() || task_) {
    prefill_enc_.ensure(rows);
    prefill_norm_.ensure(static_cast<size_t>(T) * KV);
  }
  quantize_pair(L, T, pre_ ? prefill_kpre_.get() : prefill_k_.get(),  // the code stream holds pre-RoPE keys when pre
                prefill_v_.get(), prefill_ints_.get() + slots.size(), nullptr, prefill_ints_.get(), prefill_enc_.get(),
                prefill_norm_.get(), stream);
  if (A > 0) {
    AnchorGatherArgs g;
    if (L.promote) {  // running scores start from the prefill's (0 when the caller has none)
      ANTKV_CHECK(anchor_scores, "compressed cache {}: decode-time anchors need the prefill's anchor scores", name_);
      prefill_score_.ensure(static_cast<size_t>(T) * KV);
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(prefill_score_.get(), anchor_scores, static_cast<size_t>(T) * KV * sizeof(float),
                                       cudaMemcpyHostToDevice, stream));
      g.score = prefill_score_.get(), g.ascore = L.anchor_score.get();
      if (pre_) g.skpre = prefill_kpre_.get(), g.akpre = L.anchor_kpre.get();
      if (anchor_quant_side_ == 0) g.skpre = prefill_k_.get(), g.akpre = L.anchor_kpre.get();  // exact keys
      if (anchor_quant_side_ == 1) g.avsrc = L.anchor_vsrc.get();                               // exact values
    }
    g.sk = prefill_k_.get(), g.sv = prefill_v_.get();
    g.idx = prefill_ints_.get() + slots.size() + T;
    g.ak = L.anchor_k.get(), g.av = L.anchor_v.get(), g.pos = L.anchor_pos.get();
    g.seq = seq, g.A = A, g.KV = KV, g.d = d_, g.cap = L.acap;
    anchor_gather_kernel<<<blocks_for(static_cast<int64_t>(KV) * A * d_), kThreads, 0, stream>>>(g);
    ANTKV_LAUNCH_CHECK("anchor_gather_kernel");
    if (anchor_quant_side_ >= 0) requantize_anchors(L, A, seq, nullptr, stream);  // anchors=k|v: the other tensor's
  }
  // prefill_h_ and the device ints are reused by the next layer
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void GpuCompressedKvCache::requantize_anchors(Layer& L, int blocks, int seq, const int32_t* slot_of, cudaStream_t stream) {
  const int side = anchor_quant_side_;
  AnchorRequantArgs r;
  EncodeArgs& e = r.enc;
  if (rotate_) e.rot_t = side ? L.v_rot_t.get() : L.k_rot_t.get(), e.mean = side ? L.v_mean.get() : L.k_mean.get();
  if (task_) e.metric = side ? L.v_metric.get() : L.k_metric.get();
  e.KV = n_kv_, e.d = d_, e.c = cuda::vq_kernel_config_info(side ? L.v_config : L.k_config).c;
  e.gain = side ? gain_v_ : gain_k_;
  e.fp8_norm = fp8_norm_;
  r.slots = side ? L.anchor_v.get() : L.anchor_k.get();
  r.centroids = side ? L.v_cent.get() : L.k_cent.get();
  r.search = task_ ? (side ? L.v_search.get() : L.k_search.get()) : nullptr;
  r.seq = seq, r.cap = L.acap, r.K = side ? L.v_count : L.k_count, r.slot_of = slot_of;
  anchor_requantize_kernel<<<dim3(blocks, n_kv_), d_, 0, stream>>>(r);
  ANTKV_LAUNCH_CHECK("anchor_requantize_kernel");
}

void GpuCompressedKvCache::quantize_pair(Layer& L, int n_tokens, const __half* k, const __half* v,
                                         const int32_t* seq_index, const int32_t* slot, const int32_t* slot_per_head,
                                         float* enc_rows, float* enc_norms, cudaStream_t stream) {
  cuda::QuantizeParams qp;
  qp.n_tokens = n_tokens;
  qp.n_kv_heads = n_kv_;
  qp.head_dim = d_;
  qp.x_type = cuda::ElemType::kF16;
  qp.x_row_stride = static_cast<int64_t>(n_kv_) * d_;
  qp.seq_index = seq_index;
  qp.slot = slot;
  qp.slot_per_head = slot_per_head;
  qp.batch = max_batch_;
  qp.capacity = capacity_;
  for (int side = 0; side < 2; ++side) {
    const bool gain = side ? gain_v_ : gain_k_;
    qp.config = side ? L.v_config : L.k_config;
    qp.x = side ? v : k;
    qp.x_type = cuda::ElemType::kF16;
    qp.centroids = side ? L.v_cent.get() : L.k_cent.get();
    qp.codes = side ? L.v_codes.get() : L.k_codes.get();
    qp.search_centroids = nullptr, qp.norms = nullptr, qp.scales = nullptr;
    if (gain || rotate_ || task_) {  // the CPU reference's transform first (encode_rows_kernel), fp32 rows
      ANTKV_CHECK(enc_rows && enc_norms, "compressed cache {}: no encode buffers", name_);
      EncodeArgs e;
      e.x = side ? v : k;
      e.out = enc_rows, e.norms = enc_norms;
      if (rotate_) e.rot_t = side ? L.v_rot_t.get() : L.k_rot_t.get(), e.mean = side ? L.v_mean.get() : L.k_mean.get();
      if (task_) e.metric = side ? L.v_metric.get() : L.k_metric.get();
      e.KV = n_kv_, e.d = d_, e.c = cuda::vq_kernel_config_info(qp.config).c;
      e.gain = gain;
      e.fp8_norm = fp8_norm_;
      encode_rows_kernel<<<dim3(n_tokens, n_kv_), d_, 0, stream>>>(e);
      ANTKV_LAUNCH_CHECK("encode_rows_kernel");
      qp.x = enc_rows;
      qp.x_type = cuda::ElemType::kF32;
      if (task_) qp.search_centroids = side ? L.v_search.get() : L.k_search.get();
      if (gain) qp.norms = enc_norms, qp.scales = side ? L.v_scale.get() : L.k_scale.get();
    }
    cuda::quantize_kv(qp, stream);
  }
}

void GpuCompressedKvCache::commit_prefill(int seq, int T) {
  ANTKV_CHECK(seq >= 0 && seq < max_batch_, "compressed cache: commit_prefill of sequence {} out of range", seq);
  for (int l = 0; l < n_layers_; ++l) {
    const int A = pending_anchors_[l];
    ANTKV_CHECK(A >= 0 && A <= T, "compressed cache: commit_prefill without write_prefill of layer {}", l);
    CompressedSeqState& s = seqs_[l][seq];
    s = CompressedSeqState{};
    s.n_anchor = A;
    s.n_quant = T - A;
  }
  std::fill(pending_anchors_.begin(), pending_anchors_.end(), -1);
}

void GpuCompressedKvCache::plan_step(int B, cudaStream_t stream) {
  ANTKV_CHECK(B >= 1 && B <= max_batch_, "compressed cache: batch {} outside [1, {}]", B, max_batch_);
  int32_t* h = step_h_.get();
  for (int b = 0; b < B; ++b) {
    ANTKV_CHECK(seqs_[0][b].length() + 1 <= capacity_, "compressed cache {}: sequence {} holds {} tokens, capacity {}",
                name_, b, seqs_[0][b].length(), capacity_);
    for (int l = 0; l < n_layers_; ++l) {  // the window moves alike in every layer; anchors and codes per layer
      const Layer& L = *layers_[l];
      CompressedSeqState& s = seqs_[l][b];
      int evict = -1, code = -1, slot = 0;
      const int len = s.length();  // the new token's position
      int evict_pos = -1;
      // a token leaving the window becomes an anchor while the layer's budget ceil(ratio * length) has room
      // (promote; the kernel decides the swaps, which keep the counts), else it takes a code slot
      const bool grow =
          L.promote && s.n_anchor < std::min<int64_t>(L.acap, static_cast<int64_t>(std::ceil(L.ratio * (len + 1))));
      if (window_ == 0) {
        code = grow ? -1 : s.n_quant++;
        if (grow) ++s.n_anchor;
        evict_pos = len;
      } else {
        slot = static_cast<int>(s.n_entered % window_);
        if (s.n_window == window_) {
          evict = slot;  // the oldest window token sits where the new one goes
          code = grow ? -1 : s.n_quant++;
          if (grow) ++s.n_anchor;
          evict_pos = len - window_;
        } else {
          ++s.n_window;
        }
        ++s.n_entered;
      }
      int32_t* f = h + static_cast<size_t>(l) * 8 * max_batch_;
      f[b] = evict;
      f[max_batch_ + b] = slot;
      f[2 * max_batch_ + b] = code;
      f[3 * max_batch_ + b] = s.n_quant;
      f[4 * max_batch_ + b] = s.n_anchor;
      f[5 * max_batch_ + b] = s.n_window;
      f[6 * max_batch_ + b] = b;
      f[7 * max_batch_ + b] = evict_pos;
    }
  }
  step_B_ = B;
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(step_d_.get(), h, static_cast<size_t>(8) * n_layers_ * max_batch_ * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
}

void GpuCompressedKvCache::upload_counts(int B, cudaStream_t stream) {
  ANTKV_CHECK(B >= 1 && B <= max_batch_, "compressed cache: batch {} outside [1, {}]", B, max_batch_);
  int32_t* h = step_h_.get();
  for (int l = 0; l < n_layers_; ++l)
    for (int b = 0; b < B; ++b) {
      const CompressedSeqState& s = seqs_[l][b];
      int32_t* f = h + static_cast<size_t>(l) * 8 * max_batch_;
      f[b] = -1;
      f[max_batch_ + b] = 0;
      f[2 * max_batch_ + b] = -1;
      f[3 * max_batch_ + b] = s.n_quant;
      f[4 * max_batch_ + b] = s.n_anchor;
      f[5 * max_batch_ + b] = s.n_window;
      f[6 * max_batch_ + b] = b;
      f[7 * max_batch_ + b] = -1;
    }
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(step_d_.get(), h, static_cast<size_t>(8) * n_layers_ * max_batch_ * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

cuda::QuantDecodePlan GpuCompressedKvCache::plan(int B, int n_heads) const {
  if (commute_) return cuda::plan_commute_decode(B, n_heads, n_kv_, d_, config_, max_quant(B));
  return cuda::plan_quant_decode(B, n_heads, n_kv_, d_, config_, max_quant(B), lut_half_, 1, coded_transform());
}

int GpuCompressedKvCache::max_quant(int B) const {
  int m = 0;
  for (const auto& layer : seqs_)  // the longest code stream of any layer (per-layer ratios)
    for (int b = 0; b < B && b < max_batch_; ++b) m = std::max(m, layer[b].n_quant);
  return m;
}

void GpuCompressedKvCache::append(int layer, int B, const float* k, const float* v, int64_t stride, const float* k_pre,
                                  cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && B >= 1 && B <= max_batch_ && k && v && (k_pre || !pre_),
              "compressed cache: bad append");
  Layer& L = *layers_[layer];
  int64_t pre_stride = static_cast<int64_t>(n_kv_) * d_;  // k_pre is dense
  k_pre = pair_ordered(k_pre, pre_stride, B, pair_rows_, stream);    // commute: kept and coded in RoPE pair order
  WindowAppendArgs a;
  a.k = k, a.v = v, a.stride = stride;
  a.evict_slot = step_field(layer, 0);
  a.new_slot = step_field(layer, 1);
  a.wk = L.window_k.get(), a.wv = L.window_v.get();
  a.sk = stage_k_.get(), a.sv = stage_v_.get();
  a.KV = n_kv_, a.d = d_, a.W = window_;
  if (pre_) {
    a.k_pre = k_pre;
    a.wkpre = L.window_kpre.get();
  }
  if (pre_ || promote_) {  // code positions (pre), the code slot that says whether the budget grew (promote)
    a.code_pos = L.code_pos.get();
    a.code_slot = step_field(layer, 2);
    a.evict_pos = step_field(layer, 7);
    a.cap = capacity_;
  }
  if (L.promote) {
    a.ascore = L.anchor_score.get(), a.wscore = L.window_score.get();
    a.ak = L.anchor_k.get(), a.av = L.anchor_v.get(), a.apos = L.anchor_pos.get();
    a.akpre = L.anchor_kpre.size() ? L.anchor_kpre.get() : nullptr;
    a.avsrc = L.anchor_vsrc.size() ? L.anchor_vsrc.get() : nullptr;
    a.promo_slot = anchor_quant_side_ >= 0 ? promo_slot_.get() : nullptr;
    a.n_anchor = step_field(layer, 4);
    a.acap = L.acap;
  }
  window_append_kernel<<<dim3(B, n_kv_), 128, 0, stream>>>(a);
  ANTKV_LAUNCH_CHECK("window_append_kernel");
  // anchors=k|v: a promoted token's other tensor coded and kept dequantized in its anchor slot (as at the prefill)
  if (a.promo_slot) requantize_anchors(L, B, 0, a.promo_slot, stream);
  quantize_pair(L, B, stage_k_.get(), stage_v_.get(), step_field(layer, 6),
                step_field(layer, 2),  // code slots: -1 where nothing leaves the window this step
                nullptr, step_enc_.get(), step_norm_.get(), stream);
}

void GpuCompressedKvCache::attend(int layer, int B, int n_heads, const bf16* q, bf16* out,
                                  const cuda::QuantDecodePlan& plan, float scale, cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && B >= 1 && B <= max_batch_, "compressed cache: bad attend");
  Layer& L = *layers_[layer];
  cuda::QuantDecodeParams p;
  p.config = L.k_config;
  if (L.v_config != L.k_config) p.value_config = L.v_config;
  p.batch = B;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_;
  p.head_dim = d_;
  p.q = q;
  p.k_codes = L.k_codes.get(), p.v_codes = L.v_codes.get();
  p.k_centroids = L.k_cent.get(), p.v_centroids = L.v_cent.get();
  p.anchor_k = L.acap ? L.anchor_k.get() : nullptr;
  p.anchor_v = L.acap ? L.anchor_v.get() : nullptr;
  p.anchor_pos = L.acap ? L.anchor_pos.get() : nullptr;
  p.window_k = window_ ? L.window_k.get() : nullptr;
  p.window_v = window_ ? L.window_v.get() : nullptr;
  p.n_quant = step_field(layer, 3);
  p.n_anchor = step_field(layer, 4);
  p.n_window = step_field(layer, 5);
  p.quant_capacity = capacity_;
  p.anchor_capacity = L.acap;
  p.window_capacity = window_;
  p.out = out;
  p.workspace = workspace_.get();
  p.workspace_floats = static_cast<int64_t>(workspace_.size());
  p.n_splits = plan.n_splits;
  p.split_len = plan.split_len;
  p.scale = scale;
  p.lut_half = L.lut_half;
  if (pre_) {
    p.pre_rope = true;
    p.code_pos = L.code_pos.get();
    p.inv_freq = inv_freq_.get();
  }
  p.lse = L.promote ? lse_.get() : nullptr;
  p.fp16_logits = L.promote ? logits_.get() : nullptr;
  if (rotate_ && pre_) {  // pre-RoPE keys: each mapped back in the kernel (RoPE does not commute with R_k)
    p.k_rotation = L.k_rot.get(), p.k_mean = L.k_mean.get();
    p.v_rotation = L.v_rot.get(), p.v_mean = L.v_mean.get();
  } else if (rotate_) {  // the query once per step and head: R_k q and q . k_mean
    QueryRotateArgs qa;
    qa.q = q, qa.rot_t = L.k_rot_t.get(), qa.mean = L.k_mean.get();
    qa.q_rot = q_rot_.get(), qa.q_mean = q_mean_.get();
    qa.H = n_heads, qa.KV = n_kv_, qa.d = d_;
    if (d_ == 64) query_rotate_kernel<64><<<dim3(n_heads, B), 64, 0, stream>>>(qa);
    else query_rotate_kernel<128><<<dim3(n_heads, B), 128, 0, stream>>>(qa);
    ANTKV_LAUNCH_CHECK("query_rotate_kernel");
    p.q_rot = q_rot_.get(), p.q_mean = q_mean_.get();
    p.v_rotation = L.v_rot.get(), p.v_mean = L.v_mean.get();
  }
  if (gain_k_) p.k_scale = L.k_scale.get();
  if (gain_v_) p.v_scale = L.v_scale.get();
  if (commute_) cuda::commute_decode(p, stream);
  else cuda::quant_decode(p, stream);
  if (!L.promote) return;
  RunningScoreArgs r;
  r.q = q, r.o = out, r.lse = lse_.get(), r.logits = logits_.get();
  r.av = L.anchor_v.get();
  r.wv = window_ ? L.window_v.get() : nullptr;
  r.ascore = L.anchor_score.get(), r.wscore = L.window_score.get();
  r.n_anchor = p.n_anchor, r.n_window = p.n_window;
  r.coef = L.score_coef.get();
  r.KV = n_kv_, r.H = n_heads, r.d = d_, r.acap = L.acap, r.W = window_;
  r.scale = 1.0f / std::sqrt(static_cast<float>(d_));  // the anchor score's 1/sqrt(d), whatever attention's scale
  const int G = n_heads / n_kv_;
  const size_t smem = (static_cast<size_t>(G) * (d_ / 16) * 20 + 3 * G + static_cast<size_t>(G) * kScoreTokensPerBlock) *
                      sizeof(float);  // running_score_kernel's o [G][OS] | |q| | lse | |o|^2 | logits
  const int chunks = (L.acap + window_ + kScoreTokensPerBlock - 1) / kScoreTokensPerBlock;
  const dim3 grid(B, n_kv_, chunks);
  auto go = [&](auto d_tag) {  // head_dim 64 or 128: quant_decode's closed set (check_vq_shape in the constructors)
    constexpr int D = decltype(d_tag)::value;
    switch (G) {
      case 1: running_score_kernel<D, 1><<<grid, 256, smem, stream>>>(r); break;
      case 2: running_score_kernel<D, 2><<<grid, 256, smem, stream>>>(r); break;
      case 4: running_score_kernel<D, 4><<<grid, 256, smem, stream>>>(r); break;
      case 8: running_score_kernel<D, 8><<<grid, 256, smem, stream>>>(r); break;
      default: running_score_kernel<D, 0><<<grid, 256, smem, stream>>>(r); break;
    }
  };
  if (d_ == 64) go(std::integral_constant<int, 64>{});
  else go(std::integral_constant<int, 128>{});
  ANTKV_LAUNCH_CHECK("running_score_kernel");
}

void GpuCompressedKvCache::fill_random(uint64_t seed, cudaStream_t stream) {
  uint64_t s = seed * 7919 + 5;
  for (auto& L : layers_) {
    cuda::fill_random_bytes(L->k_codes.get(), static_cast<int64_t>(L->k_codes.size()), s++, stream);
    cuda::fill_random_bytes(L->v_codes.get(), static_cast<int64_t>(L->v_codes.size()), s++, stream);
    cuda::fill_random_f16(L->anchor_k.get(), static_cast<int64_t>(L->anchor_k.size()), s++, 1.0f, stream);
    cuda::fill_random_f16(L->anchor_v.get(), static_cast<int64_t>(L->anchor_v.size()), s++, 1.0f, stream);
    cuda::fill_random_f16(L->window_k.get(), static_cast<int64_t>(L->window_k.size()), s++, 1.0f, stream);
    cuda::fill_random_f16(L->window_v.get(), static_cast<int64_t>(L->window_v.size()), s++, 1.0f, stream);
    for (auto* b : {&L->anchor_kpre, &L->anchor_vsrc})
      if (b->size()) cuda::fill_random_f16(b->get(), static_cast<int64_t>(b->size()), s++, 1.0f, stream);
    for (auto* b : {&L->k_scale, &L->v_scale})  // gain: positive scales, as real ones are
      if (b->size()) {
        synthetic_scale_kernel<<<blocks_for(static_cast<int64_t>(b->size())), kThreads, 0, stream>>>(
            b->get(), static_cast<int64_t>(b->size()), static_cast<uint32_t>(s++));
        ANTKV_LAUNCH_CHECK("synthetic_scale_kernel");
      }
    for (auto* b : {&L->anchor_score, &L->window_score})  // running scores: any value times the same
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemsetAsync(b->get(), 0, b->bytes(), stream));
    if (pre_) {
      cuda::fill_random_f16(L->window_kpre.get(), static_cast<int64_t>(L->window_kpre.size()), s++, 1.0f, stream);
      iota_code_pos_kernel<<<blocks_for(static_cast<int64_t>(L->code_pos.size())), kThreads, 0, stream>>>(
          L->code_pos.get(), static_cast<int64_t>(L->code_pos.size()), capacity_);
      ANTKV_LAUNCH_CHECK("iota_code_pos_kernel");
    }
  }
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

namespace {
// Slots 0 .. A-1 of every KV head of one sequence from an anchor array [max_batch, KV, cap] -> [KV][A] (host).
template <class T>
std::vector<T> download_anchor_slots(const T* src, int seq, int KV, int cap, int A) {
  std::vector<T> out(static_cast<size_t>(KV) * A);
  for (int h = 0; h < KV && A > 0; ++h)
    ANTKV_CUDA_CHECK(cudaMemcpy(out.data() + static_cast<size_t>(h) * A, src + (static_cast<size_t>(seq) * KV + h) * cap,
                                A * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}
}  // namespace

std::vector<int32_t> GpuCompressedKvCache::anchor_positions(int layer, int seq) const {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_, "anchor_positions: layer {} / sequence {} out "
              "of range", layer, seq);
  return download_anchor_slots(layers_[layer]->anchor_pos.get(), seq, n_kv_, layers_[layer]->acap,
                               seqs_[layer][seq].n_anchor);
}

std::vector<float> GpuCompressedKvCache::anchor_running_scores(int layer, int seq) const {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_ && layers_[layer]->promote,
              "anchor_running_scores: no decode-time anchors in layer {}, or layer {} / sequence {} out of range", layer,
              layer, seq);
  return download_anchor_slots(layers_[layer]->anchor_score.get(), seq, n_kv_, layers_[layer]->acap,
                               seqs_[layer][seq].n_anchor);
}

void GpuCompressedKvCache::poison() {
  for (auto& L : layers_) {
    for (auto* b : {&L->k_codes, &L->v_codes})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));
    for (auto* b : {&L->code_pos, &L->anchor_pos})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // -1
    for (auto* b : {&L->anchor_k, &L->anchor_v, &L->window_k, &L->window_v, &L->window_kpre, &L->anchor_kpre,
                   &L->anchor_vsrc})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // 0xFFFF: fp16 NaN
    for (auto* b : {&L->anchor_score, &L->window_score})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // fp32 NaN
    for (auto* b : {&L->k_scale, &L->v_scale})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // fp16 NaN
  }
  if (stage_k_.size()) ANTKV_CUDA_CHECK(cudaMemset(stage_k_.get(), 0xFF, stage_k_.bytes()));
  if (stage_v_.size()) ANTKV_CUDA_CHECK(cudaMemset(stage_v_.get(), 0xFF, stage_v_.bytes()));
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
}

void GpuCompressedKvCache::set_synthetic_lengths(const std::vector<int>& lens) {
  ANTKV_CHECK(static_cast<int>(lens.size()) <= max_batch_, "set_synthetic_lengths: {} sequences > max_batch {}",
              lens.size(), max_batch_);
  for (size_t b = 0; b < lens.size(); ++b) {
    ANTKV_CHECK(lens[b] >= 0 && lens[b] <= capacity_, "set_synthetic_lengths: length {} outside [0, capacity {}]",
                lens[b], capacity_);
    for (int l = 0; l < n_layers_; ++l) {
      const Layer& L = *layers_[l];
      CompressedSeqState st;
      st.n_anchor = std::min(L.acap, static_cast<int>(std::ceil(L.ratio * lens[b])));
      st.n_window = std::min(window_, lens[b] - st.n_anchor);
      st.n_quant = lens[b] - st.n_anchor - st.n_window;
      st.n_entered = st.n_window;
      seqs_[l][b] = st;
    }
  }
}

}  // namespace antkv
