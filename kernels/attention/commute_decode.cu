// Decode attention over RoPE-commuting key codes (the method: commute_decode.h).
#include "kernels/attention/commute_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/attention/quant_decode_device.cuh"
#include "kernels/attention/split_combine.cuh"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/common/dtypes.h"

namespace antkv::cuda {
namespace {

using namespace dev;

constexpr int kNT = 512;    // threads per block (one block per multiprocessor: both codebooks in shared memory)
constexpr int kTile = kNT;  // slots (or FP16 tokens) per tile: one per thread in the score pass
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxSplitLen = 1 << 22;  // fp32 sums of exp2 weights <= 1 each: no overflow at any split length

constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int kOffsets = 32;        // the rotation table's offsets from a warp's base position (one per lane)
constexpr int kMaxSmem = 227 * 1024;  // dynamic shared memory of one block (sm_90)

template <int D, int C, int NB, int G>
struct Shape {
  static constexpr int HALF = D / 2, NG = D / C, K = 1 << NB, PH = C / 2, REC = NG * NB / 8, NWD = (REC + 3) / 4;
  static constexpr int NP = kNT / HALF;  // token classes of the value pass (thread per channel pair and class)
  // shared memory, bytes: key codebook [NG][K][PH] half2 (re, im) | value codebook [NG][K][C] half | u [HALF][G]
  // float2 | freq [HALF] | red [kNT/32][G] | then, during the tiles, p [kTile][G] | key codes [NG][kTile] u8 | value
  // codes [NG][kTile] u8, and at the end o [NP][G][D] in the same bytes
  static constexpr int CB = NG * K * PH * 4, VCB = CB, U = VCB + NG * K * C * 2, FREQ = U + HALF * G * 8,
                       RED = FREQ + HALF * 4, P = RED + (kNT / 32) * G * 4, KC = P + kTile * G * 4, VC = KC + kTile * NG,
                       O = P, BASE_BYTES = cmax(VC + kTile * NG, O + NP * G * D * 4);
  // the fast rotation, where it fits: E [HALF][kOffsets] float2 (e^{i r theta_j}) | each warp's query turned back by
  // its base position, [kNT/32][HALF][G] float2
  static constexpr int E = BASE_BYTES, UW = E + HALF * kOffsets * 8, FAST_BYTES = UW + (kNT / 32) * HALF * G * 8;
  static constexpr bool FAST = FAST_BYTES <= kMaxSmem;
  static constexpr int BYTES = FAST ? FAST_BYTES : BASE_BYTES;
  static_assert(NB <= 8, "codes are staged as bytes");
  static_assert(BASE_BYTES % 16 == 0, "16-byte aligned regions");
  static_assert(CB % 16 == 0 && U % 16 == 0 && (HALF * G * 8) % 16 == 0 && P % 16 == 0, "16-byte aligned regions");
};

// s[h] += Re conj(u_j) z for the G heads (u: [G] float2 in shared memory, z = (zr, zi))
template <int G>
__device__ __forceinline__ void dot_pair(const float2* u, float zr, float zi, float (&s)[G]) {
  if constexpr (G == 1) {
    const float2 a = u[0];
    s[0] = fmaf(a.x, zr, fmaf(a.y, zi, s[0]));
  } else {
#pragma unroll
    for (int h = 0; h < G; h += 2) {
      const float4 a = *reinterpret_cast<const float4*>(u + h);
      s[h] = fmaf(a.x, zr, fmaf(a.y, zi, s[h]));
      s[h + 1] = fmaf(a.z, zr, fmaf(a.w, zi, s[h + 1]));
    }
  }
}

// (sin, cos) of the exact angle pos * freq (two fp32 numbers; their product carried as hi + lo, the fp32 product and
// its rounding error), reduced to [-pi, pi] by two-constant Cody-Waite, then the fast sine/cosine (~2^-21 absolute)
__device__ __forceinline__ void exact_angle_sincos(float pos, float freq, float* sn, float* cs) {
  const float hi = __fmul_rn(pos, freq);
  const float lo = fmaf(pos, freq, -hi);
  const float k = rintf(hi * 0.15915494309189535f);
  const float r = fmaf(k, 1.7484555e-07f, fmaf(-k, 6.28318548202514648f, hi)) + lo;  // 2pi = 6.2831855 - 1.7484555e-7
  __sincosf(r, sn, cs);
}

// the G weights of one token (p: [G] floats in shared memory)
template <int G>
__device__ __forceinline__ void load_weights(const float* p, float (&w)[G]) {
  if constexpr (G % 4 == 0) {
#pragma unroll
    for (int h = 0; h < G; h += 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + h);
      w[h] = a.x, w[h + 1] = a.y, w[h + 2] = a.z, w[h + 3] = a.w;
    }
  } else if constexpr (G == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    w[0] = a.x, w[1] = a.y;
  } else {
    w[0] = p[0];
  }
}

template <int D, int C, int NB, int G>
__global__ void __launch_bounds__(kNT, 1) commute_split_kernel(const QuantDecodeParams p) {
  using S = Shape<D, C, NB, G>;
  constexpr int HALF = S::HALF, NG = S::NG, K = S::K, PH = S::PH, REC = S::REC, NWD = S::NWD, NP = S::NP;
  extern __shared__ __align__(16) unsigned char smem[];
  __half2* sCb = reinterpret_cast<__half2*>(smem);
  const __half2* sVcb = reinterpret_cast<const __half2*>(smem + S::VCB);
  float2* sU = reinterpret_cast<float2*>(smem + S::U);
  float* sFreq = reinterpret_cast<float*>(smem + S::FREQ);
  float* sP = reinterpret_cast<float*>(smem + S::P);
  float* sRed = reinterpret_cast<float*>(smem + S::RED);
  float* sO = reinterpret_cast<float*>(smem + S::O);
  uint8_t* sKc = smem + S::KC;
  uint8_t* sVc = smem + S::VC;
  float2* sE = reinterpret_cast<float2*>(smem + S::E);    // FAST: [HALF][kOffsets] e^{i r theta_j}
  float2* sUw = reinterpret_cast<float2*>(smem + S::UW);  // FAST: [kNT/32][HALF][G] u_j e^{-i base theta_j}

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h0 = kvh * G;
  const int64_t bh = static_cast<int64_t>(b) * p.n_kv_heads + kvh;
  // q of the G heads as pairs u_j = (q_j, q_{j+D/2}), scaled by scale * log2(e): scores in log2 units
  const float sl = p.scale * 1.4426950408889634f;
  for (int i = tid; i < HALF * G; i += kNT) {
    const int j = i / G, h = i % G;
    const bf16* qh = p.q + (static_cast<int64_t>(b) * p.n_heads + h0 + h) * D;
    sU[i] = make_float2(__bfloat162float(qh[j]) * sl, __bfloat162float(qh[j + HALF]) * sl);
  }
  const int64_t q_limit = std::min<int64_t>(static_cast<int64_t>(p.n_splits) * p.split_len, p.quant_capacity);
  const int nq = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(p.n_quant[b], q_limit)));
  const int q0 = split * p.split_len, q1 = min(q0 + p.split_len, nq);
  if (q0 < q1) {
    // the KV head's key codebook as complex (re, im) per pair: [NG][K][PH]
    const __half* kcb = p.k_centroids + static_cast<int64_t>(kvh) * NG * K * C;
    for (int i = tid; i < NG * K * PH; i += kNT) {
      const int row = i / PH, pi = i % PH;
      sCb[i] = __halves2half2(kcb[static_cast<int64_t>(row) * C + pi], kcb[static_cast<int64_t>(row) * C + PH + pi]);
    }
    // the value codebook as it is, [NG][K][C] (16-byte copies: NG * K * C is a multiple of 8)
    const uint4* vsrc = reinterpret_cast<const uint4*>(p.v_centroids + static_cast<int64_t>(kvh) * NG * K * C);
    for (int i = tid; i < NG * K * C / 8; i += kNT) reinterpret_cast<uint4*>(smem + S::VCB)[i] = vsrc[i];
    for (int i = tid; i < HALF; i += kNT) sFreq[i] = p.inv_freq[i];
    if constexpr (S::FAST)
      for (int i = tid; i < HALF * kOffsets; i += kNT) {
        float sn, cs;
        exact_angle_sincos(static_cast<float>(i % kOffsets), __ldg(p.inv_freq + i / kOffsets), &sn, &cs);
        sE[i] = make_float2(cs, sn);
      }
  }
  __syncthreads();

  const uint8_t* kbase = p.k_codes + bh * p.quant_capacity * REC;
  const uint8_t* vbase = p.v_codes + bh * p.quant_capacity * REC;
  const int32_t* cpos = p.code_pos + bh * p.quant_capacity;
  const int na = max(0, min(p.n_anchor[b], p.anchor_capacity));
  const int nw = max(0, min(p.n_window[b], p.window_capacity));
  const int nf = na + nw;
  const int fs = (nf + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  const int f0 = min(nf, split * fs), f1 = min(nf, f0 + fs);
  const int64_t n_logit = static_cast<int64_t>(p.anchor_capacity) + p.window_capacity;
  float* logits = p.fp16_logits ? p.fp16_logits + (static_cast<int64_t>(b) * p.n_heads + h0) * n_logit : nullptr;

  // running softmax state: m (block-uniform), the thread's share of l (score pass) and of o (value pass)
  float m_run[G], l_part[G], o[G][2];
#pragma unroll
  for (int h = 0; h < G; ++h) m_run[h] = -INFINITY, l_part[h] = 0.f, o[h][0] = o[h][1] = 0.f;
  const int cp = tid % HALF, cls = tid / HALF;  // value pass: channels 2cp, 2cp + 1; tokens i = cls (mod NP)
  const int vg = (2 * cp) / C, voff = (2 * cp) % C;

  // after the score pass wrote s (log2 units, -inf when invalid) of the thread's token: tile max, rescale, weights
  // (vscale: the token's value scale, gain=kv; the value pass reads p * vs, the denominator takes p)
  auto softmax_tile = [&](bool valid, const float (&s)[G], float vscale) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float mx = warp_max(valid ? s[h] : -INFINITY);
      if (lane == 0) sRed[warp * G + h] = mx;
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mt = -INFINITY;
#pragma unroll
      for (int w = 0; w < kNT / 32; ++w) mt = fmaxf(mt, sRed[w * G + h]);
      const float mn = fmaxf(m_run[h], mt);  // finite: the tile holds a token
      const float al = m_run[h] == -INFINITY ? 0.f : exp2f(m_run[h] - mn);
      m_run[h] = mn;
      const float pw = valid ? exp2f(s[h] - mn) : 0.f;
      l_part[h] = fmaf(l_part[h], al, pw);
      o[h][0] *= al, o[h][1] *= al;
      sP[tid * G + h] = pw * vscale;
    }
    __syncthreads();
  };

  for (int t0 = q0; t0 < q1; t0 += kTile) {
    const int t = t0 + tid;
    const bool valid = t < q1;
    float s[G];
#pragma unroll
    for (int h = 0; h < G; ++h) s[h] = 0.f;
    float vscale = 1.f;
    const int32_t pos_i = valid ? __ldg(cpos + t) : 0;
    // FAST: a warp whose slots' positions lie in [base, base + 32), base its first slot's (a stream of consecutive
    // tokens, gaps allowed), turns each codeword by e^{i (pos - base) theta_j} from the table and dots it with the
    // query turned back by its base, u_j e^{-i base theta_j} (the warp's own copy, rebuilt per tile: 2 sine/cosine
    // pairs per lane instead of 64 per slot); any other warp turns by the sine/cosine of the whole angle
    bool fast = false;
    int32_t base = 0;
    if constexpr (S::FAST) {
      base = __shfl_sync(0xffffffffu, pos_i, 0);
      fast = __all_sync(0xffffffffu, !valid || (pos_i - base >= 0 && pos_i - base < kOffsets));
      if (fast) {
        for (int j = lane; j < HALF; j += 32) {
          float sn, cs;
          exact_angle_sincos(static_cast<float>(base), sFreq[j], &sn, &cs);
#pragma unroll
          for (int h = 0; h < G; ++h) {
            const float2 u = sU[j * G + h];
            sUw[(warp * HALF + j) * G + h] = make_float2(fmaf(u.x, cs, u.y * sn), fmaf(u.y, cs, -u.x * sn));
          }
        }
        __syncwarp();
      }
    }
    if (valid) {
      uint32_t wk[NWD], wv[NWD];
      load_record<REC>(kbase, t, wk);
      load_record<REC>(vbase, t, wv);
      const int sw = t & (NG - 1);  // record position i holds the code of group i ^ (slot mod NG)
#pragma unroll
      for (int i = 0; i < NG; ++i) {  // codes staged group-major: a warp's lanes read consecutive bytes
        sKc[(i ^ sw) * kTile + tid] = static_cast<uint8_t>(code_at<NB>(wk, i));
        sVc[(i ^ sw) * kTile + tid] = static_cast<uint8_t>(code_at<NB>(wv, i));
      }
      // the group's codeword as PH half2 (re, im)
      auto codeword = [&](int g, __half2 (&wr)[PH]) {
        const __half2* w = sCb + (g * K + sKc[g * kTile + tid]) * PH;
        if constexpr (PH % 4 == 0) {
#pragma unroll
          for (int e = 0; e < PH / 4; ++e) *reinterpret_cast<uint4*>(wr + 4 * e) = reinterpret_cast<const uint4*>(w)[e];
        } else if constexpr (PH == 2) {
          *reinterpret_cast<uint2*>(wr) = *reinterpret_cast<const uint2*>(w);
        } else {
          wr[0] = w[0];
        }
      };
      // s += Re(conj(u_j) w_j r_j) over the key's pairs, r_j = turn(j) its RoPE turn (a rolled loop over the
      // groups: the fully unrolled one was thousands of instructions per slot)
      auto score_pairs = [&](const float2* u, auto turn) {
#pragma unroll 1
        for (int g = 0; g < NG; ++g) {
          alignas(16) __half2 wr[PH];
          codeword(g, wr);
#pragma unroll
          for (int pi = 0; pi < PH; ++pi) {
            const int j = g * PH + pi;
            const float2 r = turn(j);
            const float2 wf = __half22float2(wr[pi]);
            const float zr = wf.x * r.x - wf.y * r.y, zi = wf.y * r.x + wf.x * r.y;  // w r
            dot_pair<G>(u + j * G, zr, zi, s);
          }
        }
      };
      if (fast) {  // e^{i (pos - base) theta} from the table, against the warp's query turned back by its base
        const float2* e = sE + (pos_i - base);  // column pos - base, in [0, kOffsets)
        score_pairs(sUw + warp * HALF * G, [&](int j) { return e[j * kOffsets]; });
      } else {  // e^{i pos theta} of the exact angle
        const float pos = static_cast<float>(pos_i);
        score_pairs(sU, [&](int j) {
          float sn, cs;
          exact_angle_sincos(pos, sFreq[j], &sn, &cs);
          return make_float2(cs, sn);
        });
      }
      // gain: the key's scale commutes with RoPE (one factor per token after the lookups); the value's weighs p
      if (p.k_scale) {
        const float ks = __half2float(p.k_scale[bh * p.quant_capacity + t]);
#pragma unroll
        for (int h = 0; h < G; ++h) s[h] *= ks;
      }
      if (p.v_scale) vscale = __half2float(p.v_scale[bh * p.quant_capacity + t]);
    }
    softmax_tile(valid, s, vscale);
    const int n = min(kTile, q1 - t0);
#pragma unroll 4
    for (int i = cls; i < n; i += NP) {
      const int code = sVc[vg * kTile + i];
      const float2 v = __half22float2(sVcb[((vg * K + code) * C + voff) / 2]);
      float w[G];
      load_weights<G>(sP + i * G, w);
#pragma unroll
      for (int h = 0; h < G; ++h) o[h][0] = fmaf(w[h], v.x, o[h][0]), o[h][1] = fmaf(w[h], v.y, o[h][1]);
    }
    __syncthreads();
  }

  // FP16 tokens (post-RoPE): this split's share, anchors then window
  auto krow = [&](int f) {
    return f < na ? p.anchor_k + (bh * p.anchor_capacity + f) * D : p.window_k + (bh * p.window_capacity + (f - na)) * D;
  };
  auto vrow = [&](int f) {
    return f < na ? p.anchor_v + (bh * p.anchor_capacity + f) * D : p.window_v + (bh * p.window_capacity + (f - na)) * D;
  };
  for (int t0 = f0; t0 < f1; t0 += kTile) {
    const int f = t0 + tid;
    const bool valid = f < f1;
    float s[G];
#pragma unroll
    for (int h = 0; h < G; ++h) s[h] = 0.f;
    if (valid) {
      const __half* kr = krow(f);
#pragma unroll 2
      for (int j0 = 0; j0 < HALF; j0 += 8) {
        const uint4 ra = __ldg(reinterpret_cast<const uint4*>(kr + j0));
        const uint4 rb = __ldg(reinterpret_cast<const uint4*>(kr + HALF + j0));
        const __half2* a = reinterpret_cast<const __half2*>(&ra);
        const __half2* c = reinterpret_cast<const __half2*>(&rb);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 x = __half22float2(a[e]), y = __half22float2(c[e]);
          dot_pair<G>(sU + (j0 + 2 * e) * G, x.x, y.x, s);
          dot_pair<G>(sU + (j0 + 2 * e + 1) * G, x.y, y.y, s);
        }
      }
      if (logits)
#pragma unroll
        for (int h = 0; h < G; ++h) logits[h * n_logit + f] = s[h] * kLn2;
    }
    softmax_tile(valid, s, 1.f);
    const int n = min(kTile, f1 - t0);
    for (int i = cls; i < n; i += NP) {
      const float2 v = __half22float2(__ldg(reinterpret_cast<const __half2*>(vrow(t0 + i) + 2 * cp)));
      float w[G];
      load_weights<G>(sP + i * G, w);
#pragma unroll
      for (int h = 0; h < G; ++h) o[h][0] = fmaf(w[h], v.x, o[h][0]), o[h][1] = fmaf(w[h], v.y, o[h][1]);
    }
    __syncthreads();
  }

  // the split's record: o summed over the token classes, l over the threads
