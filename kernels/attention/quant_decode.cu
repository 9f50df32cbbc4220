// Decode attention over a vector-quantized KV cache and the quantize kernel (layout and method: quant_decode.h).
//
// Split kernel, one block of NT threads (256, or 512 when only one block fits on a multiprocessor) per (split,
// KV head x head tile, sequence):
//  1. q (HT heads) -> shared, scaled by scale*log2(e); bins zeroed; the first tile's codes are requested
//     from memory before the LUT is built so that their latency overlaps the build.
//  2. LUT[code][group][0..HT) = q_group . key_centroid (fp32, or fp16 for c16b12 / lut_half).
//  3. The block's stretch of the code stream, in tiles of 1024 slots (thread tid takes slots tile_base +
//     u*NT + tid, so lane = slot mod 32), the next tile's records in flight in registers while this one is
//     processed:
//     - score of each slot and head: sum over the NG record positions i of LUT[code_i][i ^ lane_g] (lane_g =
//       lane mod NG; records are XOR-swizzled by slot). Per position i the lanes of a quarter warp read 8
//       distinct groups: for HT=4 fp32 entries (16 bytes) these are 8 distinct bank quads (a LUT row is
//       NG*16 bytes, a multiple of 128): no bank conflicts. The address is (code << row_shift) | (lane
//       constant ^ compile-time constant): one byte permute and one LOP3.
//     - per tile, the block's maximum score per head (warp max, one barrier); when a score would make a
//       weight larger than 2^16 the reference m is raised so that the tile's maximum weighs 2^14 and the
//       bins are rescaled (rare: log of the number of tiles for i.i.d. scores).
//     - weight F = floor(exp2(s - m) + d), d a per-(slot, head) hash dither in (0, 1): E[F] = exp2(s - m).
//       F <= 2^16 and a split has <= 32768 slots, so a u32 bin never overflows.
//     - bins[code][head][group] += F (shared-memory integer atomics). At instruction (j1, j0) a lane adds
//       head j1*Q + (j0 ^ kappa), kappa = (lane / NG) mod Q, Q = min(32/NG, HT), so the 32 lanes of an
//       instruction hit 32 distinct banks when NG*HT >= 32.
//  4. The block's share of the sequence's FP16 tokens (anchors then window; split s takes the s-th
//     ceil(n/n_splits) of them): 8 warps, warp per token, lanes over channels, online softmax per warp.
//  5. O_q[head][group*c + j] = sum_code bins[code][head][group] * value_centroid[group][code][j] (warps over
//     codes, lanes over (group, code)), L_q = sum_code bins[code][head][0]; merged with the FP16 partials
//     (log-sum-exp) into the split's unnormalized O, max and sum in the workspace.
// Reduction: one block of head_dim threads per (head, sequence) merges the splits (programmatic dependent
// launch, as flash_decode's).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/common/cuda_check.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/attention/quant_decode.h"
#include "kernels/attention/quant_decode_device.cuh"
#include "kernels/attention/split_combine.cuh"

namespace antkv::cuda {
namespace {

using namespace dev;

constexpr int kTile = 1024;          // code-stream slots per tile (threads x slots per thread)
constexpr int kFW = 8;               // warps that take the FP16 tokens
constexpr int kFMaxBits = 16;        // weights F <= 2^16
constexpr int kSlack = 2;            // after a rescale the tile maximum weighs 2^(16-2)
constexpr int kMaxSplitLen = 32768;  // 32768 * 2^16 = 2^31: a u32 bin cannot overflow
constexpr float kLn2 = 0.6931471805599453f;  // scores are kept in log2 units (q * scale * log2(e))

constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }

// EX_: the coded-transform instantiation (per-token scales, rotated query and values: QuantDecodeParams q_rot ..
// v_mean); the plain one (EX_ = false) is the code without them.
template <int D_, int C_, int NB_, int HT_, bool LH_, bool EX_ = false>
struct QCfg {
  static constexpr int D = D_, C = C_, NB = NB_, HT = HT_;
  static constexpr bool LUT_HALF = LH_, EX = EX_;
  static constexpr int NG = D / C;
  static constexpr int K = 1 << NB;
  static constexpr int REC = NG * NB / 8;
  static constexpr int NWD = (REC + 3) / 4;
  static constexpr int Q = cmin(32 / NG, HT);
  static constexpr int ENTRIES = NG * K;
  static constexpr int LUT_ES = LH_ ? 2 : 4;
  static constexpr int LUT_BYTES = ENTRIES * HT * LUT_ES;
  static constexpr int BIN_WORDS = ENTRIES * HT;
  static constexpr int FIXED = BIN_WORDS * 4 + HT * D * 4 + 16 * 4;
  static constexpr int PART_FLOATS = kFW * HT * (D + 2);  // FP16 partials of the kFW warps: o[D], m, l
  // 256 threads when two blocks fit on a multiprocessor, else 512 (16 warps in the one block)
  static constexpr int SMEM256 = cmax(LUT_BYTES, (PART_FLOATS + 8 * HT * (D + 1)) * 4) + FIXED + 2 * 8 * HT * 4;
  static constexpr int NT = SMEM256 <= 110 * 1024 ? 256 : 512;
  static constexpr int NW = NT / 32;
  static constexpr int U = kTile / NT;                     // slots per thread per tile
  static constexpr int PROD_FLOATS = NW * HT * (D + 1);   // bins x centroids per warp: o[D], l
  static constexpr int REGION_A = cmax(LUT_BYTES, (PART_FLOATS + PROD_FLOATS) * 4);
  static constexpr int SMEM = REGION_A + FIXED + 2 * NW * HT * 4;
  static constexpr int MINB = NT == 256 ? 2 : 1;
  static constexpr int LUT_ROW_SHIFT = ilog2(NG * HT * LUT_ES);  // bytes of a LUT row (one code)
  static constexpr int BIN_ROW_SHIFT = ilog2(NG * HT * 4);       // bytes of a bins row
  static_assert(REC * 8 == NG * NB, "records are whole bytes");
  static_assert(SMEM <= 227 * 1024, "shared memory");
  static_assert((NG & (NG - 1)) == 0 && NG <= 32 && NG % 2 == 0, "group count");
  static_assert(kTile % NT == 0, "tile");
};

// ---- records: load_record, code_at (kernels/attention/quant_decode_device.cuh) ----

__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// C fp16 values (C = 1, 2, 4, 8 or 16, aligned to C x 2 bytes up to 16) -> floats
template <int C>
__device__ __forceinline__ void load_half_vec(const __half* ptr, float (&v)[C]) {
  if constexpr (C == 1) {
    v[0] = __half2float(__ldg(ptr));
    return;
  } else if constexpr (C < 8) {  // c4b8, c2b8: 8- or 4-byte loads
#pragma unroll
    for (int j = 0; j < C / 2; ++j) {
      const float2 f = __half22float2(__ldg(reinterpret_cast<const __half2*>(ptr) + j));
      v[2 * j] = f.x;
      v[2 * j + 1] = f.y;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < C / 8; ++i) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(ptr) + i);
    const uint32_t wd[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&wd[j]));
      v[8 * i + 2 * j] = f.x;
      v[8 * i + 2 * j + 1] = f.y;
    }
  }
}

// The i-th code shifted left by SH (i a compile-time constant after unrolling); b = 8: one byte permute.
template <int NB, int SH, int NWD>
__device__ __forceinline__ uint32_t code_shl(const uint32_t (&w)[NWD], int i) {
  if constexpr (NB == 8) {
    const uint32_t b1 = __byte_perm(w[i >> 2], 0u, 0x4404u | ((i & 3) << 4));  // byte i%4 -> byte 1
    if constexpr (SH >= 8) return b1 << (SH - 8);
    else return b1 >> (8 - SH);
  } else {
    return code_at<NB>(w, i) << SH;
  }
}

// acc[h] += LUT values at byte offset off (fp32 tables)
template <int HT>
__device__ __forceinline__ void lut_add_f32(const unsigned char* lut, uint32_t off, float (&acc)[HT]) {
  if constexpr (HT == 4) {
    const float4 x = *reinterpret_cast<const float4*>(lut + off);
    acc[0] += x.x, acc[1] += x.y, acc[2] += x.z, acc[3] += x.w;
  } else if constexpr (HT == 2) {
    const float2 x = *reinterpret_cast<const float2*>(lut + off);
    acc[0] += x.x, acc[1] += x.y;
  } else {
    acc[0] += *reinterpret_cast<const float*>(lut + off);
  }
}

// acc[h] += the sum of two fp16 LUT entries (added in fp16, then accumulated in fp32)
template <int HT>
__device__ __forceinline__ void lut_add2_f16(const unsigned char* lut, uint32_t off0, uint32_t off1, float (&acc)[HT]) {
  if constexpr (HT == 4) {
    const uint2 a = *reinterpret_cast<const uint2*>(lut + off0), b = *reinterpret_cast<const uint2*>(lut + off1);
    const float2 x = __half22float2(__hadd2(*reinterpret_cast<const __half2*>(&a.x), *reinterpret_cast<const __half2*>(&b.x)));
    const float2 y = __half22float2(__hadd2(*reinterpret_cast<const __half2*>(&a.y), *reinterpret_cast<const __half2*>(&b.y)));
    acc[0] += x.x, acc[1] += x.y, acc[2] += y.x, acc[3] += y.y;
  } else if constexpr (HT == 2) {
    const float2 x = __half22float2(__hadd2(*reinterpret_cast<const __half2*>(lut + off0), *reinterpret_cast<const __half2*>(lut + off1)));
    acc[0] += x.x, acc[1] += x.y;
  } else {
    acc[0] += __half2float(__hadd(*reinterpret_cast<const __half*>(lut + off0), *reinterpret_cast<const __half*>(lut + off1)));
  }
}

// C fp16 values from raw 16-byte words
template <int C>
__device__ __forceinline__ void halves_to_float(const uint4 (&r)[C / 8], float (&v)[C]) {
#pragma unroll
  for (int i = 0; i < C / 8; ++i) {
    const uint32_t wd[4] = {r[i].x, r[i].y, r[i].z, r[i].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&wd[j]));
      v[8 * i + 2 * j] = f.x;
      v[8 * i + 2 * j + 1] = f.y;
    }
  }
}

