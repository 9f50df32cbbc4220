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
#include "kernels/common/random_fill.h"
#include "quant/codebook_fit.h"
#include "anchor/anchor_scores.h"
#include "quant/vq.h"
#include "runtime/rope.h"

namespace antkv {

using cuda::bf16;
using cuda::DeviceBuffer;

struct GpuCompressedKvCache::Layer {
  DeviceBuffer<uint8_t> k_codes, v_codes;    // [max_batch, KV, capacity, R]
  DeviceBuffer<__half> k_cent, v_cent;       // [KV, NG, 2^b, c]
  DeviceBuffer<__half> anchor_k, anchor_v;   // [max_batch, KV, anchor_capacity, d]
  DeviceBuffer<int32_t> anchor_pos;          // [max_batch, KV, anchor_capacity]
  DeviceBuffer<__half> window_k, window_v;   // [max_batch, KV, window, d]
  DeviceBuffer<int32_t> code_pos;            // pre_rope: [max_batch, KV, capacity] position of each code slot
  DeviceBuffer<__half> window_kpre;          // pre_rope: [max_batch, KV, window, d] pre-RoPE window keys
  // decode-time anchors (promote): running anchor scores, the anchors' pre-RoPE keys (pre_rope: a displaced
  // anchor is quantized from them) and the score's weights of S_K and S_V per KV head
  DeviceBuffer<float> anchor_score;          // [max_batch, KV, anchor_capacity]
  DeviceBuffer<float> window_score;          // [max_batch, KV, window]
  DeviceBuffer<__half> anchor_kpre;          // pre_rope: [max_batch, KV, anchor_capacity, d]
  DeviceBuffer<float> score_coef;            // [KV, 2]: (e_K, e_V) for error_bound, (0, 1) / (1, 0) otherwise
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
  __half* akpre = nullptr;          // pre_rope: [max_batch, KV, acap, d]
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
          p.sk[stage + c] = pre ? p.akpre[aslot * p.d + c] : p.ak[aslot * p.d + c];
          p.sv[stage + c] = p.av[aslot * p.d + c];
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
        if (pre) p.akpre[aslot * p.d + c] = xkp;
      }
    }
  }
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

// synthetic contents: code_pos[.][.][slot] = slot
__global__ void iota_code_pos_kernel(int32_t* __restrict__ code_pos, int64_t n, int cap) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    code_pos[i] = static_cast<int32_t>(i % cap);
}

cuda::VqKernelConfig config_for(const MethodSpec& m) {
  ANTKV_CHECK(m.needs_codebooks(), "compressed KV cache: method {} is not vq or antkv", m.text);
  ANTKV_CHECK(m.keys.c == m.values.c && m.keys.b == m.values.b,
              "method {}: the compressed cache needs one configuration for keys and values (c{}b{} / c{}b{})", m.text,
              m.keys.c, m.keys.b, m.values.c, m.values.b);
  const std::string name = fmt::format("c{}b{}", m.keys.c, m.keys.b);
  for (cuda::VqKernelConfig c : cuda::kVqKernelConfigs)
    if (name == cuda::vq_kernel_config_info(c).name) return c;
  fail("method {}: {} is not one of the compressed cache's configurations (c2b8, c4b8, c8b8, c16b12, c16b8, c16b6; "
       "the simulated cache, eval.kv_cache: simulated, evaluates any)",
       m.text, name);
}

}  // namespace