#pragma unroll
  for (int h = 0; h < G; ++h) {
    sO[(cls * G + h) * D + 2 * cp] = o[h][0];
    sO[(cls * G + h) * D + 2 * cp + 1] = o[h][1];
    const float lw = warp_sum(l_part[h]);
    if (lane == 0) sRed[warp * G + h] = lw;
  }
  __syncthreads();
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * D;
  for (int i = tid; i < G * D; i += kNT) {
    const int h = i / D, c = i % D;
    float O = 0.f;
#pragma unroll
    for (int k = 0; k < NP; ++k) O += sO[(k * G + h) * D + c];
    const int64_t slot = (static_cast<int64_t>(b) * p.n_heads + h0 + h) * p.n_splits + split;
    wo[slot * D + c] = O;
    if (c == 0) {
      float L = 0.f;
#pragma unroll
      for (int w = 0; w < kNT / 32; ++w) L += sRed[w * G + h];
      // m_run is block-uniform: every thread holds the same value for head h
      float M = -INFINITY;
#pragma unroll
      for (int hh = 0; hh < G; ++hh)
        if (hh == h) M = m_run[hh];
      wml[slot * 2] = M;
      wml[slot * 2 + 1] = L;
    }
  }
}

// One block of D threads per (head, sequence): the splits merged (split_combine.cuh), or NaN for counts past the
// capacities or the plan, or an empty context (as quant_decode's reduction).
template <int D>
__global__ void __launch_bounds__(D) commute_reduce_kernel(const QuantDecodeParams p) {
  extern __shared__ float rsmem[];
  const int h = blockIdx.x, b = blockIdx.y, c = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * p.n_heads + h;
  if (nan_for_bad_counts<D>(p, b, bh, c)) return;
  combine_splits<D, D>(p.workspace, static_cast<int64_t>(p.batch) * p.n_heads, p.n_splits, bh, 1, p.n_splits, rsmem,
                       p.out, p.lse);
}