template <class CF>
__global__ void __launch_bounds__(CF::NT, CF::MINB) quant_split_kernel(const QuantDecodeParams p) {
  constexpr int D = CF::D, C = CF::C, NB = CF::NB, HT = CF::HT, NG = CF::NG, K = CF::K, REC = CF::REC;
  constexpr int NWD = CF::NWD, Q = CF::Q, NT = CF::NT, NW = CF::NW, U = CF::U, ES = CF::LUT_ES;
  constexpr bool EX = CF::EX;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* sA = smem;                                         // LUT; later FP16 / product partials
  uint32_t* bins = reinterpret_cast<uint32_t*>(smem + CF::REGION_A);  // [K][HT][NG]
  unsigned char* bins_b = smem + CF::REGION_A;
  float* sQ = reinterpret_cast<float*>(bins + CF::BIN_WORDS);       // [HT][D] q * scale * log2(e)
  float* sRef = sQ + HT * D;                                        // [HT] final reference of the bins (16 floats)
  float* sMax = sRef + 16;                                          // [2][NW][HT]

  const int split = blockIdx.x, b = blockIdx.z;
  const int G = p.n_heads / p.n_kv_heads;
  const int tiles_per_kv = G / HT;
  const int kvh = blockIdx.y / tiles_per_kv;
  const int h0 = kvh * G + (blockIdx.y % tiles_per_kv) * HT;  // first query head of the block
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float sl = p.scale * 1.4426950408889634f;

  // the block's stretch of the code stream (counts clamped: a bad count is reported by the reduction)
  const int64_t q_limit = std::min<int64_t>(static_cast<int64_t>(p.n_splits) * p.split_len, p.quant_capacity);
  const int nq = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(p.n_quant[b], q_limit)));
  const int q0 = split * p.split_len;
  const int q1 = min(q0 + p.split_len, nq);
  const bool has_q = q0 < q1;
  const int n_tiles = has_q ? (q1 - q0 + kTile - 1) / kTile : 0;
  const int64_t head_off = (static_cast<int64_t>(b) * p.n_kv_heads + kvh) * p.quant_capacity * REC;
  const uint8_t* kbase = p.k_codes + head_off;
  const uint8_t* vbase = p.v_codes + head_off;

  uint32_t ak[U][NWD], av[U][NWD], bk[U][NWD], bv[U][NWD];
  // EX: the slots' fp16 key scale (low half) and value scale (high half), 1 without gain (one register per slot:
  // the unpacked floats spilled)
  uint32_t as[U], bs[U];
  const int64_t scale_off = (static_cast<int64_t>(b) * p.n_kv_heads + kvh) * p.quant_capacity;
  auto load_tile = [&](uint32_t (&rk)[U][NWD], uint32_t (&rv)[U][NWD], uint32_t (&sc)[U], int tile) {
    const int t0 = q0 + tile * kTile + tid;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * NT;
      if (t < q1) {
        load_record<REC>(kbase, t, rk[u]);
        load_record<REC>(vbase, t, rv[u]);
        if constexpr (EX) {
          const uint32_t ks = p.k_scale ? __ldcs(reinterpret_cast<const unsigned short*>(p.k_scale) + scale_off + t) : 0x3c00u;
          const uint32_t vs = p.v_scale ? __ldcs(reinterpret_cast<const unsigned short*>(p.v_scale) + scale_off + t) : 0x3c00u;
          sc[u] = ks | (vs << 16);
        }
      }
    }
  };
  if (n_tiles > 0) load_tile(ak, av, as, 0);  // in flight while the LUT is built

  // 1. q, bins
  for (int i = tid; i < HT * D; i += NT)
    sQ[i] = __bfloat162float(p.q[(static_cast<int64_t>(b) * p.n_heads + h0) * D + i]) * sl;
  for (int i = tid; i < CF::BIN_WORDS / 4; i += NT) reinterpret_cast<uint4*>(bins)[i] = make_uint4(0, 0, 0, 0);
  // EX: q . k_mean per head in sRef[8 + h] (scaled as the scores; sRef[0, HT) is written only at the end)
  if (EX && tid < HT) sRef[8 + tid] = p.q_mean ? p.q_mean[static_cast<int64_t>(b) * p.n_heads + h0 + tid] * sl : 0.f;
  __syncthreads();

  // 2. LUT. Entry e of the loop -> (code, group) such that a warp reads whole 32-byte sectors of the codebook
  // and writes consecutive entries; a thread's group is the same for all its entries. Loads are issued a chunk
  // at a time (up to 8 centroids in flight per thread).
  if (has_q) {
    constexpr int PER = NG * K / NT;
    constexpr int CH = cmin(PER, C == 8 ? 8 : 4);
    static_assert(PER >= 1 && PER % CH == 0, "LUT entries per thread");
    const int grp = (tid >> 1) & (NG - 1);
    float qg[HT][C];
#pragma unroll
    for (int h = 0; h < HT; ++h)
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if constexpr (EX) {  // keys coded in a rotated basis: the tables are built from R_k q
          if (p.q_rot) {
            qg[h][c] = p.q_rot[(static_cast<int64_t>(b) * p.n_heads + h0 + h) * D + grp * C + c] * sl;
            continue;
          }
        }
        qg[h][c] = sQ[h * D + grp * C + c];
      }
    const __half* kc = p.k_centroids + (static_cast<int64_t>(kvh) * NG + grp) * K * C;
#pragma unroll 1
    for (int base = 0; base < PER; base += CH) {
      uint4 raw[CH][C / 8];
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int e = tid + (base + j) * NT;
        const int code = ((e >> 1) >> ilog2(NG)) * 2 + (e & 1);
#pragma unroll
        for (int r = 0; r < C / 8; ++r)
          raw[j][r] = __ldg(reinterpret_cast<const uint4*>(kc + static_cast<int64_t>(code) * C) + r);
      }
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int e = tid + (base + j) * NT;
        const int code = ((e >> 1) >> ilog2(NG)) * 2 + (e & 1);
        float cen[C];
        halves_to_float<C>(raw[j], cen);
        float val[HT];
#pragma unroll
        for (int h = 0; h < HT; ++h) {
          float s = 0.f;
#pragma unroll
          for (int c = 0; c < C; ++c) s = fmaf(qg[h][c], cen[c], s);
          val[h] = s;
        }
        const int entry = code * NG + grp;
        if constexpr (!CF::LUT_HALF) {
          float* dst = reinterpret_cast<float*>(sA) + entry * HT;
          if constexpr (HT == 4) *reinterpret_cast<float4*>(dst) = make_float4(val[0], val[1], val[2], val[3]);
          else if constexpr (HT == 2) *reinterpret_cast<float2*>(dst) = make_float2(val[0], val[1]);
          else *dst = val[0];
        } else {
          __half* dst = reinterpret_cast<__half*>(sA) + entry * HT;
          if constexpr (HT == 4) {
            const __half2 x = __floats2half2_rn(val[0], val[1]), y = __floats2half2_rn(val[2], val[3]);
            uint2 pk;
            pk.x = *reinterpret_cast<const uint32_t*>(&x);
            pk.y = *reinterpret_cast<const uint32_t*>(&y);
            *reinterpret_cast<uint2*>(dst) = pk;
          } else if constexpr (HT == 2) {
            *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(val[0], val[1]);
          } else {
            *dst = __float2half_rn(val[0]);
          }
        }
      }
    }
  }
  __syncthreads();

  // 3. the code stream. Position i of a slot's record holds group i ^ lane_g (records are XOR-swizzled by slot
  // and slot mod 32 = lane). Lane constants make each lookup address one LOP3 with the shifted code.
  const int lane_g = lane & (NG - 1);
  const int kappa = (lane / NG) & (Q - 1);
  const uint32_t lut_lane = static_cast<uint32_t>(lane_g * HT * ES);
  const uint32_t bin_lane = static_cast<uint32_t>((kappa * NG + lane_g) * 4);
  float mref[HT];  // the bins hold sum of floor(exp2(s - mref) + d); -inf before the first tile
  // EX: score = ks * LUT sum + q.k_mean; the bins take exp2(s - mref) * vs, so mref follows the maximum of
  // s + log2(vs), and the softmax denominator of the quantized tokens, sum exp2(s - mref), is summed apart in
  // fp32 (lsum, the thread's share)
  float lsum[HT];
