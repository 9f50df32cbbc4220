#include "kernels/attention/uniform_decode.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/attention/split_combine.cuh"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_utils.cuh"

namespace antkv {
namespace cuda {

namespace {

constexpr int kSplitAlign = 128;  // split lengths are multiples of this (and so of every group and tile)
constexpr int kMaxSplits = 1024;  // splits per (sequence, KV head); the last one also takes the residual
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kTileTokens = 16 * kWarps;  // tokens per block step: 16 per warp (the mma's M)
constexpr int kStages = 3;                // tiles in flight (cp.async)
constexpr int kHeads = 8;                 // query heads per block: the mma's N (padded with zero queries)
constexpr int kBlocksPerSm = 4;           // resident split blocks aimed at (launch bounds: <= 128 registers)
constexpr float kLog2e = 1.4426950408889634f;

using dev::combine_splits;
using dev::split_combine_smem_floats;

// Shared-memory plan of one split block (32-bit words). RS: a code row's stride, padded so the rows that one
// LDS.128 of a warp reads (8 consecutive rows for the keys, 4 rows two apart for the values) fall in distinct
// bank groups.
template <int D, int BITS, int GROUP>
struct UniformTile {
  static constexpr int WPT = D * BITS / 32;                       // code words per token
  static constexpr int RS = (WPT % 16 == 4 || WPT % 16 == 12) ? WPT : WPT + 4;
  static constexpr int KSTEPS = D / 16;                           // k steps of the score mma, m tiles of the value mma
  static constexpr int VGS = GROUP < D ? GROUP : D, NVG = D / VGS;  // value channel groups
  static constexpr int TILE_BLOCKS = GROUP < kTileTokens ? kTileTokens / GROUP : 1;  // key blocks a tile touches
  // one stage: key code rows, value code rows, key (scale, zero) per block and channel, value (scale, zero)
  static constexpr int K_WORDS = kTileTokens * RS, V_WORDS = kTileTokens * RS;
  static constexpr int KSZ_WORDS = TILE_BLOCKS * D, VSZ_WORDS = kTileTokens * NVG;
  static constexpr int STAGE_WORDS = K_WORDS + V_WORDS + KSZ_WORDS + VSZ_WORDS;
  static constexpr int P_STRIDE = 12;  // sP rows (one per token): 8 heads + 4 pad, conflict-free transposed reads
  // fixed part: sQ [kHeads][D] f32, sQS [TILE_BLOCKS][KSTEPS][32 lanes] uint2, sQZ [TILE_BLOCKS][kHeads] f32,
  // sP [kWarps][16][P_STRIDE] f32
  static constexpr int Q_WORDS = kHeads * D, QS_WORDS = TILE_BLOCKS * KSTEPS * 64, QZ_WORDS = TILE_BLOCKS * kHeads;
  static constexpr int P_WORDS = kWarps * 16 * P_STRIDE;
  // after the last tile the stages' words hold the warps' records: O [kWarps][kHeads][D], (m, l) [kWarps][kHeads]
  static constexpr int MERGE_WORDS = kWarps * kHeads * (D + 2);
  // and, in the last split, the residual's fp16 value rows [kWarps][16][D + 8]
  static constexpr int RESID_WORDS = kWarps * 16 * (D + 8) / 2;
  static constexpr int MAX2 = MERGE_WORDS > RESID_WORDS ? MERGE_WORDS : RESID_WORDS;
  static constexpr int STAGES_WORDS = kStages * STAGE_WORDS > MAX2 ? kStages * STAGE_WORDS : MAX2;
  static constexpr int WORDS = STAGES_WORDS + Q_WORDS + QS_WORDS + QZ_WORDS + P_WORDS;
  static constexpr size_t BYTES = static_cast<size_t>(WORDS) * 4;
  static_assert(RS % 4 == 0, "code rows are copied and read 16 bytes at a time");
};

// The channel of a score k step's operand: k step j, register reg (0: k = 2q, 2q+1; 1: k = 2q + 8, 2q + 9), lane
// quad index q, half hi. Chosen so one register's two halves come from one code word with one mask: 2-bit
// channel c sits at bits 2c of word c / 16, so bits 4q and 4q + 16 (after >> 4q) hold channels 2q and 2q + 8
// (reg 0), bits 4q + 2 and 4q + 18 channels 2q + 1 and 2q + 9 (reg 1); 4-bit channel c at bits 4(c % 8) of word
// c / 8: word 2j (reg 0) or 2j + 1 (reg 1), channels q and q + 4 at bits 4q, 4q + 16.
template <int BITS>
__host__ __device__ __forceinline__ int key_channel(int j, int reg, int q, int hi) {
  return BITS == 2 ? 16 * j + 2 * q + reg + 8 * hi : 16 * j + 8 * reg + q + 4 * hi;
}
// The channel of row `row` (0..15) of the value mma's m tile mt (rows r and r + 8 are one register's halves:
// 2-bit word mt holds channels r, r + 8 at bits 2r, 2r + 16; 4-bit word 2 mt + r / 4 holds channels
// 8 (r / 4) + r % 4 and + 4 at bits 4 (r % 4), + 16).
template <int BITS>
__host__ __device__ __forceinline__ int value_channel(int mt, int row) {
  if (BITS == 2) return 16 * mt + row;
  const int rr = row & 7;
  return 16 * mt + 8 * (rr >> 2) + (rr & 3) + 4 * (row >> 3);
}

// One (sequence, KV head)'s streams in the layout of uniform_cache.h (bk = sequence * n_kv_heads + KV head).
struct UniformHeadStreams {
  const uint32_t* kc;  // [KB * group, WPT] key codes
  const __half2* ksz;  // [KB, D] key (scale, zero)
  const uint32_t* vc;  // [capacity, WPT] value codes
  const __half2* vsz;  // [capacity, NVG] value (scale, zero)
  const __half* rk;    // [group + window, D] FP16 residual keys
  const __half* rv;    // [group + window, D] FP16 residual values
};
template <int D, int BITS>
__device__ __forceinline__ UniformHeadStreams uniform_head_streams(const UniformDecodeParams& p, int64_t bk, int group) {
  constexpr int WPT = D * BITS / 32;
  const int KB = (p.capacity + group - 1) / group, R = group + p.window, nvg = D / min(group, D);
  return {p.k_codes + bk * KB * group * WPT, p.k_sz + bk * KB * D, p.v_codes + bk * p.capacity * WPT,
          p.v_sz + bk * p.capacity * nvg, p.ring_k + bk * R * D, p.ring_v + bk * R * D};
}

// Per-warp online softmax of one 16-token step. sc: scores^T fragments in log2 units ([token r][head 2q],
// [r][2q + 1], [r + 8][2q], [r + 8][2q + 1]; -inf for no token), replaced by p. m, l: running max and this
// lane's partial sums of heads 2q, 2q + 1; o, oz rescaled.
template <int MT, int NVG>
__device__ __forceinline__ void softmax_step(float (&sc)[4], float (&m)[2], float (&l)[2], float (&o)[MT][4],
                                             float (&oz)[NVG][2]) {
  float mx0 = fmaxf(sc[0], sc[2]), mx1 = fmaxf(sc[1], sc[3]);
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {  // the 8 lanes of a quad index hold the 16 tokens of heads 2q, 2q+1
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
  const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;  // no token yet: p = 0
  const float a0 = exp2f(m[0] - ms0), a1 = exp2f(m[1] - ms1);
  m[0] = mn0, m[1] = mn1;
  sc[0] = exp2f(sc[0] - ms0), sc[2] = exp2f(sc[2] - ms0);
  sc[1] = exp2f(sc[1] - ms1), sc[3] = exp2f(sc[3] - ms1);
  l[0] = l[0] * a0 + sc[0] + sc[2];
  l[1] = l[1] * a1 + sc[1] + sc[3];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) o[mt][0] *= a0, o[mt][1] *= a1, o[mt][2] *= a0, o[mt][3] *= a1;
#pragma unroll
  for (int g = 0; g < NVG; ++g) oz[g][0] *= a0, oz[g][1] *= a1;
}

// One block of 4 warps per (split, KV head x up to 8 query heads, sequence). Split s takes the quantized key
// blocks' tokens [s * split_len, min(k_end, (s + 1) * split_len)) in tiles of 64 tokens, warp w the tile's
// tokens 16w .. 16w + 15 with its own running max / sum / output (merged at the end); the last split then also
// takes the residual [k_end, len) (FP16 keys; values quantized below v_end, FP16 above) in 16-token steps whose
// operands are read element by element (at most group + window tokens). The split's record (O unnormalized, m,
// l in log2 units) goes to the workspace for uniform_combine_kernel.
template <int D, int BITS, int GROUP>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) uniform_split_kernel(const UniformDecodeParams p) {
  using TS = UniformTile<D, BITS, GROUP>;
  constexpr int WPT = TS::WPT, RS = TS::RS, KS = TS::KSTEPS, MT = TS::KSTEPS, NVG = TS::NVG, VGS = TS::VGS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  extern __shared__ __align__(16) uint32_t smem[];
  float* sQ = reinterpret_cast<float*>(smem + TS::STAGES_WORDS);  // [kHeads][D] q scale log2e (0: padding)
  uint2* sQS = reinterpret_cast<uint2*>(sQ + TS::Q_WORDS);  // [TILE_BLOCKS][KS][32]: lane's (b0b1, b2b3) of q_c s_c
  float* sQZ = reinterpret_cast<float*>(sQS + TS::QS_WORDS / 2);  // [TILE_BLOCKS][kHeads] q . z
  float* sP = sQZ + TS::QZ_WORDS + (threadIdx.x >> 5) * 16 * TS::P_STRIDE;  // this warp's [16 tokens][P_STRIDE]

  const int split = blockIdx.x, b = blockIdx.z;
  const int G = p.n_heads / p.n_kv_heads, hblocks = (G + kHeads - 1) / kHeads;
  const int kvh = blockIdx.y / hblocks, hb = blockIdx.y % hblocks;
  const int h0 = kvh * G + hb * kHeads, hcount = min(kHeads, G - hb * kHeads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, r = lane >> 2, q = lane & 3;
  const int len = p.lens[b];
  if (len < 1 || len > p.capacity) return;  // uniform_combine_kernel writes NaN for this sequence
  const int R = GROUP + p.window;
  const UniformCounts cn = uniform_counts(len, GROUP, p.window);
  const UniformHeadStreams st = uniform_head_streams<D, BITS>(p, static_cast<int64_t>(b) * p.n_kv_heads + kvh, GROUP);
  const uint32_t *kc = st.kc, *vc = st.vc;
  const __half2 *ksz = st.ksz, *vsz = st.vsz;
  const __half *rk = st.rk, *rv = st.rv;

  auto stage_k = [&](int s) { return smem + s * TS::STAGE_WORDS; };
  auto stage_v = [&](int s) { return smem + s * TS::STAGE_WORDS + TS::K_WORDS; };
  auto stage_ksz = [&](int s) { return reinterpret_cast<__half2*>(smem + s * TS::STAGE_WORDS + 2 * TS::K_WORDS); };
  auto stage_vsz = [&](int s) {
    return reinterpret_cast<__half2*>(smem + s * TS::STAGE_WORDS + 2 * TS::K_WORDS + TS::KSZ_WORDS);
  };
  // the quantized tile at tb (n tokens, a multiple of min(GROUP, 64)) into stage s
  auto prefetch = [&](int tb, int n, int s) {
    constexpr int C = WPT / 4;  // 16-byte chunks per code row
    const uint4* srck = reinterpret_cast<const uint4*>(kc + static_cast<int64_t>(tb) * WPT);
    const uint4* srcv = reinterpret_cast<const uint4*>(vc + static_cast<int64_t>(tb) * WPT);
    uint32_t* dk = stage_k(s);
    uint32_t* dv = stage_v(s);
    for (int e = tid; e < n * C; e += kThreads) {
      dev::cp_async_16(dk + (e / C) * RS + (e % C) * 4, srck + e, true);
      dev::cp_async_16(dv + (e / C) * RS + (e % C) * 4, srcv + e, true);
    }
    const int nb = (n + GROUP - 1) / GROUP;
    const uint4* srcs = reinterpret_cast<const uint4*>(ksz + static_cast<int64_t>(tb / GROUP) * D);
    for (int e = tid; e < nb * D / 4; e += kThreads) dev::cp_async_16(stage_ksz(s) + 4 * e, srcs + e, true);
    // (4-byte copies: a sequence's value scales start at capacity * NVG records, not 16-byte aligned)
    for (int e = tid; e < n * NVG; e += kThreads) dev::cp_async_4(stage_vsz(s) + e, vsz + static_cast<int64_t>(tb) * NVG + e);
  };

  for (int e = tid; e < kHeads * D; e += kThreads) {
    const int h = e / D;
    sQ[e] = h < hcount
                ? __bfloat162float(p.q[(static_cast<int64_t>(b) * p.n_heads + h0 + h) * D + e % D]) * p.scale * kLog2e
                : 0.f;
  }
  float o[MT][4], oz[NVG][2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
#pragma unroll
  for (int g = 0; g < NVG; ++g) oz[g][0] = oz[g][1] = 0.f;

  // P (this lane's scores^T fragment, already p) to the value mma's B operand: head r, tokens 2q, 2q + 1,
  // 2q + 8, 2q + 9 of the step, through the warp's sP.
  auto transpose_p = [&](const float (&sc)[4], float (&pt)[4]) {
    __syncwarp();  // the previous step's reads of sP are done
    sP[r * TS::P_STRIDE + 2 * q] = sc[0];
    sP[r * TS::P_STRIDE + 2 * q + 1] = sc[1];
    sP[(r + 8) * TS::P_STRIDE + 2 * q] = sc[2];
    sP[(r + 8) * TS::P_STRIDE + 2 * q + 1] = sc[3];
    __syncwarp();
    pt[0] = sP[(2 * q) * TS::P_STRIDE + r];
    pt[1] = sP[(2 * q + 1) * TS::P_STRIDE + r];
    pt[2] = sP[(2 * q + 8) * TS::P_STRIDE + r];
    pt[3] = sP[(2 * q + 9) * TS::P_STRIDE + r];
  };

  // ---- quantized tiles ----
  const int t0 = split * p.split_len, t1 = min(cn.k_end, t0 + p.split_len);
  const int ntiles = t0 < t1 ? (t1 - t0 + kTileTokens - 1) / kTileTokens : 0;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) prefetch(t0 + s * kTileTokens, min(kTileTokens, t1 - t0 - s * kTileTokens), s);
    dev::cp_async_commit();
  }
  int qs_block = -1;  // the first key block whose q_c s_c fragments sQS holds (block-uniform)
  for (int it = 0; it < ntiles; ++it) {
    const int tb = t0 + it * kTileTokens, n = min(kTileTokens, t1 - tb), s = it % kStages;
    dev::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile it visible to the block; every warp is done with tile it - 1 (its stage, sQS)
    {
      const int nx = it + kStages - 1;
      if (nx < ntiles) prefetch(t0 + nx * kTileTokens, min(kTileTokens, t1 - t0 - nx * kTileTokens), nx % kStages);
      dev::cp_async_commit();
    }
    const int blk0 = tb / GROUP;
    if (blk0 != qs_block) {  // new key block(s): their q_c s_c fragments and q . z
      const __half2* kz = stage_ksz(s);
      const int nb = (n + GROUP - 1) / GROUP;
      for (int e = tid; e < nb * KS * 64; e += kThreads) {
        const int bi = e / (KS * 64), j = e / 64 % KS, L = e % 64 / 2, reg = e % 2, hn = L >> 2, qq = L & 3;
        const int c0 = key_channel<BITS>(j, reg, qq, 0), c1 = key_channel<BITS>(j, reg, qq, 1);
        const float v0 = sQ[hn * D + c0] * __low2float(kz[bi * D + c0]);
        const float v1 = sQ[hn * D + c1] * __low2float(kz[bi * D + c1]);
        reinterpret_cast<uint32_t*>(sQS)[e] = dev::pack_half2(v0, v1);
      }
      for (int e = warp; e < nb * kHeads; e += kWarps) {
        const int bi = e / kHeads, h = e % kHeads;
        float acc = 0.f;
        for (int c = lane; c < D; c += 32) acc = fmaf(sQ[h * D + c], __high2float(kz[bi * D + c]), acc);
        acc = dev::warp_sum(acc);
        if (lane == 0) sQZ[e] = acc;
      }
      __syncthreads();
      qs_block = blk0;
    }
    const int c0 = 16 * warp;  // the warp's first token in the tile
    if (c0 >= n) continue;     // warp-uniform (n is a multiple of 32)
    const int bi = (tb + c0) / GROUP - blk0;
    // scores^T = codes x (q s)^T
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
    {
      const uint32_t* kr = stage_k(s) + (c0 + r) * RS;
      const uint2* qs = sQS + bi * KS * 32 + lane;
      constexpr int KS_PER_CHUNK = BITS == 2 ? 4 : 2;  // k steps per 16-byte chunk of a code row
#pragma unroll
      for (int u = 0; u < WPT / 4; ++u) {  // chunk u of the code rows of tokens r and r + 8
        const uint4 u0 = *reinterpret_cast<const uint4*>(kr + 4 * u);
        const uint4 u1 = *reinterpret_cast<const uint4*>(kr + 8 * RS + 4 * u);
        const uint32_t w0[4] = {u0.x, u0.y, u0.z, u0.w}, w1[4] = {u1.x, u1.y, u1.z, u1.w};
#pragma unroll
        for (int k = 0; k < KS_PER_CHUNK; ++k) {
          const uint2 bq = qs[(u * KS_PER_CHUNK + k) * 32];
          uint32_t a[4];
          if (BITS == 2) {
            const uint32_t x0 = w0[k] >> (4 * q), x1 = w1[k] >> (4 * q);
            a[0] = dev::sub_1024(dev::codes_plus_1024(x0, 0x00030003u));
            a[1] = dev::sub_1024(dev::codes_plus_1024(x1, 0x00030003u));
            a[2] = dev::sub_1024_quarter(dev::codes_plus_1024(x0, 0x000C000Cu));
            a[3] = dev::sub_1024_quarter(dev::codes_plus_1024(x1, 0x000C000Cu));
          } else {
            a[0] = dev::sub_1024(dev::codes_plus_1024(w0[2 * k] >> (4 * q), 0x000F000Fu));
            a[1] = dev::sub_1024(dev::codes_plus_1024(w1[2 * k] >> (4 * q), 0x000F000Fu));
            a[2] = dev::sub_1024(dev::codes_plus_1024(w0[2 * k + 1] >> (4 * q), 0x000F000Fu));
            a[3] = dev::sub_1024(dev::codes_plus_1024(w1[2 * k + 1] >> (4 * q), 0x000F000Fu));
          }
          dev::mma_f16_16816(sc, a, bq.x, bq.y);
        }
      }
      const float qz0 = sQZ[bi * kHeads + 2 * q], qz1 = sQZ[bi * kHeads + 2 * q + 1];
      sc[0] += qz0, sc[1] += qz1, sc[2] += qz0, sc[3] += qz1;
    }
    softmax_step<MT, NVG>(sc, m, l, o, oz);
    // the zero points' term: sum_t p_t z_t per value group (tokens r, r + 8 of the step)
    const __half2* vz = stage_vsz(s) + (c0 + r) * NVG;
#pragma unroll
    for (int g = 0; g < NVG; ++g) {
      const float z0 = __high2float(vz[g]), z1 = __high2float(vz[8 * NVG + g]);
      oz[g][0] += sc[0] * z0 + sc[2] * z1;
      oz[g][1] += sc[1] * z0 + sc[3] * z1;
    }
    // out^T += codes^T x (p s)^T
    float pt[4];
    transpose_p(sc, pt);
    const __half2* vzt = stage_vsz(s) + c0 * NVG;
    uint32_t bv[NVG][2];
#pragma unroll
    for (int g = 0; g < NVG; ++g) {
      bv[g][0] = dev::pack_half2(pt[0] * __low2float(vzt[(2 * q) * NVG + g]), pt[1] * __low2float(vzt[(2 * q + 1) * NVG + g]));
      bv[g][1] = dev::pack_half2(pt[2] * __low2float(vzt[(2 * q + 8) * NVG + g]), pt[3] * __low2float(vzt[(2 * q + 9) * NVG + g]));
    }
    const uint32_t* vr = stage_v(s) + c0 * RS;
#pragma unroll
    for (int u = 0; u < WPT / 4; ++u) {  // 16-byte chunk u of the rows of tokens 2q, 2q + 1, 2q + 8, 2q + 9
      const uint4 xa = *reinterpret_cast<const uint4*>(vr + (2 * q) * RS + 4 * u);
      const uint4 xb = *reinterpret_cast<const uint4*>(vr + (2 * q + 1) * RS + 4 * u);
      const uint4 xc = *reinterpret_cast<const uint4*>(vr + (2 * q + 8) * RS + 4 * u);
      const uint4 xd = *reinterpret_cast<const uint4*>(vr + (2 * q + 9) * RS + 4 * u);
      const uint32_t wa[4] = {xa.x, xa.y, xa.z, xa.w}, wb[4] = {xb.x, xb.y, xb.z, xb.w};
      const uint32_t wc[4] = {xc.x, xc.y, xc.z, xc.w}, wd[4] = {xd.x, xd.y, xd.z, xd.w};
      constexpr int MT_PER_CHUNK = BITS == 2 ? 4 : 2;
#pragma unroll
      for (int k = 0; k < MT_PER_CHUNK; ++k) {
        const int mt = u * MT_PER_CHUNK + k;
        // the word of this m tile holding rows r, r + 8, and their shift
        uint32_t ya, yb, yc, yd, sh;
        if (BITS == 2) {
          ya = wa[k], yb = wb[k], yc = wc[k], yd = wd[k], sh = 2 * r;
        } else {
          const bool up = r >= 4;
          ya = up ? wa[2 * k + 1] : wa[2 * k], yb = up ? wb[2 * k + 1] : wb[2 * k];
          yc = up ? wc[2 * k + 1] : wc[2 * k], yd = up ? wd[2 * k + 1] : wd[2 * k];
          sh = 4 * (r & 3);
        }
        const uint32_t ea = dev::codes_plus_1024(ya >> sh, MASK | (MASK << 16));
        const uint32_t eb = dev::codes_plus_1024(yb >> sh, MASK | (MASK << 16));
        const uint32_t ec = dev::codes_plus_1024(yc >> sh, MASK | (MASK << 16));
        const uint32_t ed = dev::codes_plus_1024(yd >> sh, MASK | (MASK << 16));
        uint32_t a[4];
        a[0] = dev::sub_1024(__byte_perm(ea, eb, 0x5410));  // row r: tokens 2q, 2q + 1
        a[1] = dev::sub_1024(__byte_perm(ea, eb, 0x7632));  // row r + 8
        a[2] = dev::sub_1024(__byte_perm(ec, ed, 0x5410));  // row r: tokens 2q + 8, 2q + 9
        a[3] = dev::sub_1024(__byte_perm(ec, ed, 0x7632));
        dev::mma_f16_16816(o[mt], a, bv[16 * mt / VGS][0], bv[16 * mt / VGS][1]);  // an m tile lies in one group
      }
    }
  }

  // ---- the residual (last split): 16-token steps per warp; keys read as fp16 pairs in the natural channel
  // order (the q operand built to match), values staged as fp16 rows in the warp's part of the stages ----
  if (split == p.n_splits - 1) {  // block-uniform
    dev::cp_async_wait<0>();
    __syncthreads();  // every warp is done with the stages
    constexpr int VR = D + 8;  // staged value row stride (halves)
    __half* sV = reinterpret_cast<__half*>(smem) + warp * 16 * VR;
    for (int cb = cn.k_end + 16 * warp; cb < len; cb += 16 * kWarps) {
      float sc[4] = {0.f, 0.f, 0.f, 0.f};
      const int ta = cb + r, tc = cb + r + 8;
      const __half2* ka = reinterpret_cast<const __half2*>(rk + static_cast<int64_t>(ta % R) * D);
      const __half2* kb = reinterpret_cast<const __half2*>(rk + static_cast<int64_t>(tc % R) * D);
      const __half2 zero2 = __float2half2_rn(0.f);
#pragma unroll
      for (int j = 0; j < KS; ++j) {
        const int c = 16 * j + 2 * q;  // a0a1 / b0b1: channels c, c + 1; a4a5 / b2b3: c + 8, c + 9
        __half2 x[4] = {ta < len ? ka[c / 2] : zero2, tc < len ? kb[c / 2] : zero2, ta < len ? ka[c / 2 + 4] : zero2,
                        tc < len ? kb[c / 2 + 4] : zero2};
        const uint32_t a[4] = {*reinterpret_cast<uint32_t*>(&x[0]), *reinterpret_cast<uint32_t*>(&x[1]),
                               *reinterpret_cast<uint32_t*>(&x[2]), *reinterpret_cast<uint32_t*>(&x[3])};
        const uint32_t b0 = dev::pack_half2(sQ[r * D + c], sQ[r * D + c + 1]);
        const uint32_t b1 = dev::pack_half2(sQ[r * D + c + 8], sQ[r * D + c + 9]);
        dev::mma_f16_16816(sc, a, b0, b1);
      }
      if (ta >= len) sc[0] = sc[1] = -INFINITY;
      if (tc >= len) sc[2] = sc[3] = -INFINITY;
      softmax_step<MT, NVG>(sc, m, l, o, oz);
      float pt[4];
      transpose_p(sc, pt);
      const uint32_t b0 = dev::pack_half2(pt[0], pt[1]), b1 = dev::pack_half2(pt[2], pt[3]);
      // the step's values as fp16 rows: dequantized below v_end, FP16 above, 0 past the length
      for (int e = lane; e < 16 * D / 2; e += 32) {
        const int tt = e / (D / 2), c = 2 * (e % (D / 2)), t = cb + tt;
        float2 v = make_float2(0.f, 0.f);
        if (t < cn.v_end) {
          const uint32_t word = vc[static_cast<int64_t>(t) * WPT + c * BITS / 32] >> (c * BITS % 32);
          const float2 sz = __half22float2(vsz[static_cast<int64_t>(t) * NVG + c / VGS]);
          v = make_float2(static_cast<float>(word & MASK) * sz.x + sz.y,
                          static_cast<float>((word >> BITS) & MASK) * sz.x + sz.y);
        } else if (t < len) {
          v = __half22float2(*reinterpret_cast<const __half2*>(rv + static_cast<int64_t>(t % R) * D + c));
        }
        *reinterpret_cast<__half2*>(sV + tt * VR + c) = __float22half2_rn(v);
      }
      __syncwarp();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int ch0 = value_channel<BITS>(mt, r), ch1 = value_channel<BITS>(mt, r + 8);
        uint32_t a[4];
        a[0] = dev::pack_halves(sV[(2 * q) * VR + ch0], sV[(2 * q + 1) * VR + ch0]);
        a[1] = dev::pack_halves(sV[(2 * q) * VR + ch1], sV[(2 * q + 1) * VR + ch1]);
        a[2] = dev::pack_halves(sV[(2 * q + 8) * VR + ch0], sV[(2 * q + 9) * VR + ch0]);
        a[3] = dev::pack_halves(sV[(2 * q + 8) * VR + ch1], sV[(2 * q + 9) * VR + ch1]);
        dev::mma_f16_16816(o[mt], a, b0, b1);
      }
      __syncwarp();  // the rows are read before the next step writes them
    }
  }