// One instantiation: its kernel, dynamic shared memory, and the attribute that allows it (set once).
template <int D, int C, int NB, int G>
struct Inst {
  static constexpr int kBytes = Shape<D, C, NB, G>::BYTES;
  static auto kernel() {
    static const bool ready = [] {
      ANTKV_CUDA_CHECK(cudaFuncSetAttribute(commute_split_kernel<D, C, NB, G>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
      return true;
    }();
    (void)ready;
    return commute_split_kernel<D, C, NB, G>;
  }
  // resident blocks per multiprocessor (queried once: plans are made every decode step)
  static int per_sm() {
    static const int n = [] {
      int k = 0;
      ANTKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&k, kernel(), kNT, kBytes));
      return k;
    }();
    return n;
  }
};

// f(Inst<...>{}) for (head_dim, config, G)
template <class F>
void dispatch(int head_dim, VqKernelConfig cfg, int G, F&& f) {
  auto by_g = [&](auto d_tag, auto c_tag, auto nb_tag) {
    constexpr int D = decltype(d_tag)::value, C = decltype(c_tag)::value, NB = decltype(nb_tag)::value;
    switch (G) {
      case 1: return f(Inst<D, C, NB, 1>{});
      case 2: return f(Inst<D, C, NB, 2>{});
      case 4: return f(Inst<D, C, NB, 4>{});
      case 8: return f(Inst<D, C, NB, 8>{});
    }
    fail("commute decode: {} query heads per KV head is not supported (1, 2, 4 or 8)", G);
  };
  using I8 = std::integral_constant<int, 8>;
  auto by_cfg = [&](auto d_tag) {
    switch (cfg) {
      case VqKernelConfig::kC8B8: return by_g(d_tag, I8{}, I8{});
      case VqKernelConfig::kC16B8: return by_g(d_tag, std::integral_constant<int, 16>{}, I8{});
      case VqKernelConfig::kC16B6: return by_g(d_tag, std::integral_constant<int, 16>{}, std::integral_constant<int, 6>{});
      case VqKernelConfig::kC4B8: return by_g(d_tag, std::integral_constant<int, 4>{}, I8{});
      case VqKernelConfig::kC2B8: return by_g(d_tag, std::integral_constant<int, 2>{}, I8{});
      case VqKernelConfig::kC16B12: break;
    }
    fail("commute decode: {} is not supported (its key codebook, 1 MB per KV head, does not fit in shared memory)",
         vq_kernel_config_info(cfg).name);
  };
  check_vq_shape(head_dim, cfg);
  if (head_dim == 128) by_cfg(std::integral_constant<int, 128>{});
  else by_cfg(std::integral_constant<int, 64>{});
}