#pragma unroll
  for (int h = 0; h < HT; ++h) {
    mref[h] = -INFINITY;
    lsum[h] = 0.f;
  }
  const uint32_t seed = static_cast<uint32_t>(b) * 0x9e3779b9u + static_cast<uint32_t>(kvh) * 0x85ebca6bu;

  auto process = [&](const uint32_t (&ck)[U][NWD], const uint32_t (&cv)[U][NWD], const uint32_t (&sc)[U], int tile) {
    const int t0 = q0 + tile * kTile + tid;
    float s[U][HT];
    float wm[HT];
#pragma unroll
    for (int h = 0; h < HT; ++h) wm[h] = -INFINITY;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < HT; ++h) s[u][h] = -INFINITY;
      if (t0 + u * NT < q1) {
        float acc[HT];
#pragma unroll
        for (int h = 0; h < HT; ++h) acc[h] = 0.f;
        if constexpr (!CF::LUT_HALF) {
#pragma unroll
          for (int i = 0; i < NG; ++i)
            lut_add_f32<HT>(sA, code_shl<NB, CF::LUT_ROW_SHIFT>(ck[u], i) | (lut_lane ^ (i * HT * ES)), acc);
        } else {
#pragma unroll
          for (int i = 0; i < NG; i += 2)
            lut_add2_f16<HT>(sA, code_shl<NB, CF::LUT_ROW_SHIFT>(ck[u], i) | (lut_lane ^ (i * HT * ES)),
                             code_shl<NB, CF::LUT_ROW_SHIFT>(ck[u], i + 1) | (lut_lane ^ ((i + 1) * HT * ES)), acc);
        }
        if constexpr (EX) {
          // log2 of the value scale for the bins' reference (a zero scale counts as 2^-24, fp16's smallest)
          const float sk = __half2float(__ushort_as_half(static_cast<unsigned short>(sc[u] & 0xffffu)));
          const float sv = __half2float(__ushort_as_half(static_cast<unsigned short>(sc[u] >> 16)));
          const float lv = sv > 0x1p-24f ? __log2f(sv) : -24.f;
#pragma unroll
          for (int h = 0; h < HT; ++h) {
            s[u][h] = fmaf(acc[h], sk, sRef[8 + h]);
            wm[h] = fmaxf(wm[h], s[u][h] + lv);
          }
        } else {
#pragma unroll
          for (int h = 0; h < HT; ++h) {
            s[u][h] = acc[h];
            wm[h] = fmaxf(wm[h], acc[h]);
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      wm[h] = warp_max(wm[h]);
      if (lane == 0) sMax[((tile & 1) * NW + warp) * HT + h] = wm[h];
    }
    __syncthreads();
    bool rescale = false;
    float fac[HT];
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      float T = -INFINITY;
#pragma unroll
      for (int w = 0; w < NW; ++w) T = fmaxf(T, sMax[((tile & 1) * NW + w) * HT + h]);
      fac[h] = 1.f;
      if (T > mref[h] + kFMaxBits) {  // some weight would exceed 2^16
        const float nr = T - (kFMaxBits - kSlack);
        fac[h] = exp2f(mref[h] - nr);
        mref[h] = nr;
        rescale = true;
        if constexpr (EX) lsum[h] *= fac[h];
      }
    }
    if (rescale && tile > 0) {  // uniform over the block; before tile 0 the bins are all zero
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        if (fac[h] == 1.f) continue;
        for (int idx = tid; idx < K * NG; idx += NT) {  // the words of head h: bins[code][h][group]
          const int wd = ((idx / NG) * HT + h) * NG + (idx & (NG - 1));
          bins[wd] = __float2uint_rn(__uint2float_rn(bins[wd]) * fac[h]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * NT;
      if (t < q1) {
        const uint32_t hs = hash32(static_cast<uint32_t>(t) ^ seed);
        uint32_t F[HT];
#pragma unroll
        for (int h = 0; h < HT; ++h) {
          // dither d = byte/256 + 1/512 in (0, 1), from 1.byte (as a float in [1, 2)) - (1 - 1/512)
          const float d = __uint_as_float(0x3f800000u | (((hs >> (8 * h)) & 255u) << 15)) - 0.998046875f;
          float x = exp2f(s[u][h] - mref[h]);
          if constexpr (EX) {
            lsum[h] += x;
            x *= __half2float(__ushort_as_half(static_cast<unsigned short>(sc[u] >> 16)));
          }
          F[h] = __float_as_uint(__fadd_rd(x + d, 8388608.f)) - 0x4b000000u;  // floor(x + d), x + d < 2^23
        }
        uint32_t Fr[HT];  // Fr[j1*Q + j0] = F[j1*Q + (j0 ^ kappa)]: instruction (j1, j0) adds head j1*Q + (j0 ^ kappa)
#pragma unroll
        for (int j1 = 0; j1 < HT / Q; ++j1)
#pragma unroll
          for (int j0 = 0; j0 < Q; ++j0) {
            uint32_t v = F[j1 * Q + j0];
#pragma unroll
            for (int k = 1; k < Q; ++k)
              if (kappa == k) v = F[j1 * Q + (j0 ^ k)];
            Fr[j1 * Q + j0] = v;
          }
#pragma unroll
        for (int i = 0; i < NG; ++i) {
          const uint32_t vb = code_shl<NB, CF::BIN_ROW_SHIFT>(cv[u], i);
#pragma unroll
          for (int j0 = 0; j0 < Q; ++j0) {
            // bins[code][j1*Q + (j0 ^ kappa)][i ^ lane_g]
            const uint32_t off = vb | (bin_lane ^ static_cast<uint32_t>((j0 * NG + i) * 4));
#pragma unroll
            for (int j1 = 0; j1 < HT / Q; ++j1)
              atomicAdd(reinterpret_cast<uint32_t*>(bins_b + off + j1 * Q * NG * 4), Fr[j1 * Q + j0]);
          }
        }
      }
    }
  };

  for (int tile = 0; tile < n_tiles; tile += 2) {
    if (tile + 1 < n_tiles) load_tile(bk, bv, bs, tile + 1);
    process(ak, av, as, tile);
    if (tile + 1 < n_tiles) {
      if (tile + 2 < n_tiles) load_tile(ak, av, as, tile + 2);
      process(bk, bv, bs, tile + 1);
    }
  }
  if (tid == 0) {
#pragma unroll
    for (int h = 0; h < HT; ++h) sRef[h] = mref[h];
  }
  __syncthreads();  // bins complete; the LUT region is free
  if constexpr (EX) {  // the warps' denominators -> sMax[warp][h] (free now; read after the barrier before the merge)
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      const float ls = warp_sum(lsum[h]);
      if (lane == 0) sMax[warp * HT + h] = ls;
    }
  }

  // 4. FP16 tokens (anchors then window), on the first kFW warps: warp per token, lanes over channels,
  // 4 tokens' rows requested at once.
  float* sPart = reinterpret_cast<float*>(sA);  // [kFW][HT][D + 2]: o, m, l
  float* sProd = sPart + CF::PART_FLOATS;       // [NW][HT][D + 1]: o, l
  if (warp < kFW) {
    constexpr int E = D / 32;
    constexpr int R = 4;
    const int na = max(0, min(p.n_anchor[b], p.anchor_capacity));
    const int nw = max(0, min(p.n_window[b], p.window_capacity));
    const int nf = na + nw;
    const int fs = (nf + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
    const int f0 = split * fs, f1 = min(nf, f0 + fs);
    const int64_t bh = static_cast<int64_t>(b) * p.n_kv_heads + kvh;
    float qr[HT][E], fm[HT], fl[HT], fo[HT][E];
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      fm[h] = -INFINITY;
      fl[h] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        qr[h][e] = sQ[h * D + lane * E + e];
        fo[h][e] = 0.f;
      }
    }
    auto row = [&](int f, bool is_k) -> const __half* {
      if (f < na) return (is_k ? p.anchor_k : p.anchor_v) + (bh * p.anchor_capacity + f) * D + lane * E;
      return (is_k ? p.window_k : p.window_v) + (bh * p.window_capacity + (f - na)) * D + lane * E;
    };
    auto load_row = [&](const __half* ptr, float (&v)[E]) {
      if constexpr (E == 4) {
        const uint2 r = __ldg(reinterpret_cast<const uint2*>(ptr));
        const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&r.x));
        const float2 c = __half22float2(*reinterpret_cast<const __half2*>(&r.y));
        v[0] = a.x, v[1] = a.y, v[2] = c.x, v[3] = c.y;
      } else {
        const unsigned int r = __ldg(reinterpret_cast<const unsigned int*>(ptr));
        const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&r));
        v[0] = a.x, v[1] = a.y;
      }
    };
    for (int f = f0 + warp; f < f1; f += R * kFW) {
      float kx[R][E], vx[R][E];
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (f + r * kFW < f1) {
          load_row(row(f + r * kFW, true), kx[r]);
          load_row(row(f + r * kFW, false), vx[r]);
        }
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (f + r * kFW < f1) {
#pragma unroll
          for (int h = 0; h < HT; ++h) {
            float part = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) part = fmaf(qr[h][e], kx[r][e], part);
            const float sc = warp_sum(part);
            if (p.fp16_logits && lane == 0)  // (addressed from the parameters: no registers held by the loop)
              p.fp16_logits[(static_cast<int64_t>(b) * p.n_heads + h0 + h) *
                                (static_cast<int64_t>(p.anchor_capacity) + p.window_capacity) +
                            f + r * kFW] = sc * kLn2;
            const float mn = fmaxf(fm[h], sc);
            const float al = exp2f(fm[h] - mn);
            const float pw = exp2f(sc - mn);
            fm[h] = mn;
            fl[h] = fl[h] * al + pw;
#pragma unroll
            for (int e = 0; e < E; ++e) fo[h][e] = fmaf(fo[h][e], al, pw * vx[r][e]);
          }
        }
    }
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      float* dst = sPart + (warp * HT + h) * (D + 2);
#pragma unroll
      for (int e = 0; e < E; ++e) dst[lane * E + e] = fo[h][e];
      if (lane == 0) {
        dst[D] = fm[h];
        dst[D + 1] = fl[h];
      }
    }
  }

  // 5. bins x value centroids: lane -> (group, cl), warp and cl stride over the codes; centroids requested a
  // chunk at a time
  if (has_q) {
    constexpr int LPG = 32 / NG;
    constexpr int PER_LANE = K / (LPG * NW);
    constexpr int CH = cmin(PER_LANE, C == 8 ? 8 : 4);
    static_assert(PER_LANE >= 1 && PER_LANE % CH == 0, "codes per lane");
    const int grp = lane & (NG - 1), cl = lane / NG;
    float acc[HT][C], accl[HT];
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      accl[h] = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[h][c] = 0.f;
    }
    const __half* vcb = p.v_centroids + (static_cast<int64_t>(kvh) * NG + grp) * K * C;
#pragma unroll 1
    for (int base = 0; base < PER_LANE; base += CH) {
      uint4 raw[CH][C / 8];
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int code = cl + LPG * (warp + NW * (base + j));
#pragma unroll
        for (int r = 0; r < C / 8; ++r)
          raw[j][r] = __ldg(reinterpret_cast<const uint4*>(vcb + static_cast<int64_t>(code) * C) + r);
      }
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int code = cl + LPG * (warp + NW * (base + j));
        float cen[C];
        halves_to_float<C>(raw[j], cen);
#pragma unroll
        for (int h = 0; h < HT; ++h) {
          const float w = __uint2float_rn(bins[(code * HT + h) * NG + grp]);
          accl[h] += w;
#pragma unroll
          for (int c = 0; c < C; ++c) acc[h][c] = fmaf(w, cen[c], acc[h][c]);
        }
      }
    }
#pragma unroll
    for (int off = NG; off < 32; off <<= 1)
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        accl[h] += __shfl_xor_sync(0xffffffffu, accl[h], off);
#pragma unroll
        for (int c = 0; c < C; ++c) acc[h][c] += __shfl_xor_sync(0xffffffffu, acc[h][c], off);
      }
    if (cl == 0) {
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        float* dst = sProd + (warp * HT + h) * (D + 1);
#pragma unroll
        for (int c = 0; c < C; ++c) dst[grp * C + c] = acc[h][c];
        if (grp == 0) dst[D] = accl[h];
      }
    }
  }
  __syncthreads();

  // merge and write the split's record
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * D;
  for (int i = tid; i < HT * D; i += NT) {
    const int h = i / D, c = i % D;
    const float mq = has_q ? sRef[h] : -INFINITY;
    float M = mq;
#pragma unroll
    for (int w = 0; w < kFW; ++w) M = fmaxf(M, sPart[(w * HT + h) * (D + 2) + D]);
    float O = 0.f, L = 0.f, O_coded = 0.f;
    if (M != -INFINITY) {
      if (has_q) {
        const float f = exp2f(mq - M);
        float oq = 0.f, lq = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
          oq += sProd[(w * HT + h) * (D + 1) + c];
          if constexpr (EX) lq += sMax[w * HT + h];
          else lq += sProd[(w * HT + h) * (D + 1) + D];
        }
        if constexpr (EX) {  // the coded part apart (rotated back in the reduction), the mean's with the FP16 part
          O_coded = f * oq;
          if (p.v_mean) O = f * lq * p.v_mean[static_cast<int64_t>(kvh) * D + c];
        } else {
          O = f * oq;
        }
        L = f * lq;
      }
#pragma unroll
      for (int w = 0; w < kFW; ++w) {
        const float* src = sPart + (w * HT + h) * (D + 2);
        const float mw = src[D];
        if (mw != -INFINITY) {
          const float f = exp2f(mw - M);
          O = fmaf(f, src[c], O);
          L = fmaf(f, src[D + 1], L);
        }
      }
    }
    const int64_t slot = (static_cast<int64_t>(b) * p.n_heads + h0 + h) * p.n_splits + split;
    wo[slot * D + c] = O;
    if constexpr (EX) wml[static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * 2 + slot * D + c] = O_coded;
    if (c == 0) {
      wml[slot * 2] = M;
      wml[slot * 2 + 1] = L;
    }
  }
}

// One block of D threads per (head, sequence): merges every split's record (empty splits have m = -inf) with
// the fp16 decode's combine step (split_combine.cuh).
template <int D>
__global__ void __launch_bounds__(D) quant_reduce_kernel(const QuantDecodeParams p) {
  __shared__ float smem[split_combine_smem_floats(1, kMaxQuantSplits)];
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const int h = blockIdx.x, b = blockIdx.y, c = threadIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * p.n_heads + h;
  if (nan_for_bad_counts<D>(p, b, bh, c)) return;
  combine_splits<D, D>(p.workspace, static_cast<int64_t>(p.batch) * p.n_heads, p.n_splits, bh, 1, p.n_splits, smem,
                       p.out, p.lse);
}

// The reduction of the coded-transform kernels: as quant_reduce_kernel, with the third workspace region (the
// quantized tokens' value sums in the coded basis) merged by the same split weights and rotated back once,
// out = (sum_s w_s O_s + R_v^T sum_s w_s C_s) / L (R_v null: the identity).
template <int D>
__global__ void __launch_bounds__(D) quant_reduce_coded_kernel(const QuantDecodeParams p) {
  constexpr int NWR = D / 32;
  __shared__ float sW[kMaxQuantSplits];
  __shared__ float sC[D];
  __shared__ float sRed[NWR];
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const int h = blockIdx.x, b = blockIdx.y, c = threadIdx.x, lane = c & 31, warp = c >> 5;
  const int64_t bh = static_cast<int64_t>(b) * p.n_heads + h;
  if (nan_for_bad_counts<D>(p, b, bh, c)) return;
  const int S = p.n_splits;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.n_heads;
  const float* wo = p.workspace;
  const float* wml = wo + rows * S * D;
  const float* wc = wml + rows * S * 2;
  auto block_reduce = [&](float x, bool is_max) {
    x = is_max ? warp_max(x) : warp_sum(x);
    if (lane == 0) sRed[warp] = x;
    __syncthreads();
    float r = sRed[0];
#pragma unroll
    for (int w = 1; w < NWR; ++w) r = is_max ? fmaxf(r, sRed[w]) : r + sRed[w];
    __syncthreads();  // sRed is reused
    return r;
  };
  float m = -INFINITY;
  for (int s = c; s < S; s += D) m = fmaxf(m, __ldcg(wml + (bh * S + s) * 2));
  const float M = block_reduce(m, true);  // finite: some split holds a token
  float l = 0.f;
  for (int s = c; s < S; s += D) {
    const float f = exp2f(__ldcg(wml + (bh * S + s) * 2) - M);
    sW[s] = f;
    l += f * __ldcg(wml + (bh * S + s) * 2 + 1);
  }
  const float L = block_reduce(l, false);  // its barriers also publish sW
  // 8 splits' loads in flight per thread (one at a time was latency-bound: the splits are many at batch 1)
  float acc = 0.f, coded = 0.f;
  for (int s0 = 0; s0 < S; s0 += 8) {
    float o[8], x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const bool in = s0 + u < S;
      o[u] = in ? __ldcg(wo + (bh * S + s0 + u) * D + c) : 0.f;
      x[u] = in ? __ldcg(wc + (bh * S + s0 + u) * D + c) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u)
      if (s0 + u < S) acc = fmaf(sW[s0 + u], o[u], acc), coded = fmaf(sW[s0 + u], x[u], coded);
  }
  if (p.v_rotation) {  // channel c of R_v^T x: column c of R_v, coalesced over the block, 16 loads in flight
    sC[c] = coded;
    __syncthreads();
    const float* R = p.v_rotation + static_cast<int64_t>(h / (p.n_heads / p.n_kv_heads)) * D * D + c;
    float r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 16
    for (int i = 0; i < D; ++i) r[i & 3] = fmaf(__ldg(R + static_cast<int64_t>(i) * D), sC[i], r[i & 3]);
    coded = (r[0] + r[1]) + (r[2] + r[3]);
  }
  p.out[bh * D + c] = __float2bfloat16_rn((acc + coded) / L);
  if (p.lse && c == 0) p.lse[bh] = (M + log2f(L)) * kLn2;
}