GpuCompressedKvCache::GpuCompressedKvCache(const ModelConfig& cfg, const MethodSpec& m, const CodebookSet& cb,
                                           int max_batch, int capacity, int window) {
  name_ = m.text;
  config_ = config_for(m);
  ANTKV_CHECK(m.anchors == AnchorTensors::kOff || m.anchors == AnchorTensors::kKeysValues,
              "method {}: anchors={} (one tensor only) is not supported by the compressed cache (one code stream "
              "for keys and values): anchors=kv or off",
              m.text, option_name(m.anchors));
  ANTKV_CHECK(m.gain == Gain::kOff && !m.correct && m.rotate == Rotate::kOff && m.metric == Metric::kPlain && !m.layered() &&
                  m.layer_ratio.empty(),
              "method {}: gain=, correct=, rotate=, metric=task and per-layer widths or ratios (lkbits, lvbits, lratio) are not "
              "supported by the compressed cache (evaluate them with eval.kv_cache: simulated)",
              m.text);
  cuda::check_vq_shape(cfg.head_dim, config_);
  check_codebooks_fit(m, cb, cfg);
  allocate(cfg, max_batch, capacity, window, m.has_anchors() ? m.ratio : 0.0, m.pre_rope(), m.promotes());
  if (m.commute()) set_commute(cfg, fmt::format("method {}", m.text));
  if (promote_) {  // the running score's weights: the method's score over the codebooks' error norms
    const AnchorScoreKind kind = m.score;
    for (int l = 0; l < n_layers_; ++l) {
      const auto& ek = cb.keys.at(l).error_norm;
      const auto& ev = cb.values.at(l).error_norm;
      ANTKV_CHECK((ek.empty() || static_cast<int>(ek.size()) == n_kv_) && (ev.empty() || static_cast<int>(ev.size()) == n_kv_),
                  "method {}: layer {} error norms do not have one entry per KV head", m.text, l);
      const std::vector<float> coef = anchor_score_weight_table(kind, ek, ev, n_kv_);
      ANTKV_CUDA_CHECK(cudaMemcpy(layers_[l]->score_coef.get(), coef.data(), coef.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
  }
  const size_t want = static_cast<size_t>(n_kv_) * ng_ * k_count_ * (d_ / ng_);
  std::vector<__half> h(want);
  for (int l = 0; l < n_layers_; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      const auto& src = kv ? cb.values.at(l).centroids : cb.keys.at(l).centroids;
      ANTKV_CHECK(src.size() == want, "method {}: layer {} {} centroids hold {} floats, expected {}", m.text, l,
                  kv ? "value" : "key", src.size(), want);
      for (size_t i = 0; i < want; ++i) h[i] = __float2half_rn(src[i]);
      auto& dst = kv ? layers_[l]->v_cent : layers_[l]->k_cent;
      ANTKV_CUDA_CHECK(cudaMemcpy(dst.get(), h.data(), want * sizeof(__half), cudaMemcpyHostToDevice));
    }
}

GpuCompressedKvCache::GpuCompressedKvCache(const ModelConfig& cfg, cuda::VqKernelConfig config, double anchor_ratio,
                                           int max_batch, int capacity, int window, uint64_t seed, bool pre_rope,
                                           bool promote, bool commute) {
  config_ = config;
  name_ = fmt::format("synthetic {}{}{}", cuda::vq_kernel_config_info(config).name,
                      commute ? " commute" : pre_rope ? " pre-RoPE" : "", promote && anchor_ratio > 0 ? " promote" : "");
  cuda::check_vq_shape(cfg.head_dim, config_);
  allocate(cfg, max_batch, capacity, window, anchor_ratio, pre_rope || commute, promote);
  if (commute) set_commute(cfg, name_);
  for (int l = 0; l < n_layers_; ++l) {
    if (promote_) {
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

void GpuCompressedKvCache::allocate(const ModelConfig& cfg, int max_batch, int capacity, int window, double ratio,
                                    bool pre_rope, bool promote) {
  ANTKV_CHECK(max_batch >= 1 && capacity >= 1 && window >= 0 && ratio >= 0 && ratio <= 1,
              "compressed KV cache: bad sizes (batch {}, capacity {}, window {}, anchor ratio {})", max_batch, capacity,
              window, ratio);
  n_layers_ = cfg.num_layers;
  n_kv_ = cfg.num_kv_heads;
  n_heads_ = cfg.num_heads;
  d_ = cfg.head_dim;
  ng_ = cuda::vq_groups(d_, config_);
  k_count_ = cuda::vq_centroid_count(config_);
  rec_ = cuda::vq_record_bytes(d_, config_);
  lut_half_ = config_ == cuda::VqKernelConfig::kC8B8 || config_ == cuda::VqKernelConfig::kC16B12;
  pre_ = pre_rope;
  if (pre_) {
    const auto inv = rope_inv_freq(cfg);
    inv_freq_.resize(inv.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(inv_freq_.get(), inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  max_batch_ = max_batch;
  capacity_ = capacity;
  window_ = window;
  ratio_ = ratio;
  promote_ = promote && ratio > 0;
  // a prefill of up to `capacity` tokens keeps ceil(ratio * T) anchors (the first token among them)
  anchor_cap_ = ratio > 0 ? static_cast<int>(std::min<double>(capacity, std::ceil(ratio * capacity) + 1)) : 0;
  const size_t BK = static_cast<size_t>(max_batch) * n_kv_;
  const size_t cent = static_cast<size_t>(n_kv_) * k_count_ * d_;  // [KV, NG, K, c]
  layers_.clear();
  device_bytes_ = 0;
  for (int l = 0; l < n_layers_; ++l) {
    auto L = std::make_unique<Layer>();
    L->k_codes.resize(BK * capacity * rec_);
    L->v_codes.resize(BK * capacity * rec_);
    L->k_cent.resize(cent);
    L->v_cent.resize(cent);
    L->anchor_k.resize(BK * anchor_cap_ * d_);
    L->anchor_v.resize(BK * anchor_cap_ * d_);
    L->anchor_pos.resize(BK * anchor_cap_);
    L->window_k.resize(BK * window * d_);
    L->window_v.resize(BK * window * d_);
    if (pre_) {
      L->code_pos.resize(BK * capacity);
      L->window_kpre.resize(BK * window * d_);
    }
    if (promote_) {
      L->anchor_score.resize(BK * anchor_cap_);
      L->window_score.resize(BK * window);
      L->score_coef.resize(static_cast<size_t>(2) * n_kv_);
      if (pre_) L->anchor_kpre.resize(BK * anchor_cap_ * d_);
    }
    device_bytes_ += L->k_codes.bytes() + L->v_codes.bytes() + L->k_cent.bytes() + L->v_cent.bytes() +
                     L->anchor_k.bytes() + L->anchor_v.bytes() + L->anchor_pos.bytes() + L->window_k.bytes() +
                     L->window_v.bytes() + L->code_pos.bytes() + L->window_kpre.bytes() + L->anchor_score.bytes() +
                     L->window_score.bytes() + L->anchor_kpre.bytes() + L->score_coef.bytes();
    layers_.push_back(std::move(L));
  }
  seqs_.assign(max_batch, CompressedSeqState{});
  step_d_.resize(static_cast<size_t>(8) * max_batch);
  step_h_.ensure(static_cast<size_t>(8) * max_batch);
  stage_k_.resize(static_cast<size_t>(max_batch) * n_kv_ * d_);
  stage_v_.resize(static_cast<size_t>(max_batch) * n_kv_ * d_);
  // the largest workspace any decode plan of up to max_batch sequences may need
  int64_t ws = 0;
  for (int b = 1; b <= max_batch; ++b)
    ws = std::max(ws, cuda::quant_decode_workspace_floats(
                          b, cfg.num_heads, d_, cuda::quant_decode_max_splits(b, cfg.num_heads, n_kv_, d_, config_, capacity, lut_half_)));
  workspace_.resize(static_cast<size_t>(ws));
  if (promote_) {
    lse_.resize(static_cast<size_t>(max_batch) * n_heads_);
    logits_.resize(static_cast<size_t>(max_batch) * n_heads_ * (anchor_cap_ + window_));
  }
  device_bytes_ += step_d_.bytes() + stage_k_.bytes() + stage_v_.bytes() + workspace_.bytes() + lse_.bytes() +
                   logits_.bytes();
}

size_t GpuCompressedKvCache::bytes_per_sequence() const {
  const size_t per_layer = static_cast<size_t>(n_kv_) *
                           (2 * static_cast<size_t>(capacity_) * rec_ + 2 * static_cast<size_t>(anchor_cap_) * d_ * 2 +
                            static_cast<size_t>(anchor_cap_) * 4 + 2 * static_cast<size_t>(window_) * d_ * 2 +
                            (pre_ ? static_cast<size_t>(capacity_) * 4 + static_cast<size_t>(window_) * d_ * 2 : 0) +
                            (promote_ ? static_cast<size_t>(anchor_cap_ + window_) * 4 +
                                            (pre_ ? static_cast<size_t>(anchor_cap_) * d_ * 2 : 0)
                                      : 0));
  // promote: this step's log-sum-exp and FP16 scores (one buffer for all layers)
  const size_t scratch = promote_ ? static_cast<size_t>(n_heads_) * (anchor_cap_ + window_ + 1) * 4 : 0;
  return per_layer * n_layers_ + scratch;
}

size_t GpuCompressedKvCache::code_bytes_per_token() const {
  return static_cast<size_t>(n_layers_) * n_kv_ * 2 * rec_;
}

void GpuCompressedKvCache::reset() { std::fill(seqs_.begin(), seqs_.end(), CompressedSeqState{}); }

void GpuCompressedKvCache::write_prefill(int layer, int seq, int T, const float* k, int64_t k_stride, const float* v,
                                         int64_t v_stride, const float* k_pre, int64_t k_pre_stride,
                                         const uint8_t* anchor_flags, const float* anchor_scores, cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_, "compressed cache: layer {} / sequence {} out of range",
              layer, seq);
  ANTKV_CHECK(seqs_[seq].length() == 0,
              "compressed cache {}: a prefill into sequence {} that already holds {} tokens (chunked prefill over the "
              "compressed cache is not implemented: prefill in one chunk, then decode)",
              name_, seq, seqs_[seq].length());
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
  ANTKV_CHECK(A <= anchor_cap_, "compressed cache {}: {} anchors per head exceed the anchor capacity {}", name_, A,
              anchor_cap_);
  if (layer > 0)
    ANTKV_CHECK(A == pending_anchors_, "compressed cache {}: layer {} keeps {} anchors per head, layer 0 kept {}", name_,
                layer, A, pending_anchors_);
  pending_anchors_ = A;
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
  quantize_pair(L, T, pre_ ? prefill_kpre_.get() : prefill_k_.get(),  // the code stream holds pre-RoPE keys when pre
                prefill_v_.get(), prefill_ints_.get() + slots.size(), nullptr, prefill_ints_.get(), stream);
  if (A > 0) {
    AnchorGatherArgs g;
    if (promote_) {  // running scores start from the prefill's (0 when the caller has none)
      ANTKV_CHECK(anchor_scores, "compressed cache {}: decode-time anchors need the prefill's anchor scores", name_);
      prefill_score_.ensure(static_cast<size_t>(T) * KV);
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(prefill_score_.get(), anchor_scores, static_cast<size_t>(T) * KV * sizeof(float),
                                       cudaMemcpyHostToDevice, stream));
      g.score = prefill_score_.get(), g.ascore = L.anchor_score.get();
      if (pre_) g.skpre = prefill_kpre_.get(), g.akpre = L.anchor_kpre.get();
    }
    g.sk = prefill_k_.get(), g.sv = prefill_v_.get();
    g.idx = prefill_ints_.get() + slots.size() + T;
    g.ak = L.anchor_k.get(), g.av = L.anchor_v.get(), g.pos = L.anchor_pos.get();
    g.seq = seq, g.A = A, g.KV = KV, g.d = d_, g.cap = anchor_cap_;
    anchor_gather_kernel<<<blocks_for(static_cast<int64_t>(KV) * A * d_), kThreads, 0, stream>>>(g);
    ANTKV_LAUNCH_CHECK("anchor_gather_kernel");
  }
  // prefill_h_ and the device ints are reused by the next layer
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void GpuCompressedKvCache::quantize_pair(Layer& L, int n_tokens, const __half* k, const __half* v,
                                         const int32_t* seq_index, const int32_t* slot, const int32_t* slot_per_head,
                                         cudaStream_t stream) {
  cuda::QuantizeParams qp;
  qp.config = config_;
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
  qp.x = k;
  qp.centroids = L.k_cent.get();
  qp.codes = L.k_codes.get();
  cuda::quantize_kv(qp, stream);
  qp.x = v;
  qp.centroids = L.v_cent.get();
  qp.codes = L.v_codes.get();
  cuda::quantize_kv(qp, stream);
}

void GpuCompressedKvCache::commit_prefill(int seq, int T) {
  ANTKV_CHECK(seq >= 0 && seq < max_batch_ && pending_anchors_ >= 0 && pending_anchors_ <= T,
              "compressed cache: commit_prefill without write_prefill");
  CompressedSeqState& s = seqs_[seq];
  s = CompressedSeqState{};
  s.n_anchor = pending_anchors_;
  s.n_quant = T - pending_anchors_;
  pending_anchors_ = -1;
}

void GpuCompressedKvCache::plan_step(int B, cudaStream_t stream) {
  ANTKV_CHECK(B >= 1 && B <= max_batch_, "compressed cache: batch {} outside [1, {}]", B, max_batch_);
  int32_t* h = step_h_.get();
  for (int b = 0; b < B; ++b) {
    CompressedSeqState& s = seqs_[b];
    ANTKV_CHECK(s.length() + 1 <= capacity_, "compressed cache {}: sequence {} holds {} tokens, capacity {}", name_, b,
                s.length(), capacity_);
    int evict = -1, code = -1, slot = 0;
    const int len = s.length();  // the new token's position
    int evict_pos = -1;
    // a token leaving the window becomes an anchor while the budget ceil(ratio * length) has room (promote;
    // the kernel decides the swaps, which keep the counts), else it takes a code slot
    const bool grow = promote_ && s.n_anchor < std::min<int64_t>(anchor_cap_, static_cast<int64_t>(std::ceil(ratio_ * (len + 1))));
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
    h[b] = evict;
    h[max_batch_ + b] = slot;
    h[2 * max_batch_ + b] = code;
    h[3 * max_batch_ + b] = s.n_quant;
    h[4 * max_batch_ + b] = s.n_anchor;
    h[5 * max_batch_ + b] = s.n_window;
    h[6 * max_batch_ + b] = b;
    h[7 * max_batch_ + b] = evict_pos;
  }
  step_B_ = B;
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(step_d_.get(), h, static_cast<size_t>(8) * max_batch_ * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
}

void GpuCompressedKvCache::upload_counts(int B, cudaStream_t stream) {
  ANTKV_CHECK(B >= 1 && B <= max_batch_, "compressed cache: batch {} outside [1, {}]", B, max_batch_);
  int32_t* h = step_h_.get();
  for (int b = 0; b < B; ++b) {
    const CompressedSeqState& s = seqs_[b];
    h[b] = -1;
    h[max_batch_ + b] = 0;
    h[2 * max_batch_ + b] = -1;
    h[3 * max_batch_ + b] = s.n_quant;
    h[4 * max_batch_ + b] = s.n_anchor;
    h[5 * max_batch_ + b] = s.n_window;
    h[6 * max_batch_ + b] = b;
    h[7 * max_batch_ + b] = -1;
  }
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(step_d_.get(), h, static_cast<size_t>(8) * max_batch_ * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

cuda::QuantDecodePlan GpuCompressedKvCache::plan(int B, int n_heads) const {
  if (commute_) return cuda::plan_commute_decode(B, n_heads, n_kv_, d_, config_, max_quant(B));
  return cuda::plan_quant_decode(B, n_heads, n_kv_, d_, config_, max_quant(B), lut_half_);
}

int GpuCompressedKvCache::max_quant(int B) const {
  int m = 0;
  for (int b = 0; b < B && b < max_batch_; ++b) m = std::max(m, seqs_[b].n_quant);
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
  a.evict_slot = step_d_.get();
  a.new_slot = step_d_.get() + max_batch_;
  a.wk = L.window_k.get(), a.wv = L.window_v.get();
  a.sk = stage_k_.get(), a.sv = stage_v_.get();
  a.KV = n_kv_, a.d = d_, a.W = window_;
  if (pre_) {
    a.k_pre = k_pre;
    a.wkpre = L.window_kpre.get();
  }
  if (pre_ || promote_) {  // code positions (pre), the code slot that says whether the budget grew (promote)
    a.code_pos = L.code_pos.get();
    a.code_slot = step_d_.get() + 2 * max_batch_;
    a.evict_pos = step_d_.get() + 7 * max_batch_;
    a.cap = capacity_;
  }
  if (promote_) {
    a.ascore = L.anchor_score.get(), a.wscore = L.window_score.get();
    a.ak = L.anchor_k.get(), a.av = L.anchor_v.get(), a.akpre = L.anchor_kpre.get(), a.apos = L.anchor_pos.get();
    a.n_anchor = step_d_.get() + 4 * max_batch_;
    a.acap = anchor_cap_;
  }
  window_append_kernel<<<dim3(B, n_kv_), 128, 0, stream>>>(a);
  ANTKV_LAUNCH_CHECK("window_append_kernel");
  quantize_pair(L, B, stage_k_.get(), stage_v_.get(), step_d_.get() + 6 * max_batch_,
                step_d_.get() + 2 * max_batch_,  // code slots: -1 where nothing leaves the window this step
                nullptr, stream);
}

void GpuCompressedKvCache::attend(int layer, int B, int n_heads, const bf16* q, bf16* out,
                                  const cuda::QuantDecodePlan& plan, float scale, cudaStream_t stream) {
  ANTKV_CHECK(layer >= 0 && layer < n_layers_ && B >= 1 && B <= max_batch_, "compressed cache: bad attend");
  Layer& L = *layers_[layer];
  cuda::QuantDecodeParams p;
  p.config = config_;
  p.batch = B;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_;
  p.head_dim = d_;
  p.q = q;
  p.k_codes = L.k_codes.get(), p.v_codes = L.v_codes.get();
  p.k_centroids = L.k_cent.get(), p.v_centroids = L.v_cent.get();
  p.anchor_k = anchor_cap_ ? L.anchor_k.get() : nullptr;
  p.anchor_v = anchor_cap_ ? L.anchor_v.get() : nullptr;
  p.anchor_pos = anchor_cap_ ? L.anchor_pos.get() : nullptr;
  p.window_k = window_ ? L.window_k.get() : nullptr;
  p.window_v = window_ ? L.window_v.get() : nullptr;
  p.n_quant = step_d_.get() + 3 * max_batch_;
  p.n_anchor = step_d_.get() + 4 * max_batch_;
  p.n_window = step_d_.get() + 5 * max_batch_;
  p.quant_capacity = capacity_;
  p.anchor_capacity = anchor_cap_;
  p.window_capacity = window_;
  p.out = out;
  p.workspace = workspace_.get();
  p.workspace_floats = static_cast<int64_t>(workspace_.size());
  p.n_splits = plan.n_splits;
  p.split_len = plan.split_len;
  p.scale = scale;
  p.lut_half = lut_half_;
  if (pre_) {
    p.pre_rope = true;
    p.code_pos = L.code_pos.get();
    p.inv_freq = inv_freq_.get();
  }
  p.lse = promote_ ? lse_.get() : nullptr;
  p.fp16_logits = promote_ ? logits_.get() : nullptr;
  if (commute_) cuda::commute_decode(p, stream);
  else cuda::quant_decode(p, stream);
  if (!promote_) return;
  RunningScoreArgs r;
  r.q = q, r.o = out, r.lse = lse_.get(), r.logits = logits_.get();
  r.av = L.anchor_v.get();
  r.wv = window_ ? L.window_v.get() : nullptr;
  r.ascore = L.anchor_score.get(), r.wscore = L.window_score.get();
  r.n_anchor = p.n_anchor, r.n_window = p.n_window;
  r.coef = L.score_coef.get();
  r.KV = n_kv_, r.H = n_heads, r.d = d_, r.acap = anchor_cap_, r.W = window_;
  r.scale = 1.0f / std::sqrt(static_cast<float>(d_));  // the anchor score's 1/sqrt(d), whatever attention's scale
  const int G = n_heads / n_kv_;
  const size_t smem = (static_cast<size_t>(G) * (d_ / 16) * 20 + 3 * G + static_cast<size_t>(G) * kScoreTokensPerBlock) *
                      sizeof(float);  // running_score_kernel's o [G][OS] | |q| | lse | |o|^2 | logits
  const int chunks = (anchor_cap_ + window_ + kScoreTokensPerBlock - 1) / kScoreTokensPerBlock;
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
    if (L->anchor_kpre.size())
      cuda::fill_random_f16(L->anchor_kpre.get(), static_cast<int64_t>(L->anchor_kpre.size()), s++, 1.0f, stream);
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
  return download_anchor_slots(layers_[layer]->anchor_pos.get(), seq, n_kv_, anchor_cap_, seqs_[seq].n_anchor);
}

std::vector<float> GpuCompressedKvCache::anchor_running_scores(int layer, int seq) const {
  ANTKV_CHECK(promote_ && layer >= 0 && layer < n_layers_ && seq >= 0 && seq < max_batch_,
              "anchor_running_scores: no decode-time anchors, or layer {} / sequence {} out of range", layer, seq);
  return download_anchor_slots(layers_[layer]->anchor_score.get(), seq, n_kv_, anchor_cap_, seqs_[seq].n_anchor);
}

void GpuCompressedKvCache::poison() {
  for (auto& L : layers_) {
    for (auto* b : {&L->k_codes, &L->v_codes})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));
    for (auto* b : {&L->code_pos, &L->anchor_pos})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // -1
    for (auto* b : {&L->anchor_k, &L->anchor_v, &L->window_k, &L->window_v, &L->window_kpre, &L->anchor_kpre})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // 0xFFFF: fp16 NaN
    for (auto* b : {&L->anchor_score, &L->window_score})
      if (b->size()) ANTKV_CUDA_CHECK(cudaMemset(b->get(), 0xFF, b->bytes()));  // fp32 NaN
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
    CompressedSeqState st;
    st.n_anchor = std::min(anchor_cap_, static_cast<int>(std::ceil(ratio_ * lens[b])));
    st.n_window = std::min(window_, lens[b] - st.n_anchor);
    st.n_quant = lens[b] - st.n_anchor - st.n_window;
    st.n_entered = st.n_window;
    seqs_[b] = st;
  }
}

}  // namespace antkv