int blocks_per_sm(int head_dim, VqKernelConfig cfg, int G) {
  int per_sm = 0;
  dispatch(head_dim, cfg, G, [&](auto inst) { per_sm = decltype(inst)::per_sm(); });
  ANTKV_CHECK(per_sm >= 1, "commute decode: the kernel does not fit on a multiprocessor");
  return per_sm;
}

int first_splits(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg) {
  ANTKV_CHECK(batch >= 1 && n_kv_heads >= 1 && n_heads % n_kv_heads == 0, "commute decode: bad shape");
  const int64_t want = static_cast<int64_t>(blocks_per_sm(head_dim, cfg, n_heads / n_kv_heads)) * device_sm_count();
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads;
  return static_cast<int>(std::clamp<int64_t>(want / units, 1, kMaxQuantSplits));  // at most one wave
}

__global__ void permute_kernel(const float* in, int64_t in_stride, float* out, int64_t out_stride, int n_rows, int kvd,
                               int d, const int32_t* order, bool to_pairs) {
  const int64_t total = static_cast<int64_t>(n_rows) * kvd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / kvd;
    const int col = static_cast<int>(i % kvd), h = col / d, c = col % d;
    const int64_t head_in = r * in_stride + static_cast<int64_t>(h) * d, head_out = r * out_stride + static_cast<int64_t>(h) * d;
    if (to_pairs) out[head_out + c] = in[head_in + order[c]];
    else out[head_out + order[c]] = in[head_in + c];
  }
}

}  // namespace