// ---- pre-RoPE keys: dequantize, rotate at the token's position, dot ----------------------------------------
// The code stream holds pre-RoPE keys (key_rope: pre), so scores cannot come from position-free lookup
// tables. One block (256 threads) per (split, KV head x head tile, sequence) as the LUT kernel; warp per
// token, lane over RoPE pairs: lane l owns the pairs i = l*PR .. l*PR+PR-1 (PR = D/64) and the channels i and
// i + D/2 they rotate together. Per token the lane reads both records (the same 16 bytes for the whole warp),
// dequantizes its channels from the fp16 codebooks (through L1/L2), rotates the key at code_pos[slot] with
// the fp32 angle pos * inv_freq[i] (as the runtime's RoPE, which takes a double sine/cosine of it; here the
// angle is reduced to [-pi, pi] and __sincosf gives ~2^-21 absolute),
// dots with q and accumulates its value channels in an online softmax (log2 domain, as the LUT kernel's
// records). FP16 tokens (anchors, window: post-RoPE) follow in the same loop without rotation. Warps merge
// in shared memory into the split's record (o, m, l) for quant_reduce_kernel.
// ROT = false (c2b8, c4b8 with post-RoPE keys): the same kernel without the rotation.
// EX (the coded transform with pre-RoPE keys: gain=, rotate=pca): each coded key is mapped back before the RoPE
// rotation, k = k_mean + R_k^T (ks u) (the warp's u through shared memory, R_k of the KV head staged in dynamic
// shared memory: D x D fp32, then D products per lane channel), and the quantized tokens' values are summed in
// their coded basis with weights p * vs in a second accumulator (rotated back by quant_reduce_coded_kernel), their
// mean as p * v_mean with the FP16 tokens' values: the split record of the lookup-table kernel's EX instantiation.
// C = NB = 0 (RW, run-time widths): each tensor's (c, b) from `w` (keys and values of different configurations, and
// the coded transform on c2b8 / c4b8): a code is read byte by byte (rw_code) and its centroid addressed from the
// run-time group size, one instantiation for every pair of configurations.
// Post-RoPE keys with the coded transform (!ROT && EX): the quantized tokens' scores are q_mean + ks (R_k q) . u
// (q_rot staged beside q, whose products the FP16 tokens keep), as the lookup-table kernel's.
// The quantized tokens in rounds of 32 (every form but EX with pre-RoPE keys and a basis, which keeps the per-token
// loop above): lane j of a warp scores token j alone (its codes, centroids, the RoPE turn, HT dot products with
// q from shared memory), the warp takes one max and one rescale per round, and the values are summed lane over
// channels as above from the round's probabilities and value records, staged in dynamic shared memory.
struct DequantWidths {
  int k_c = 0, k_b = 0, v_c = 0, v_b = 0;  // channels per group and bits per code of the keys and the values
};

// The code of group position i (0 .. NG-1) of a b-bit record of `rec_bytes` bytes (little-endian bit order), the
// record in global memory read through the read-only cache (GLOBAL) or staged in shared memory.
template <bool GLOBAL = true>
__device__ __forceinline__ uint32_t rw_code(const uint8_t* rec, int i, int nb, int rec_bytes) {
  auto byte = [rec](int k) -> uint32_t {
    if constexpr (GLOBAL) return __ldg(rec + k);
    else return rec[k];
  };
  const int at = i * nb, lo = at >> 3;
  uint32_t w = byte(lo);
  if (nb == 8) return w;
  if (lo + 1 < rec_bytes) w |= byte(lo + 1) << 8;
  if (lo + 2 < rec_bytes) w |= byte(lo + 2) << 16;
  return (w >> (at & 7)) & ((1u << nb) - 1u);
}

// Dynamic shared memory of the 32-token rounds: each warp's 32 tokens' probabilities [32][HT] floats and value
// records [32][D/2] bytes (D/2: the longest record, c2b8's).
template <int D, int HT>
constexpr int pre_stage_bytes() {
  return 8 * 32 * (HT * 4 + D / 2);
}

template <int D, int C, int NB, int HT, bool ROT, bool EX = false>
__global__ void __launch_bounds__(256) quant_pre_split_kernel(const QuantDecodeParams p, const DequantWidths w) {
  constexpr bool RW = C == 0;
  constexpr int CC = RW ? 1 : C;  // (a placeholder divisor when the widths are read at run time)
  constexpr int NT = 256, NW = NT / 32, HALF = D / 2, PR = D / 64, NG = D / CC, REC = RW ? 4 : NG * NB / 8;
  constexpr int NWD = (REC + 3) / 4;
  constexpr bool QROT = EX && !ROT;  // post-RoPE coded keys: the rotated query
  __shared__ __align__(16) float sQ[HT][D];
  __shared__ __align__(16) float sQr[QROT ? HT : 1][D];  // R_k q (or q without a basis), scaled as sQ
  __shared__ float sQm[HT];                // q . k_mean, scaled (QROT)
  __shared__ float sFreq[HALF];
  __shared__ float sO[NW][HT][D];
  __shared__ float sML[NW][HT][2];
  __shared__ float sOc[EX ? NW : 1][HT][D];  // EX: the warps' coded value sums
  __shared__ __align__(16) float sU[EX && ROT ? NW : 1][D];  // EX (pre-RoPE): each warp's coded key times R_k
  // the rounds' stage (pre_stage_bytes()), or with EX, pre-RoPE keys and a basis, R_k of the KV head [D][D]
  extern __shared__ __align__(16) float pre_dyn_smem[];
  const int split = blockIdx.x, b = blockIdx.z;
  const int G = p.n_heads / p.n_kv_heads;
  const int tiles_per_kv = G / HT;
  const int kvh = blockIdx.y / tiles_per_kv;
  const int h0 = kvh * G + (blockIdx.y % tiles_per_kv) * HT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float sl = p.scale * 1.4426950408889634f;
  for (int i = tid; i < HT * D; i += NT)
    sQ[i / D][i % D] = __bfloat162float(p.q[(static_cast<int64_t>(b) * p.n_heads + h0) * D + i]) * sl;
  if constexpr (QROT) {
    for (int i = tid; i < HT * D; i += NT)
      sQr[i / D][i % D] = p.q_rot ? p.q_rot[(static_cast<int64_t>(b) * p.n_heads + h0) * D + i] * sl : sQ[i / D][i % D];
    if (tid < HT) sQm[tid] = p.q_mean ? p.q_mean[static_cast<int64_t>(b) * p.n_heads + h0 + tid] * sl : 0.f;
  }
  if constexpr (ROT)
    for (int i = tid; i < HALF; i += NT) sFreq[i] = p.inv_freq[i];
  if constexpr (EX && ROT)
    if (p.k_rotation) {
      const float4* src = reinterpret_cast<const float4*>(p.k_rotation + static_cast<int64_t>(kvh) * D * D);
      for (int i = tid; i < D * D / 4; i += NT) reinterpret_cast<float4*>(pre_dyn_smem)[i] = __ldg(src + i);
    }
  __syncthreads();

  const int64_t q_limit = std::min<int64_t>(static_cast<int64_t>(p.n_splits) * p.split_len, p.quant_capacity);
  const int nq = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(p.n_quant[b], q_limit)));
  const int q0 = split * p.split_len, q1 = min(q0 + p.split_len, nq);
  const int64_t bh = static_cast<int64_t>(b) * p.n_kv_heads + kvh;
  // each tensor's groups, record bytes and centroids (compile-time, or run-time widths)
  const int k_ch = RW ? w.k_c : C, k_bits = RW ? w.k_b : NB, v_ch = RW ? w.v_c : C, v_bits = RW ? w.v_b : NB;
  const int kng = D / k_ch, vng = D / v_ch, krec = kng * k_bits / 8, vrec = vng * v_bits / 8;
  const uint8_t* kbase = p.k_codes + bh * p.quant_capacity * (RW ? krec : REC);
  const uint8_t* vbase = p.v_codes + bh * p.quant_capacity * (RW ? vrec : REC);
  const int32_t* cpos = p.code_pos + bh * p.quant_capacity;
  const __half* kcb = p.k_centroids + static_cast<int64_t>(kvh) * (1 << k_bits) * D;  // [NG, 2^b, c] per KV head
  const __half* vcb = p.v_centroids + static_cast<int64_t>(kvh) * (1 << v_bits) * D;
  const int na = max(0, min(p.n_anchor[b], p.anchor_capacity));
  const int nw = max(0, min(p.n_window[b], p.window_capacity));
  const int nf = na + nw;
  const int fs = (nf + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  const int f0 = split * fs, f1 = min(nf, f0 + fs);

  float qa[HT][PR], qb[HT][PR];  // q at the lane's channels i and i + HALF
  float qra[QROT ? HT : 1][PR], qrb[QROT ? HT : 1][PR];  // QROT: the rotated query there
#pragma unroll
  for (int h = 0; h < HT; ++h)
#pragma unroll
    for (int j = 0; j < PR; ++j) qa[h][j] = sQ[h][lane * PR + j], qb[h][j] = sQ[h][lane * PR + j + HALF];
  if constexpr (QROT)
#pragma unroll
    for (int h = 0; h < HT; ++h)
#pragma unroll
      for (int j = 0; j < PR; ++j) qra[h][j] = sQr[h][lane * PR + j], qrb[h][j] = sQr[h][lane * PR + j + HALF];
  float m[HT], l[HT], oa[HT][PR], ob[HT][PR];
  float oca[HT][PR], ocb[HT][PR];  // EX: the quantized tokens' values in the coded basis
#pragma unroll
  for (int h = 0; h < HT; ++h) {
    m[h] = -INFINITY, l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < PR; ++j) oa[h][j] = ob[h][j] = 0.f;
  }
#pragma unroll
  for (int h = 0; h < HT; ++h)
#pragma unroll
    for (int j = 0; j < PR; ++j) oca[h][j] = ocb[h][j] = 0.f;
  // EX: the means at the lane's channels (0 without a basis)
  float kma[PR], kmb[PR], vma[PR], vmb[PR];