  // ---- the split's record: lanes, then warps merged ----
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], off);
    l[1] += __shfl_xor_sync(0xffffffffu, l[1], off);
#pragma unroll
    for (int g = 0; g < NVG; ++g) {
      oz[g][0] += __shfl_xor_sync(0xffffffffu, oz[g][0], off);
      oz[g][1] += __shfl_xor_sync(0xffffffffu, oz[g][1], off);
    }
  }
  dev::cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages (their last cp.async groups were empty or consumed)
  float* sO = reinterpret_cast<float*>(smem);  // [kWarps][kHeads][D]
  float* sML = sO + kWarps * kHeads * D;       // [kWarps][kHeads][2]
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int ch = value_channel<BITS>(mt, (k >> 1) * 8 + r), h = 2 * q + (k & 1);
      sO[(warp * kHeads + h) * D + ch] = o[mt][k] + oz[16 * mt / VGS][k & 1];
    }
  if (r == 0) {
    sML[(warp * kHeads + 2 * q) * 2] = m[0], sML[(warp * kHeads + 2 * q) * 2 + 1] = l[0];
    sML[(warp * kHeads + 2 * q + 1) * 2] = m[1], sML[(warp * kHeads + 2 * q + 1) * 2 + 1] = l[1];
  }
  __syncthreads();
  const int NS = p.n_splits;
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * NS * D;
  for (int e = tid; e < hcount * D; e += kThreads) {
    const int h = e / D, c = e % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sML[(w * kHeads + h) * 2]);
    float acc = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = sML[(w * kHeads + h) * 2];
      const float wt = mw == -INFINITY ? 0.f : exp2f(mw - M);
      acc += sO[(w * kHeads + h) * D + c] * wt;
      L += sML[(w * kHeads + h) * 2 + 1] * wt;
    }
    const int64_t slot = (static_cast<int64_t>(b) * p.n_heads + h0 + h) * NS + split;
    wo[slot * D + c] = acc;
    if (c == 0) wml[slot * 2] = M, wml[slot * 2 + 1] = L;
  }
}