bool commute_decode_supports(VqKernelConfig cfg) { return cfg != VqKernelConfig::kC16B12; }

int commute_decode_tile() { return kTile; }

QuantDecodePlan plan_commute_decode(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg,
                                    int64_t max_quant_len) {
  QuantDecodePlan plan;
  const int splits = first_splits(batch, n_heads, n_kv_heads, head_dim, cfg);
  const int64_t len = std::max<int64_t>(max_quant_len, 1);
  const int64_t per = (len + splits - 1) / splits;
  plan.split_len = static_cast<int>(std::min<int64_t>((per + kTile - 1) / kTile * kTile, kMaxSplitLen));
  plan.n_splits = static_cast<int>((len + plan.split_len - 1) / plan.split_len);
  ANTKV_CHECK(plan.n_splits <= kMaxQuantSplits, "commute decode: {} code slots need more than {} splits", max_quant_len,
              kMaxQuantSplits);
  plan.heads_per_block = n_heads / n_kv_heads;
  plan.blocks_per_sm = blocks_per_sm(head_dim, cfg, n_heads / n_kv_heads);
  return plan;
}

int commute_decode_max_splits(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg) {
  return first_splits(batch, n_heads, n_kv_heads, head_dim, cfg);
}

void commute_decode(const QuantDecodeParams& p, cudaStream_t stream) {
  check_vq_shape(p.head_dim, p.config);
  ANTKV_CHECK(commute_decode_supports(p.config),
              "commute decode: {} is not supported (its key codebook, 1 MB per KV head, does not fit in shared memory)",
              vq_kernel_config_info(p.config).name);
  ANTKV_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "commute decode: n_heads {} must be a multiple of n_kv_heads {}", p.n_heads, p.n_kv_heads);
  ANTKV_CHECK(p.batch > 0 && p.batch <= 65535 && p.n_kv_heads <= 65535, "commute decode: batch {} or {} KV heads out of range",
              p.batch, p.n_kv_heads);
  ANTKV_CHECK(p.q && p.out && p.workspace && p.n_quant && p.n_anchor && p.n_window, "commute decode: null pointer");
  ANTKV_CHECK(p.quant_capacity >= 0 && p.anchor_capacity >= 0 && p.window_capacity >= 0, "commute decode: bad capacity");
  ANTKV_CHECK(p.pre_rope, "commute decode: the code stream must hold pre-RoPE keys with their positions (pre_rope)");
  ANTKV_CHECK(!p.q_rot && !p.q_mean && !p.k_rotation && !p.k_mean && !p.v_rotation && !p.v_mean,
              "commute decode: a basis (rotate=pca) is not implemented with RoPE-commuting keys (it mixes the RoPE "
              "pairs); per-token scales (k_scale, v_scale) are");
  ANTKV_CHECK(p.quant_capacity == 0 || (p.k_codes && p.v_codes && p.k_centroids && p.v_centroids && p.code_pos && p.inv_freq),
              "commute decode: codes, codebooks, code positions and inv_freq are required when quant_capacity > 0");
  ANTKV_CHECK(p.anchor_capacity == 0 || (p.anchor_k && p.anchor_v), "commute decode: anchor K/V are null");
  ANTKV_CHECK(p.window_capacity == 0 || (p.window_k && p.window_v), "commute decode: window K/V are null");
  const int rec = vq_record_bytes(p.head_dim, p.config);
  const int align = rec % 16 == 0 ? 16 : rec % 8 == 0 ? 8 : rec % 4 == 0 ? 4 : rec % 2 == 0 ? 2 : 1;
  ANTKV_CHECK(reinterpret_cast<uintptr_t>(p.k_codes) % align == 0 && reinterpret_cast<uintptr_t>(p.v_codes) % align == 0,
              "commute decode: code arenas must be {}-byte aligned", align);
  for (const void* ptr : {static_cast<const void*>(p.k_centroids), static_cast<const void*>(p.v_centroids),
                          static_cast<const void*>(p.anchor_k), static_cast<const void*>(p.anchor_v),
                          static_cast<const void*>(p.window_k), static_cast<const void*>(p.window_v)})
    ANTKV_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "commute decode: codebooks and FP16 buffers must be 16-byte aligned");
  ANTKV_CHECK(p.n_splits >= 1 && p.n_splits <= kMaxQuantSplits && p.split_len > 0 && p.split_len % kTile == 0 &&
                  p.split_len <= kMaxSplitLen,
              "commute decode: bad split plan ({} splits of {} slots)", p.n_splits, p.split_len);
  ANTKV_CHECK(p.workspace_floats >= quant_decode_workspace_floats(p.batch, p.n_heads, p.head_dim, p.n_splits),
              "commute decode: workspace of {} floats is too small", p.workspace_floats);
  const int G = p.n_heads / p.n_kv_heads;
  dispatch(p.head_dim, p.config, G, [&](auto inst) {
    using I = decltype(inst);
    I::kernel()<<<dim3(p.n_splits, p.n_kv_heads, p.batch), kNT, I::kBytes, stream>>>(p);
    ANTKV_LAUNCH_CHECK("commute_split_kernel");
  });
  const size_t rbytes = static_cast<size_t>(split_combine_smem_floats(1, p.n_splits)) * sizeof(float);
  if (p.head_dim == 128) {
    commute_reduce_kernel<128><<<dim3(p.n_heads, p.batch), 128, rbytes, stream>>>(p);
  } else {
    commute_reduce_kernel<64><<<dim3(p.n_heads, p.batch), 64, rbytes, stream>>>(p);
  }
  ANTKV_LAUNCH_CHECK("commute_reduce_kernel");
}

void permute_pair_order(const float* in, int64_t in_stride, float* out, int64_t out_stride, int n_rows, int kv_heads,
                        int head_dim, const int32_t* order, bool to_pairs, cudaStream_t stream) {
  if (n_rows <= 0) return;
  ANTKV_CHECK(in && out && order && in != out, "permute_pair_order: null or aliased buffers");
  const int kvd = kv_heads * head_dim;
  ANTKV_CHECK(in_stride >= kvd && out_stride >= kvd, "permute_pair_order: row stride below {}", kvd);
  const int64_t total = static_cast<int64_t>(n_rows) * kvd;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
  permute_kernel<<<blocks, 256, 0, stream>>>(in, in_stride, out, out_stride, n_rows, kvd, head_dim, order, to_pairs);
  ANTKV_LAUNCH_CHECK("permute_kernel");
}

}  // namespace antkv::cuda