#pragma unroll
  for (int j = 0; j < PR; ++j) {
    const int64_t at = static_cast<int64_t>(kvh) * D + lane * PR + j;
    kma[j] = EX && p.k_mean ? __ldg(p.k_mean + at) : 0.f, kmb[j] = EX && p.k_mean ? __ldg(p.k_mean + at + HALF) : 0.f;
    vma[j] = EX && p.v_mean ? __ldg(p.v_mean + at) : 0.f, vmb[j] = EX && p.v_mean ? __ldg(p.v_mean + at + HALF) : 0.f;
  }
  // one token: keys ka/kb (already rotated), values va/vb at the lane's channels
  // (logit: null, or where head 0's scaled score goes, head h's n_logit floats further: FP16 tokens)
  // coded (EX): va/vb are a quantized token's coded values times vs (the coded sums; its mean with o); a constant at
  // each call, folded once the lambda is inlined
  const int64_t n_logit = static_cast<int64_t>(p.anchor_capacity) + p.window_capacity;
  auto accumulate = [&](bool coded, const float (&ka)[PR], const float (&kb)[PR], const float (&va)[PR],
                        const float (&vb)[PR], float* logit) {
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      float part = 0.f;
      if (QROT && coded) {  // q_mean + (R_k q) . (ks u): ka / kb hold ks u
#pragma unroll
        for (int j = 0; j < PR; ++j) part = fmaf(qra[QROT ? h : 0][j], ka[j], fmaf(qrb[QROT ? h : 0][j], kb[j], part));
      } else {
#pragma unroll
        for (int j = 0; j < PR; ++j) part = fmaf(qa[h][j], ka[j], fmaf(qb[h][j], kb[j], part));
      }
      const float sc = warp_sum(part) + (QROT && coded ? sQm[h] : 0.f);
      if (logit && lane == 0) logit[h * n_logit] = sc * kLn2;
      const float mn = fmaxf(m[h], sc);
      const float al = exp2f(m[h] - mn), pw = exp2f(sc - mn);
      m[h] = mn;
      l[h] = l[h] * al + pw;
#pragma unroll
      for (int j = 0; j < PR; ++j) {
        if (EX && coded) {
          oa[h][j] = fmaf(oa[h][j], al, pw * vma[j]);
          ob[h][j] = fmaf(ob[h][j], al, pw * vmb[j]);
          oca[h][j] = fmaf(oca[h][j], al, pw * va[j]);
          ocb[h][j] = fmaf(ocb[h][j], al, pw * vb[j]);
        } else {
          oa[h][j] = fmaf(oa[h][j], al, pw * va[j]);
          ob[h][j] = fmaf(ob[h][j], al, pw * vb[j]);
          if (EX) oca[h][j] *= al, ocb[h][j] *= al;
        }
      }
    }
  };
  // the lane's channels lie in groups ga, gb of the keys (kga, kgb) and of the values (vga, vgb)
  const int i0 = lane * PR, kga = i0 / k_ch, kgb = (i0 + HALF) / k_ch, vga = i0 / v_ch, vgb = (i0 + HALF) / v_ch;
  // the 32-token rounds below: every form but pre-RoPE coded keys with a basis (k = k_mean + R_k^T (ks u) is a
  // d x d product per token, shared by the warp in the per-token loop)
  const bool rounds = !ROT || !EX || (!p.k_rotation && !p.k_mean);
  if (rounds) {
    // 32 tokens per warp and round. Lane j scores token j whole (its key codes, the centroids, pre-RoPE keys
    // turned at the token's position, and HT dot products with q read from shared memory as broadcasts: no
    // shuffles), then one max and one rescale per 32 tokens, then the values lane over channels as in the per-token
    // loop, from the tokens' probabilities and value records staged in shared memory. (The per-token loop does a
    // warp reduction, a rescale and four code reads per token and head: post-RoPE mixed widths took 0.6 ms per
    // layer with it at the 8B shape, 128K.)
    float* stage_p = pre_dyn_smem + warp * 32 * HT;  // [32][HT]: p of the warp's tokens (times vs with EX)
    uint8_t* stage_v = reinterpret_cast<uint8_t*>(pre_dyn_smem + NW * 32 * HT) + warp * 32 * (D / 2);  // [32][vrec]
    const float(*qs)[D] = QROT ? sQr : sQ;
    float lp[HT];  // the lane's share of l: p of its tokens
#pragma unroll
    for (int h = 0; h < HT; ++h) lp[h] = 0.f;
    for (int cb = q0 + warp * 32; cb < q1; cb += NW * 32) {
      const int t = cb + lane;
      const bool valid = t < q1;
      float s[HT];
#pragma unroll
      for (int h = 0; h < HT; ++h) s[h] = 0.f;
      float ks = 1.f, vs = 1.f;
      if (valid) {
        const uint8_t* rk = kbase + static_cast<int64_t>(t) * krec;
        const int ksw = t & (kng - 1);
        if constexpr (ROT) {  // pre-RoPE keys: channels i and i + D/2 (groups g and g + NG/2) turned at the token's position
          const float pos = static_cast<float>(__ldg(cpos + t));
          const int hg = kng / 2;
          for (int g = 0; g < hg; ++g) {
            const uint32_t ca = rw_code(rk, g ^ ksw, k_bits, krec), cb2 = rw_code(rk, (g + hg) ^ ksw, k_bits, krec);
            const __half* pa = kcb + (static_cast<int64_t>(g) * (1 << k_bits) + ca) * k_ch;
            const __half* pb = kcb + (static_cast<int64_t>(g + hg) * (1 << k_bits) + cb2) * k_ch;
            for (int e = 0; e < k_ch; e += 2) {
              const float2 a = __half22float2(__ldg(reinterpret_cast<const __half2*>(pa + e)));
              const float2 bb = __half22float2(__ldg(reinterpret_cast<const __half2*>(pb + e)));
              const float xa2[2] = {a.x, a.y}, xb2[2] = {bb.x, bb.y};
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int i = g * k_ch + e + r;
                // the runtime's fp32 angle, reduced as in the per-token loop below
                const float angle = __fmul_rn(pos, sFreq[i]);
                const float kk = rintf(angle * 0.15915494309189535f);
                const float rr = fmaf(kk, 1.7484555e-07f, fmaf(-kk, 6.28318548202514648f, angle));
                float sn, cs;
                __sincosf(rr, &sn, &cs);
                const float ka1 = xa2[r] * cs - xb2[r] * sn, kb1 = xb2[r] * cs + xa2[r] * sn;
#pragma unroll
                for (int h = 0; h < HT; ++h) s[h] = fmaf(sQ[h][i], ka1, fmaf(sQ[h][i + HALF], kb1, s[h]));
              }
            }
          }
        } else
        for (int g = 0; g < kng; ++g) {
          const uint32_t code = rw_code(rk, g ^ ksw, k_bits, krec);
          const __half* cent = kcb + (static_cast<int64_t>(g) * (1 << k_bits) + code) * k_ch;
          const int c0 = g * k_ch;
          if (k_ch % 8 == 0) {  // 8 centroid halves per 16-byte load
            for (int i = 0; i < k_ch; i += 8) {
              const uint4 raw = __ldg(reinterpret_cast<const uint4*>(cent + i));
              const __half2* hh = reinterpret_cast<const __half2*>(&raw);
              const float2 c01 = __half22float2(hh[0]), c23 = __half22float2(hh[1]);
              const float2 c45 = __half22float2(hh[2]), c67 = __half22float2(hh[3]);
#pragma unroll
              for (int h = 0; h < HT; ++h) {
                const float4 a = *reinterpret_cast<const float4*>(&qs[h][c0 + i]);
                const float4 e = *reinterpret_cast<const float4*>(&qs[h][c0 + i + 4]);
                s[h] = fmaf(a.x, c01.x, fmaf(a.y, c01.y, fmaf(a.z, c23.x, fmaf(a.w, c23.y, s[h]))));
                s[h] = fmaf(e.x, c45.x, fmaf(e.y, c45.y, fmaf(e.z, c67.x, fmaf(e.w, c67.y, s[h]))));
              }
            }
          } else {
            for (int i = 0; i < k_ch; i += 2) {
              const float2 c = __half22float2(__ldg(reinterpret_cast<const __half2*>(cent + i)));
#pragma unroll
              for (int h = 0; h < HT; ++h) {
                const float2 a = *reinterpret_cast<const float2*>(&qs[h][c0 + i]);
                s[h] = fmaf(a.x, c.x, fmaf(a.y, c.y, s[h]));
              }
            }
          }
        }
        if constexpr (EX) {
          const int64_t so = bh * p.quant_capacity + t;
          ks = p.k_scale ? __half2float(p.k_scale[so]) : 1.f;
          vs = p.v_scale ? __half2float(p.v_scale[so]) : 1.f;
        }
        // the value record, staged for the warp's value pass
        const uint8_t* rv = vbase + static_cast<int64_t>(t) * vrec;
        uint8_t* dst = stage_v + lane * (D / 2);
        if (vrec % 4 == 0) {
          for (int i = 0; i < vrec; i += 4)
            *reinterpret_cast<uint32_t*>(dst + i) = __ldg(reinterpret_cast<const uint32_t*>(rv + i));
        } else {
          for (int i = 0; i < vrec; ++i) dst[i] = __ldg(rv + i);
        }
      }
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        // QROT: q_mean + ks (R_k q) . u; pre-RoPE gain: ks q . R(pos) u; else q . k (all scaled by sl)
        const float sc = valid ? (QROT ? fmaf(ks, s[h], sQm[QROT ? h : 0]) : EX ? ks * s[h] : s[h]) : -INFINITY;
        const float mn = fmaxf(m[h], warp_max(sc));  // finite: lane 0's token is in range
        const float al = exp2f(m[h] - mn), pw = exp2f(sc - mn);
        m[h] = mn;
        lp[h] = fmaf(lp[h], al, pw);
#pragma unroll
        for (int j = 0; j < PR; ++j) {
          if constexpr (EX) {
            oca[h][j] *= al, ocb[h][j] *= al;
          } else {
            oa[h][j] *= al, ob[h][j] *= al;
          }
        }
        stage_p[lane * HT + h] = EX ? pw * vs : pw;
      }
      __syncwarp();
      const int n = min(32, q1 - cb);
      for (int j = 0; j < n; ++j) {
        const uint8_t* rv = stage_v + j * (D / 2);
        const int vsw = (cb + j) & (vng - 1);
        const uint32_t vca = rw_code<false>(rv, vga ^ vsw, v_bits, vrec), vcbb = rw_code<false>(rv, vgb ^ vsw, v_bits, vrec);
        const __half* pva = vcb + (static_cast<int64_t>(vga) * (1 << v_bits) + vca) * v_ch + i0 % v_ch;
        const __half* pvb = vcb + (static_cast<int64_t>(vgb) * (1 << v_bits) + vcbb) * v_ch + (i0 + HALF) % v_ch;
        float va[PR], vb[PR];
        load_half_vec<PR>(pva, va);
        load_half_vec<PR>(pvb, vb);
        float pj[HT];
        if constexpr (HT == 4) {
          const float4 w4 = *reinterpret_cast<const float4*>(stage_p + j * HT);
          pj[0] = w4.x, pj[1] = w4.y, pj[2] = w4.z, pj[3] = w4.w;
        } else {
#pragma unroll
          for (int h = 0; h < HT; ++h) pj[h] = stage_p[j * HT + h];
        }
#pragma unroll
        for (int h = 0; h < HT; ++h)
#pragma unroll
          for (int jj = 0; jj < PR; ++jj) {
            if constexpr (EX) {
              oca[h][jj] = fmaf(pj[h], va[jj], oca[h][jj]), ocb[h][jj] = fmaf(pj[h], vb[jj], ocb[h][jj]);
            } else {
              oa[h][jj] = fmaf(pj[h], va[jj], oa[h][jj]), ob[h][jj] = fmaf(pj[h], vb[jj], ob[h][jj]);
            }
          }
      }
      __syncwarp();  // the stage is rewritten by the warp's next round
    }
    // l from the lanes' shares; EX: the coded tokens' values' mean, p summed over them (every quantized token) times
    // v_mean (the FP16 tokens below add theirs in accumulate)