#include "kernels/attention/uniform_split_cuda_core.cuh"

// One block of D threads per (head, sequence): the splits merged by the fp16 decode's combine step.
template <int D>
__global__ void __launch_bounds__(D) uniform_combine_kernel(const UniformDecodeParams p) {
  __shared__ float smem[split_combine_smem_floats(1, kMaxSplits)];
  const int h = blockIdx.x, b = blockIdx.y, c = threadIdx.x;
  const int len = p.lens[b];
  const int64_t bh = static_cast<int64_t>(b) * p.n_heads + h;
  const UniformCounts cn = uniform_counts(len, p.group, p.window);
  if (len < 1 || len > p.capacity || static_cast<int64_t>(p.n_splits) * p.split_len < cn.k_end) {
    p.out[bh * D + c] = __float2bfloat16_rn(NAN);  // an empty sequence, or a plan made for a shorter one
    if (p.lse && c == 0) p.lse[bh] = NAN;
    return;
  }
  combine_splits<D, D>(p.workspace, static_cast<int64_t>(p.batch) * p.n_heads, p.n_splits, bh, 1, p.n_splits, smem,
                       p.out, p.lse);
}

template <int D, int BITS, int GROUP>
void launch_split(const UniformDecodeParams& p, cudaStream_t stream) {
  using TS = UniformTile<D, BITS, GROUP>;
  // within the default 48 KB of dynamic shared memory (no opt-in, nothing to set before a graph capture)
  static_assert(TS::BYTES <= 48 * 1024, "the split kernel's shared memory needs an opt-in");
  const int G = p.n_heads / p.n_kv_heads;
  const dim3 grid(p.n_splits, p.n_kv_heads * ((G + kHeads - 1) / kHeads), p.batch);
  uniform_split_kernel<D, BITS, GROUP><<<grid, kThreads, TS::BYTES, stream>>>(p);
  ANTKV_LAUNCH_CHECK("uniform_split_kernel");
}

template <int D, int BITS, int HT>
void launch_split_cuda_core(const UniformDecodeParams& p, cudaStream_t stream) {
  const int G = p.n_heads / p.n_kv_heads;
  const dim3 grid(p.n_splits, p.n_kv_heads * (G / HT), p.batch);
  uniform_split_cuda_core_kernel<D, BITS, HT><<<grid, kTileCC, 0, stream>>>(p);
  ANTKV_LAUNCH_CHECK("uniform_split_cuda_core_kernel");
}

template <int D, int BITS>
void launch_split_group(const UniformDecodeParams& p, cudaStream_t stream) {
  if (p.kernel == UniformDecodeKernel::kCudaCore) {  // HT query heads per block: 4, 2 or 1 dividing G
    const int G = p.n_heads / p.n_kv_heads;
    if (G % 4 == 0) launch_split_cuda_core<D, BITS, 4>(p, stream);
    else if (G % 2 == 0) launch_split_cuda_core<D, BITS, 2>(p, stream);
    else launch_split_cuda_core<D, BITS, 1>(p, stream);
    return;
  }
  if (p.group == 32) launch_split<D, BITS, 32>(p, stream);
  else if (p.group == 64) launch_split<D, BITS, 64>(p, stream);
  else launch_split<D, BITS, 128>(p, stream);
}