#pragma unroll
    for (int h = 0; h < HT; ++h) {
      l[h] = warp_sum(lp[h]);
      if constexpr (EX)
#pragma unroll
        for (int j = 0; j < PR; ++j) oa[h][j] = fmaf(l[h], vma[j], oa[h][j]), ob[h][j] = fmaf(l[h], vmb[j], ob[h][j]);
    }
  } else if constexpr (ROT) {
  // (measured on the H200, batch 1 / 128K at the LLaMA-3-8B shape: this plain loop, one token per warp and
  // iteration, 20.2 ms per step over 32 layers; four tokens' loads in flight per iteration with 4 waves of
  // splits 22.4 ms, plus register-selected code words 28.9 ms: the kernel is bound by its instruction count,
  // not by load latency)
  for (int t = q0 + warp; t < q1; t += NW) {
    uint32_t kca, kcbb, vca, vcbb;
    if constexpr (RW) {  // record bytes read where the lane's codes lie (in the swizzled order of each tensor)
      const uint8_t* rk = kbase + static_cast<int64_t>(t) * krec;
      const uint8_t* rv = vbase + static_cast<int64_t>(t) * vrec;
      const int ksw = t & (kng - 1), vsw = t & (vng - 1);
      kca = rw_code(rk, kga ^ ksw, k_bits, krec), kcbb = rw_code(rk, kgb ^ ksw, k_bits, krec);
      vca = rw_code(rv, vga ^ vsw, v_bits, vrec), vcbb = rw_code(rv, vgb ^ vsw, v_bits, vrec);
    } else {
      uint32_t wk[NWD], wv[NWD];
      load_record<REC>(kbase, t, wk);
      load_record<REC>(vbase, t, wv);
      const int sw = t & (NG - 1);
      kca = code_at<NB>(wk, kga ^ sw), kcbb = code_at<NB>(wk, kgb ^ sw);
      vca = code_at<NB>(wv, vga ^ sw), vcbb = code_at<NB>(wv, vgb ^ sw);
    }
    const float pos = ROT ? static_cast<float>(__ldg(cpos + t)) : 0.f;
    const __half* pka = kcb + (static_cast<int64_t>(kga) * (1 << k_bits) + kca) * k_ch + i0 % k_ch;
    const __half* pkb = kcb + (static_cast<int64_t>(kgb) * (1 << k_bits) + kcbb) * k_ch + (i0 + HALF) % k_ch;
    const __half* pva = vcb + (static_cast<int64_t>(vga) * (1 << v_bits) + vca) * v_ch + i0 % v_ch;
    const __half* pvb = vcb + (static_cast<int64_t>(vgb) * (1 << v_bits) + vcbb) * v_ch + (i0 + HALF) % v_ch;
    float xa[PR], xb[PR], va[PR], vb[PR], ka[PR], kb[PR];
    load_half_vec<PR>(pka, xa);
    load_half_vec<PR>(pkb, xb);
    load_half_vec<PR>(pva, va);
    load_half_vec<PR>(pvb, vb);
    if constexpr (EX) {  // k = k_mean + R_k^T (ks u), v's coded part vs u
      const int64_t so = bh * p.quant_capacity + t;
      const float ks = p.k_scale ? __half2float(p.k_scale[so]) : 1.f;
      const float vs = p.v_scale ? __half2float(p.v_scale[so]) : 1.f;
#pragma unroll
      for (int j = 0; j < PR; ++j) va[j] *= vs, vb[j] *= vs;
      if (p.k_rotation) {  // channel e of R_k^T u = sum_i R_k[i][e] u_i: u through shared memory, R_k rows broadcast
#pragma unroll
        for (int j = 0; j < PR; ++j) sU[warp][i0 + j] = xa[j], sU[warp][i0 + HALF + j] = xb[j];
        __syncwarp();
        float ra[PR], rb[PR];
#pragma unroll
        for (int j = 0; j < PR; ++j) ra[j] = rb[j] = 0.f;
        // four u_i per broadcast load; at head_dim 128 a lane's two channels of a row in one 8-byte load
#pragma unroll 2
        for (int i = 0; i < D; i += 4) {
          const float4 u4 = *reinterpret_cast<const float4*>(&sU[warp][i]);
          const float uu[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float* row = pre_dyn_smem + (i + k) * D;
            if constexpr (PR == 2) {
              const float2 a = *reinterpret_cast<const float2*>(row + i0);
              const float2 c = *reinterpret_cast<const float2*>(row + i0 + HALF);
              ra[0] = fmaf(a.x, uu[k], ra[0]), ra[1] = fmaf(a.y, uu[k], ra[1]);
              rb[0] = fmaf(c.x, uu[k], rb[0]), rb[1] = fmaf(c.y, uu[k], rb[1]);
            } else {
#pragma unroll
              for (int j = 0; j < PR; ++j)
                ra[j] = fmaf(row[i0 + j], uu[k], ra[j]), rb[j] = fmaf(row[i0 + HALF + j], uu[k], rb[j]);
            }
          }
        }
        __syncwarp();  // sU is rewritten by the warp's next token
#pragma unroll
        for (int j = 0; j < PR; ++j) xa[j] = fmaf(ks, ra[j], kma[j]), xb[j] = fmaf(ks, rb[j], kmb[j]);
      } else {
#pragma unroll
        for (int j = 0; j < PR; ++j) xa[j] = fmaf(ks, xa[j], kma[j]), xb[j] = fmaf(ks, xb[j], kmb[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < PR; ++j) {
      if constexpr (!ROT) {
        ka[j] = xa[j], kb[j] = xb[j];
        continue;
      }
      // the runtime's fp32 angle, reduced to [-pi, pi] by two-constant Cody-Waite (exact enough for the
      // angles of positions < 2^24), then the fast sine/cosine (abs error ~2^-21 there)
      const float angle = __fmul_rn(pos, sFreq[i0 + j]);
      const float k = rintf(angle * 0.15915494309189535f);
      const float r = fmaf(k, 1.7484555e-07f, fmaf(-k, 6.28318548202514648f, angle));  // 2pi = hi - 1.7484555e-7
      float sn, cs;
      __sincosf(r, &sn, &cs);
      ka[j] = xa[j] * cs - xb[j] * sn;
      kb[j] = xb[j] * cs + xa[j] * sn;
    }
    accumulate(true, ka, kb, va, vb, nullptr);
  }
  }  // ROT
  float* logits = p.fp16_logits ? p.fp16_logits + (static_cast<int64_t>(b) * p.n_heads + h0) * n_logit : nullptr;
  for (int f = f0 + warp; f < f1; f += NW) {
    const __half* kr = f < na ? p.anchor_k + (bh * p.anchor_capacity + f) * D : p.window_k + (bh * p.window_capacity + (f - na)) * D;
    const __half* vr = f < na ? p.anchor_v + (bh * p.anchor_capacity + f) * D : p.window_v + (bh * p.window_capacity + (f - na)) * D;
    float ka[PR], kb[PR], va[PR], vb[PR];
#pragma unroll
    for (int j = 0; j < PR; ++j) {
      const int i = lane * PR + j;
      ka[j] = __half2float(kr[i]), kb[j] = __half2float(kr[i + HALF]);
      va[j] = __half2float(vr[i]), vb[j] = __half2float(vr[i + HALF]);
    }
    accumulate(false, ka, kb, va, vb, logits ? logits + f : nullptr);
  }
#pragma unroll
  for (int h = 0; h < HT; ++h) {
#pragma unroll
    for (int j = 0; j < PR; ++j) sO[warp][h][lane * PR + j] = oa[h][j], sO[warp][h][lane * PR + j + HALF] = ob[h][j];
    if constexpr (EX)
#pragma unroll
      for (int j = 0; j < PR; ++j)
        sOc[warp][h][lane * PR + j] = oca[h][j], sOc[warp][h][lane * PR + j + HALF] = ocb[h][j];
    if (lane == 0) sML[warp][h][0] = m[h], sML[warp][h][1] = l[h];
  }
  __syncthreads();
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * D;
  for (int i = tid; i < HT * D; i += NT) {
    const int h = i / D, c = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sML[w][h][0]);
    float O = 0.f, L = 0.f, O_coded = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; ++w)
        if (sML[w][h][0] != -INFINITY) {
          const float f = exp2f(sML[w][h][0] - M);
          O = fmaf(f, sO[w][h][c], O);
          if constexpr (EX) O_coded = fmaf(f, sOc[w][h][c], O_coded);
          L = fmaf(f, sML[w][h][1], L);
        }
    }
    const int64_t slot = (static_cast<int64_t>(b) * p.n_heads + h0 + h) * p.n_splits + split;
    wo[slot * D + c] = O;
    if constexpr (EX) wml[static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * 2 + slot * D + c] = O_coded;
    if (c == 0) {
      wml[slot * 2] = M;
      wml[slot * 2 + 1] = L;
    }
  }
}

template <int D, int C, int NB, int HT, bool ROT, bool EX>
void launch_pre_ht(const QuantDecodeParams& p, const DequantWidths& w, dim3 grid, cudaStream_t stream) {
  const auto kernel = quant_pre_split_kernel<D, C, NB, HT, ROT, EX>;
  // R_k (64 KB at head_dim 128; pre-RoPE coded keys) or the post-RoPE stage, with the static arrays more than the
  // default 48 KB
  constexpr int kDyn = ROT && EX ? std::max(D * D * 4, pre_stage_bytes<D, HT>()) : pre_stage_bytes<D, HT>();
  if constexpr (kDyn > 0) {
    static const bool ready = [&] {
      ANTKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kDyn));
      return true;
    }();
    (void)ready;
  }
  const size_t smem = ROT && EX && (p.k_rotation || p.k_mean) ? static_cast<size_t>(D) * D * sizeof(float)
                                                              : static_cast<size_t>(pre_stage_bytes<D, HT>());
  kernel<<<grid, 256, smem, stream>>>(p, w);
  ANTKV_LAUNCH_CHECK("quant_pre_split_kernel");
}

template <int D, int C, int NB, bool ROT, bool EX = false>
void launch_pre(const QuantDecodeParams& p, int ht, cudaStream_t stream, const DequantWidths& w = {}) {
  const int G = p.n_heads / p.n_kv_heads;
  const dim3 grid(p.n_splits, p.n_kv_heads * (G / ht), p.batch);
  switch (ht) {
    case 4: launch_pre_ht<D, C, NB, 4, ROT, EX>(p, w, grid, stream); break;
    case 2: launch_pre_ht<D, C, NB, 2, ROT, EX>(p, w, grid, stream); break;
    default: launch_pre_ht<D, C, NB, 1, ROT, EX>(p, w, grid, stream); break;
  }
}

// Whether decode reads each tensor's widths at run time: keys and values of different configurations, or the coded
// transform on a configuration without lookup tables (c2b8, c4b8).
bool run_time_widths(const QuantDecodeParams& p) {
  return p.value_config.value_or(p.config) != p.config || (p.coded_transform() && !vq_uses_lut(p.config));
}