int64_t head_blocks(int G) { return (G + kHeads - 1) / kHeads; }

}  // namespace

const char* uniform_decode_kernel_name(UniformDecodeKernel k) {
  return k == UniformDecodeKernel::kCudaCore ? "cuda-core" : "tensor-core";
}

UniformDecodeKernel parse_uniform_decode_kernel(const std::string& name) {
  if (name == "tensor-core") return UniformDecodeKernel::kTensorCore;
  if (name == "cuda-core") return UniformDecodeKernel::kCudaCore;
  throw Error(fmt::format("unknown uniform decode kernel \"{}\" (tensor-core or cuda-core)", name));
}

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
  plan.heads_per_block = std::min(G, kHeads);
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads * head_blocks(G);
  const int64_t want = static_cast<int64_t>(kBlocksPerSm) * device_sm_count();
  int64_t n_splits = std::clamp<int64_t>(want / units, 1, kMaxSplits);
  int64_t split_len = (std::max<int64_t>(max_kend, 1) + n_splits - 1) / n_splits;
  split_len = std::max<int64_t>(kSplitAlign, (split_len + kSplitAlign - 1) / kSplitAlign * kSplitAlign);
  n_splits = std::max<int64_t>(1, (max_kend + split_len - 1) / split_len);
  ANTKV_CHECK(n_splits <= kMaxSplits && split_len <= INT32_MAX, "plan_uniform_decode: {} tokens need {} splits", max_kend,
              n_splits);
  plan.n_splits = static_cast<int>(n_splits);
  plan.split_len = static_cast<int>(split_len);
  return plan;
}

int uniform_decode_max_splits(int batch, int n_heads, int n_kv_heads) {
  // plan_uniform_decode's first estimate: rounding the split length up only lowers the count
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads * head_blocks(n_heads / n_kv_heads);
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
  ANTKV_CHECK(p.n_splits >= 1 && p.n_splits <= kMaxSplits && p.split_len > 0 && p.split_len % kSplitAlign == 0,
              "{}: bad split plan ({} splits of {} tokens)", what, p.n_splits, p.split_len);
  ANTKV_CHECK(p.workspace_floats >= uniform_decode_workspace_floats(p.batch, p.n_heads, p.head_dim, p.n_splits),
              "{}: workspace of {} floats is too small", what, p.workspace_floats);
  ANTKV_CHECK(static_cast<int64_t>(p.n_kv_heads) * head_blocks(p.n_heads / p.n_kv_heads) <= 65535, "{}: too many heads",
              what);
  if (p.head_dim == 128) {
    if (p.bits == 2) launch_split_group<128, 2>(p, stream);
    else launch_split_group<128, 4>(p, stream);
    uniform_combine_kernel<128><<<dim3(p.n_heads, p.batch), 128, 0, stream>>>(p);
  } else {
    if (p.bits == 2) launch_split_group<64, 2>(p, stream);
    else launch_split_group<64, 4>(p, stream);
    uniform_combine_kernel<64><<<dim3(p.n_heads, p.batch), 64, 0, stream>>>(p);
  }
  ANTKV_LAUNCH_CHECK("uniform_combine_kernel");
}

}  // namespace cuda
}  // namespace antkv