// The run-time-width instantiations of the dequantize-dot kernel (RoPE at decode or not, coded transform or not).
template <int D>
void launch_run_time_widths(const QuantDecodeParams& p, int ht, cudaStream_t stream) {
  const VqKernelConfigInfo k = vq_kernel_config_info(p.config), v = vq_kernel_config_info(p.value_config.value_or(p.config));
  const DequantWidths w{k.c, k.b, v.c, v.b};
  const bool ex = p.coded_transform();
  if (p.pre_rope) ex ? launch_pre<D, 0, 0, true, true>(p, ht, stream, w) : launch_pre<D, 0, 0, true>(p, ht, stream, w);
  else ex ? launch_pre<D, 0, 0, false, true>(p, ht, stream, w) : launch_pre<D, 0, 0, false>(p, ht, stream, w);
}

// The dequantize-dot kernel: pre-RoPE keys of every configuration (the coded transform on the lookup-table
// widths: EX), and c2b8 / c4b8 post-RoPE (no rotation).
template <int D>
void launch_pre_config(const QuantDecodeParams& p, int ht, cudaStream_t stream) {
  const bool ex = p.coded_transform();
  switch (p.config) {
    case VqKernelConfig::kC8B8:
      ex ? launch_pre<D, 8, 8, true, true>(p, ht, stream) : launch_pre<D, 8, 8, true>(p, ht, stream);
      break;
    case VqKernelConfig::kC16B12:
      ex ? launch_pre<D, 16, 12, true, true>(p, ht, stream) : launch_pre<D, 16, 12, true>(p, ht, stream);
      break;
    case VqKernelConfig::kC16B8:
      ex ? launch_pre<D, 16, 8, true, true>(p, ht, stream) : launch_pre<D, 16, 8, true>(p, ht, stream);
      break;
    case VqKernelConfig::kC16B6:
      ex ? launch_pre<D, 16, 6, true, true>(p, ht, stream) : launch_pre<D, 16, 6, true>(p, ht, stream);
      break;
    case VqKernelConfig::kC4B8:
      p.pre_rope ? launch_pre<D, 4, 8, true>(p, ht, stream) : launch_pre<D, 4, 8, false>(p, ht, stream);
      break;
    case VqKernelConfig::kC2B8:
      p.pre_rope ? launch_pre<D, 2, 8, true>(p, ht, stream) : launch_pre<D, 2, 8, false>(p, ht, stream);
      break;
  }
}

// Resident blocks per multiprocessor of the dequantize-dot kernel (split plans of c2b8 / c4b8).
template <int D, int C>
int pre_blocks_per_sm(int ht) {
  auto query = [](auto kernel, int dyn) {  // (post-RoPE: the stage in dynamic shared memory)
    ANTKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
    int per_sm = 0;
    ANTKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, dyn));
    ANTKV_CHECK(per_sm >= 1, "quant_decode: the dequantize-dot kernel does not fit on a multiprocessor");
    return per_sm;
  };
  static const int n4 = query(quant_pre_split_kernel<D, C, 8, 4, false>, pre_stage_bytes<D, 4>());
  static const int n2 = query(quant_pre_split_kernel<D, C, 8, 2, false>, pre_stage_bytes<D, 2>());
  static const int n1 = query(quant_pre_split_kernel<D, C, 8, 1, false>, pre_stage_bytes<D, 1>());
  return ht == 4 ? n4 : ht == 2 ? n2 : n1;
}

int dequant_blocks_per_sm(int head_dim, VqKernelConfig cfg, int ht) {
  const bool c4 = cfg == VqKernelConfig::kC4B8;
  if (head_dim == 128) return c4 ? pre_blocks_per_sm<128, 4>(ht) : pre_blocks_per_sm<128, 2>(ht);
  return c4 ? pre_blocks_per_sm<64, 4>(ht) : pre_blocks_per_sm<64, 2>(ht);
}

// ---- dispatch over the closed set ----
int heads_per_block(int G, VqKernelConfig cfg) {
  if (cfg == VqKernelConfig::kC16B12) return 1;
  if (G % 4 == 0) return 4;
  if (G % 2 == 0) return 2;
  return 1;
}

bool lut_half_for(VqKernelConfig cfg, bool requested) { return cfg == VqKernelConfig::kC16B12 || requested; }

// LH: whether an fp16-LUT instantiation exists for this configuration (c8b8 only; c16b12 has only fp16);
// ex: the coded-transform instantiation
template <int D, int C, int NB, bool LH, class F>
void with_ht(int ht, bool lh, bool ex, F&& f) {
  auto go = [&](auto ht_tag) {
    constexpr int HT = decltype(ht_tag)::value;
    if constexpr (LH) {
      if (lh) {
        if (ex) f(QCfg<D, C, NB, HT, true, true>{});
        else f(QCfg<D, C, NB, HT, true>{});
        return;
      }
    }
    if (ex) f(QCfg<D, C, NB, HT, false, true>{});
    else f(QCfg<D, C, NB, HT, false>{});
  };
  switch (ht) {
    case 4: go(std::integral_constant<int, 4>{}); break;
    case 2: go(std::integral_constant<int, 2>{}); break;
    default: go(std::integral_constant<int, 1>{}); break;
  }
}

template <int D, class F>
void with_config(VqKernelConfig cfg, int ht, bool lh, bool ex, F&& f) {
  switch (cfg) {
    case VqKernelConfig::kC8B8: with_ht<D, 8, 8, true>(ht, lh, ex, f); break;
    case VqKernelConfig::kC16B8: with_ht<D, 16, 8, false>(ht, false, ex, f); break;
    case VqKernelConfig::kC16B6: with_ht<D, 16, 6, false>(ht, false, ex, f); break;
    case VqKernelConfig::kC16B12:
      if (ex) f(QCfg<D, 16, 12, 1, true, true>{});
      else f(QCfg<D, 16, 12, 1, true>{});
      break;
    case VqKernelConfig::kC4B8:
    case VqKernelConfig::kC2B8: fail("quant_decode: {} has no lookup-table kernel (dequantize-dot)", vq_kernel_config_info(cfg).name);
  }
}

// Calls f(QCfg<...>{}) for the instantiation of (head_dim, cfg, HT, lut_half); errors outside the set.
template <class F>
void dispatch(int head_dim, VqKernelConfig cfg, int ht, bool lut_half, bool ex, F&& f) {
  check_vq_shape(head_dim, cfg);
  ANTKV_CHECK(ht == 1 || ht == 2 || ht == 4, "quant_decode: heads per block {}", ht);
  ANTKV_CHECK(!lut_half || cfg == VqKernelConfig::kC8B8 || cfg == VqKernelConfig::kC16B12,
              "quant_decode: fp16 lookup tables are built for c8b8 and c16b12 only (not {})", vq_kernel_config_info(cfg).name);
  const bool lh = lut_half_for(cfg, lut_half);
  if (head_dim == 128) with_config<128>(cfg, ht, lh, ex, f);
  else with_config<64>(cfg, ht, lh, ex, f);
}

template <class CF>
void set_smem_attr() {
  static const bool done = [] {
    ANTKV_CUDA_CHECK(cudaFuncSetAttribute(quant_split_kernel<CF>, cudaFuncAttributeMaxDynamicSharedMemorySize, CF::SMEM));
    return true;
  }();
  (void)done;
}

template <class CF>
int blocks_per_sm() {
  static const int n = [] {
    set_smem_attr<CF>();
    int per_sm = 0;
    ANTKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, quant_split_kernel<CF>, CF::NT, CF::SMEM));
    ANTKV_CHECK(per_sm >= 1, "quant_decode: the split kernel does not fit on a multiprocessor");
    return per_sm;
  }();
  return n;
}

template <int D, bool CODED>
void launch_reduce(const QuantDecodeParams& p, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.n_heads, p.batch);
  cfg.blockDim = dim3(D);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if constexpr (CODED) {
    ANTKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, quant_reduce_coded_kernel<D>, p));
    ANTKV_LAUNCH_CHECK("quant_reduce_coded_kernel");
  } else {
    ANTKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, quant_reduce_kernel<D>, p));
    ANTKV_LAUNCH_CHECK(D == 64 ? "quant_reduce_kernel<64>" : "quant_reduce_kernel<128>");
  }
}

// ---- quantize ----
template <int D, int C, int NB>
__global__ void __launch_bounds__(128) quantize_kernel(const QuantizeParams p) {
  constexpr int NG = D / C, K = 1 << NB, REC = NG * NB / 8;
  __shared__ float sX[D];
  __shared__ int32_t sCode[NG];
  const int i = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t xoff = static_cast<int64_t>(i) * p.x_row_stride + static_cast<int64_t>(h) * D;
  for (int c = tid; c < D; c += blockDim.x) {
    float v;
    if (p.x_type == ElemType::kF32) v = static_cast<const float*>(p.x)[xoff + c];
    else if (p.x_type == ElemType::kF16) v = __half2float(static_cast<const __half*>(p.x)[xoff + c]);
    else v = __bfloat162float(static_cast<const bf16*>(p.x)[xoff + c]);
    sX[c] = v;
  }
  __syncthreads();
  for (int g = warp; g < NG; g += blockDim.x / 32) {
    float xv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) xv[c] = sX[g * C + c];
    const __half* cb = p.centroids + (static_cast<int64_t>(h) * NG + g) * K * C;
    const float* scb = p.search_centroids ? p.search_centroids + (static_cast<int64_t>(h) * NG + g) * K * C : nullptr;
    float best = INFINITY;
    int arg = 0;
    for (int code = lane; code < K; code += 32) {
      float cen[C];
      if (scb) {  // metric=task: the mapped centroids L^T c (x is mapped too)
#pragma unroll
        for (int c = 0; c < C; ++c) cen[c] = scb[static_cast<int64_t>(code) * C + c];
      } else {
        load_half_vec<C>(cb + static_cast<int64_t>(code) * C, cen);
      }
      float d = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float diff = __fsub_rn(xv[c], cen[c]);
        d = __fadd_rn(d, __fmul_rn(diff, diff));  // no FMA: the same rounding as vq_encode on the host
      }
      if (d < best) best = d, arg = code;  // increasing codes: ties keep the lowest
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, off);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, off);
      if (ob < best || (ob == best && oa < arg)) best = ob, arg = oa;
    }
    if (lane == 0) sCode[g] = arg;
  }
  __syncthreads();
  __shared__ float sNorm[4];
  if (p.norms) {  // gain: |u|^2 of the codes' fp16 centroids (original space), channel by channel
    float sq = 0.f;
    for (int c = tid; c < D; c += blockDim.x) {
      const int g = c / C;
      const float x = __half2float(p.centroids[((static_cast<int64_t>(h) * NG + g) * K + sCode[g]) * C + c % C]);
      sq = fmaf(x, x, sq);
    }
    sq = warp_sum(sq);
    if (lane == 0) sNorm[warp] = sq;
    __syncthreads();
  }
  if (tid == 0) {
    const int seq = p.seq_index[i];
    const int t = p.slot_per_head ? p.slot_per_head[static_cast<int64_t>(i) * p.n_kv_heads + h] : p.slot[i];
    const bool ok = seq >= 0 && seq < p.batch && t >= 0 && t < p.capacity;
    if (p.norms && ok) {  // the stored norm over |u|: one fp16 scale per token and head
      float usq = 0.f;
      for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) usq += sNorm[w];
      const float norm = p.norms[static_cast<int64_t>(i) * p.n_kv_heads + h];
      p.scales[(static_cast<int64_t>(seq) * p.n_kv_heads + h) * p.capacity + t] =
          __float2half_rn(usq > 0.f ? norm / sqrtf(usq) : 0.f);
    }
    if (p.codes_out)
      for (int g = 0; g < NG; ++g) p.codes_out[(static_cast<int64_t>(i) * p.n_kv_heads + h) * NG + g] = ok ? sCode[g] : -1;
    if (ok) {
      uint8_t rec[REC];
#pragma unroll
      for (int j = 0; j < REC; ++j) rec[j] = 0;
      const int sw = t & (NG - 1);
      for (int j = 0; j < NG; ++j) {
        const uint32_t code = static_cast<uint32_t>(sCode[j ^ sw]);
        for (int bit = 0; bit < NB; ++bit)
          if ((code >> bit) & 1u) rec[(j * NB + bit) >> 3] |= static_cast<uint8_t>(1u << ((j * NB + bit) & 7));
      }
      uint8_t* dst = p.codes + ((static_cast<int64_t>(seq) * p.n_kv_heads + h) * p.capacity + t) * REC;
#pragma unroll
      for (int j = 0; j < REC; ++j) dst[j] = rec[j];
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

int quant_decode_tile() { return kTile; }

QuantDecodePlan plan_quant_decode(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg,
                                  int64_t max_quant_len, bool lut_half, int waves, bool coded) {
  ANTKV_CHECK(batch > 0 && n_kv_heads > 0 && n_heads > 0 && n_heads % n_kv_heads == 0 && max_quant_len >= 0 && waves > 0,
              "plan_quant_decode: bad sizes");
  const int G = n_heads / n_kv_heads;
  QuantDecodePlan plan;
  plan.heads_per_block = heads_per_block(G, cfg);
  if (vq_uses_lut(cfg))
    dispatch(head_dim, cfg, plan.heads_per_block, lut_half, coded,
             [&](auto cf) { plan.blocks_per_sm = blocks_per_sm<decltype(cf)>(); });
  else
    plan.blocks_per_sm = (check_vq_shape(head_dim, cfg), dequant_blocks_per_sm(head_dim, cfg, plan.heads_per_block));
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads * (G / plan.heads_per_block);
  const int64_t want = static_cast<int64_t>(waves) * plan.blocks_per_sm * device_sm_count();
  int64_t n_splits = std::clamp<int64_t>(want / units, 1, kMaxQuantSplits);
  int64_t split_len = (std::max<int64_t>(max_quant_len, 1) + n_splits - 1) / n_splits;
  split_len = std::clamp<int64_t>((split_len + kTile - 1) / kTile * kTile, kTile, kMaxSplitLen);
  n_splits = std::max<int64_t>(1, (max_quant_len + split_len - 1) / split_len);
  ANTKV_CHECK(n_splits <= kMaxQuantSplits, "plan_quant_decode: {} quantized tokens need {} splits (at most {})",
              max_quant_len, n_splits, kMaxQuantSplits);
  plan.n_splits = static_cast<int>(n_splits);
  plan.split_len = static_cast<int>(split_len);
  return plan;
}

int quant_decode_max_splits(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg, int64_t max_quant_len,
                            bool lut_half, int waves, bool coded) {
  ANTKV_CHECK(batch > 0 && n_kv_heads > 0 && n_heads > 0 && n_heads % n_kv_heads == 0 && waves > 0,
              "quant_decode_max_splits: bad sizes");
  const int G = n_heads / n_kv_heads;
  const int ht = heads_per_block(G, cfg);
  int bpsm = 1;
  if (vq_uses_lut(cfg))
    dispatch(head_dim, cfg, ht, lut_half, coded, [&](auto cf) { bpsm = blocks_per_sm<decltype(cf)>(); });
  else
    bpsm = (check_vq_shape(head_dim, cfg), dequant_blocks_per_sm(head_dim, cfg, ht));
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads * (G / ht);
  const int64_t want = static_cast<int64_t>(waves) * bpsm * device_sm_count();
  // plan_quant_decode's first estimate (rounding the split length up only lowers it), or what the longest
  // split length needs
  const int64_t first = std::clamp<int64_t>(want / units, 1, kMaxQuantSplits);
  const int64_t longest = (std::max<int64_t>(max_quant_len, 1) + kMaxSplitLen - 1) / kMaxSplitLen;
  return static_cast<int>(std::min<int64_t>(std::max(first, longest), kMaxQuantSplits));
}

int64_t quant_decode_workspace_floats(int batch, int n_heads, int head_dim, int n_splits, bool coded_transform) {
  return static_cast<int64_t>(batch) * n_heads * n_splits * (head_dim + 2 + (coded_transform ? head_dim : 0));
}

void quant_decode(QuantDecodeParams p, cudaStream_t stream) {
  check_vq_shape(p.head_dim, p.config);
  ANTKV_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "quant_decode: n_heads {} must be a multiple of n_kv_heads {}", p.n_heads, p.n_kv_heads);
  ANTKV_CHECK(p.batch > 0 && p.batch <= 65535, "quant_decode: batch {} out of range", p.batch);
  ANTKV_CHECK(p.q && p.out && p.workspace && p.n_quant && p.n_anchor && p.n_window, "quant_decode: null pointer");
  ANTKV_CHECK(p.quant_capacity >= 0 && p.anchor_capacity >= 0 && p.window_capacity >= 0, "quant_decode: bad capacity");
  ANTKV_CHECK(p.quant_capacity == 0 || (p.k_codes && p.v_codes && p.k_centroids && p.v_centroids),
              "quant_decode: codes and codebooks are required when quant_capacity > 0");
  ANTKV_CHECK(p.anchor_capacity == 0 || (p.anchor_k && p.anchor_v), "quant_decode: anchor K/V are null");
  ANTKV_CHECK(p.window_capacity == 0 || (p.window_k && p.window_v), "quant_decode: window K/V are null");
  if (p.value_config) check_vq_shape(p.head_dim, *p.value_config);
  const bool rw = run_time_widths(p);
  if (!rw) {  // the compile-time kernels load whole records (the run-time-width kernel reads bytes)
    const int rec = vq_record_bytes(p.head_dim, p.config);
    const int align = rec % 16 == 0 ? 16 : rec % 8 == 0 ? 8 : rec % 4 == 0 ? 4 : rec % 2 == 0 ? 2 : 1;
    ANTKV_CHECK(reinterpret_cast<uintptr_t>(p.k_codes) % align == 0 && reinterpret_cast<uintptr_t>(p.v_codes) % align == 0,
                "quant_decode: code arenas must be {}-byte aligned", align);
  }
  ANTKV_CHECK(aligned16(p.k_centroids) && aligned16(p.v_centroids) && aligned16(p.anchor_k) && aligned16(p.anchor_v) &&
                  aligned16(p.window_k) && aligned16(p.window_v),
              "quant_decode: codebooks and FP16 buffers must be 16-byte aligned");
  const int G = p.n_heads / p.n_kv_heads;
  // (the run-time-width kernel has no lookup tables: c16b12's one head per block is the split kernel's)
  const int ht = heads_per_block(G, rw ? VqKernelConfig::kC8B8 : p.config);
  ANTKV_CHECK(static_cast<int64_t>(p.n_kv_heads) * (G / ht) <= 65535, "quant_decode: too many heads");
  ANTKV_CHECK(p.n_splits >= 1 && p.n_splits <= kMaxQuantSplits && p.split_len > 0 && p.split_len % kTile == 0 &&
                  p.split_len <= kMaxSplitLen,
              "quant_decode: bad split plan ({} splits of {} slots)", p.n_splits, p.split_len);
  const bool coded = p.coded_transform();
  ANTKV_CHECK(p.workspace_floats >= quant_decode_workspace_floats(p.batch, p.n_heads, p.head_dim, p.n_splits, coded),
              "quant_decode: workspace of {} floats is too small", p.workspace_floats);
  ANTKV_CHECK(p.pre_rope ? !p.q_rot && !p.q_mean : !p.k_rotation && !p.k_mean,
              "quant_decode: {} keys take their basis as {} (RoPE does not commute with the basis, so a pre-RoPE key "
              "is mapped back per token; a post-RoPE query is rotated once)",
              p.pre_rope ? "pre-RoPE" : "post-RoPE", p.pre_rope ? "k_rotation / k_mean, not q_rot / q_mean"
                                                               : "q_rot / q_mean, not k_rotation / k_mean");
  ANTKV_CHECK(!p.k_rotation || aligned16(p.k_rotation), "quant_decode: k_rotation must be 16-byte aligned");
  ANTKV_CHECK(!p.pre_rope || p.quant_capacity == 0 || (p.code_pos && p.inv_freq),
              "quant_decode: pre-RoPE keys need code positions and inv_freq");
  if (rw) {
    if (p.head_dim == 128) launch_run_time_widths<128>(p, ht, stream);
    else launch_run_time_widths<64>(p, ht, stream);
  } else if (p.pre_rope || !vq_uses_lut(p.config)) {
    if (p.head_dim == 128) launch_pre_config<128>(p, ht, stream);
    else launch_pre_config<64>(p, ht, stream);
  } else {
    dispatch(p.head_dim, p.config, ht, p.lut_half, coded, [&](auto cf) {
      using CF = decltype(cf);
      set_smem_attr<CF>();
      const dim3 grid(p.n_splits, p.n_kv_heads * (G / ht), p.batch);
      quant_split_kernel<CF><<<grid, CF::NT, CF::SMEM, stream>>>(p);
      ANTKV_LAUNCH_CHECK("quant_split_kernel");
    });
  }
  if (coded) {
    if (p.head_dim == 128) launch_reduce<128, true>(p, stream);
    else launch_reduce<64, true>(p, stream);
  } else {
    if (p.head_dim == 128) launch_reduce<128, false>(p, stream);
    else launch_reduce<64, false>(p, stream);
  }
}

void quantize_kv(QuantizeParams p, cudaStream_t stream) {
  check_vq_shape(p.head_dim, p.config);
  ANTKV_CHECK(p.n_tokens >= 0 && p.n_kv_heads > 0 && p.n_kv_heads <= 65535 && p.batch > 0 && p.capacity > 0,
              "quantize_kv: bad sizes");
  if (p.n_tokens == 0) return;
  ANTKV_CHECK(p.x && p.centroids && p.seq_index && (p.slot || p.slot_per_head) && p.codes, "quantize_kv: null pointer");
  ANTKV_CHECK(p.x_type == ElemType::kF16 || p.x_type == ElemType::kBF16 || p.x_type == ElemType::kF32,
              "quantize_kv: input type {} is not supported", elem_type_name(p.x_type));
  ANTKV_CHECK(p.x_row_stride >= static_cast<int64_t>(p.n_kv_heads) * p.head_dim, "quantize_kv: row stride too small");
  ANTKV_CHECK(aligned16(p.centroids), "quantize_kv: centroids must be 16-byte aligned");
  ANTKV_CHECK(!p.norms || p.scales, "quantize_kv: norms given without the scales to write");
  const dim3 grid(p.n_tokens, p.n_kv_heads);
  auto go = [&](auto kernel) {
    kernel<<<grid, 128, 0, stream>>>(p);
    ANTKV_LAUNCH_CHECK("quantize_kernel");
  };
  const bool d128 = p.head_dim == 128;
  switch (p.config) {
    case VqKernelConfig::kC8B8: d128 ? go(quantize_kernel<128, 8, 8>) : go(quantize_kernel<64, 8, 8>); break;
    case VqKernelConfig::kC16B12: d128 ? go(quantize_kernel<128, 16, 12>) : go(quantize_kernel<64, 16, 12>); break;
    case VqKernelConfig::kC16B8: d128 ? go(quantize_kernel<128, 16, 8>) : go(quantize_kernel<64, 16, 8>); break;
    case VqKernelConfig::kC16B6: d128 ? go(quantize_kernel<128, 16, 6>) : go(quantize_kernel<64, 16, 6>); break;
    case VqKernelConfig::kC4B8: d128 ? go(quantize_kernel<128, 4, 8>) : go(quantize_kernel<64, 4, 8>); break;
    case VqKernelConfig::kC2B8: d128 ? go(quantize_kernel<128, 2, 8>) : go(quantize_kernel<64, 2, 8>); break;
  }
}

}  // namespace antkv::cuda
