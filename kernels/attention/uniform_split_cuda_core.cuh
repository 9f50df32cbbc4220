// The uniform cache's decode split kernel on the CUDA cores (fp32 FMAs), the kernel before the tensor-core one of
// uniform_decode.cu: kept beside it as a second GPU implementation (antkv-eval bench --uniform-kernel cuda-core,
// and the tests check both against the CPU reference), so a run can compare the two on one machine. Its code is
// main's kernel as it was (the stream pointers too, unshared: a shared helper changed its register allocation).
// Included by uniform_decode.cu only (inside its anonymous namespace; needs kLog2e, kMaxSplits and dev::).
#pragma once

constexpr int kTileCC = 128;  // tokens per tile = threads per split block

// A code (< 2^23) as a float without I2F (a quarter-rate instruction on Hopper): 2^23 + code has the code in
// its mantissa, and subtracting 2^23 is exact.
__device__ __forceinline__ float code_to_float(uint32_t code) { return __uint_as_float(0x4B000000u | code) - 8388608.f; }

// One block of 128 threads per (split, KV head x HT query heads, sequence). Split s takes the quantized key
// blocks' tokens [s * split_len, min(k_end, (s + 1) * split_len)); the last split then also takes the residual
// [k_end, len) (FP16 keys; values quantized below v_end, FP16 above), so the grid is whole waves of code work.
// Per tile of 128 tokens:
//  A (quantized tiles) per key block of the tile: sQS = q_c * s_c (log2 units) and q . z in per-warp partials;
//  B thread t scores token t for the HT heads (its WPT code words, one row per thread, from shared memory);
//  C warp h updates head h's running max / sum and writes (p * s_v, p * z_v) per token and value group;
//  D warp w accumulates tokens w, w+4, ...: lane l owns channels l*CPL .. l*CPL+CPL-1 (one 32-bit code word
//    read per token, 8 tokens' words loaded before use), o += (p s) code, oz += p z (the zero term, added to
//    every channel of the group at the end).
// A quantized tile's key codes and key/value scales arrive by cp.async, issued for tile k+1 once C of tile k
// is done (their last reader), so the loads fly during D and A (ncu: L1TEX scoreboard stalls were 53% of the
// cycles when B loaded its rows itself).
// The split's record (O unnormalized, m, l in log2 units) goes to the workspace for uniform_combine_kernel.
template <int D, int BITS, int HT>
__global__ void __launch_bounds__(kTileCC, 4) uniform_split_cuda_core_kernel(const UniformDecodeParams p) {
  constexpr int WPT = D * BITS / 32, CPW = 32 / BITS, CPL = D / 32, NW = kTileCC / 32;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  constexpr int MAXTB = kTileCC / 32, MAXNVG = D / 32;  // group >= 32
  __shared__ float sQ[HT][D];
  __shared__ float sQS[MAXTB][HT][D];
  __shared__ float sQZ[MAXTB][HT][D / 32];
  __shared__ float sS[HT][kTileCC];
  __shared__ float2 sPSZ[HT][MAXNVG][kTileCC];
  __shared__ float sM[HT], sL[HT], sAlpha[HT];
  __shared__ __align__(16) uint32_t sK[kTileCC * WPT];       // the tile's key code rows
  __shared__ __align__(16) __half2 sKSZ[MAXTB * D];        // its key blocks' (scale, zero) per channel
  __shared__ __align__(16) __half2 sVSZ[kTileCC * MAXNVG];   // its tokens' value (scale, zero) per group, [t][g]
  // the split's record is merged in sQS's storage after the last tile (same size: MAXTB = NW)
  static_assert(MAXTB == NW, "sO aliases sQS");
  float (*sO)[HT][D] = sQS;

  const int split = blockIdx.x, b = blockIdx.z;
  const int G = p.n_heads / p.n_kv_heads, tiles = G / HT;
  const int kvh = blockIdx.y / tiles, h0 = kvh * G + (blockIdx.y % tiles) * HT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int len = p.lens[b];
  if (len < 1 || len > p.capacity) return;  // uniform_combine_kernel writes NaN for this sequence
  const int grp = p.group, vgs = min(grp, D), nvg = D / vgs, R = grp + p.window;
  const int KB = (p.capacity + grp - 1) / grp;
  const UniformCounts cn = uniform_counts(len, grp, p.window);
  const int64_t bk = static_cast<int64_t>(b) * p.n_kv_heads + kvh;
  const uint32_t* kc = p.k_codes + bk * KB * grp * WPT;
  const __half2* ksz = p.k_sz + bk * KB * D;
  const uint32_t* vc = p.v_codes + bk * p.capacity * WPT;
  const __half2* vsz = p.v_sz + bk * p.capacity * nvg;
  const __half* rk = p.ring_k + bk * R * D;
  const __half* rv = p.ring_v + bk * R * D;

  // the quantized tile at tb (n tokens, a multiple of the group): codes and scales into shared memory
  auto prefetch = [&](int tb, int n) {
    const uint4* srck = reinterpret_cast<const uint4*>(kc + static_cast<int64_t>(tb) * WPT);
    for (int e = tid; e < n * WPT / 4; e += kTileCC) dev::cp_async_16(&sK[4 * e], srck + e, true);
    const uint4* srcs = reinterpret_cast<const uint4*>(ksz + static_cast<int64_t>(tb / grp) * D);
    for (int e = tid; e < n / grp * D / 4; e += kTileCC) dev::cp_async_16(&sKSZ[4 * e], srcs + e, true);
    for (int e = tid; e < n * nvg; e += kTileCC) dev::cp_async_4(&sVSZ[e], vsz + static_cast<int64_t>(tb) * nvg + e);
    dev::cp_async_commit();
  };

  for (int e = tid; e < HT * D; e += kTileCC)
    sQ[e / D][e % D] =
        __bfloat162float(p.q[(static_cast<int64_t>(b) * p.n_heads + h0 + e / D) * D + e % D]) * p.scale * kLog2e;
  if (tid < HT) sM[tid] = -INFINITY, sL[tid] = 0.f;
  float o[HT][CPL], oz[HT];
#pragma unroll
  for (int h = 0; h < HT; ++h) {
    oz[h] = 0.f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) o[h][j] = 0.f;
  }
  const int c0 = lane * CPL, lg = c0 / vgs, wi = c0 * BITS / 32, sh = c0 * BITS % 32;
  __syncthreads();

  for (int pass = 0; pass < 2; ++pass) {
    const bool resid = pass == 1;
    if (resid && split != p.n_splits - 1) break;
    const int t0 = resid ? cn.k_end : split * p.split_len;
    const int t1 = resid ? len : min(cn.k_end, t0 + p.split_len);
    if (!resid && t0 < t1) prefetch(t0, min(kTileCC, t1 - t0));
    for (int tb = t0; tb < t1; tb += kTileCC) {
      const int n = min(kTileCC, t1 - tb);
      if (!resid) {  // A: tb and n are multiples of the group (split_len a multiple of 128, k_end of the group)
        dev::cp_async_wait<0>();
        __syncthreads();  // the tile's codes and scales visible to the block
        const int nb = n / grp;
        for (int e = tid; e < nb * D; e += kTileCC) {  // D a multiple of 32: a warp's entries share one block
          const int bi = e / D, c = e % D;
          const float2 sz = __half22float2(sKSZ[e]);
#pragma unroll
          for (int h = 0; h < HT; ++h) {
            const float qv = sQ[h][c];
            sQS[bi][h][c] = qv * sz.x;
            const float qz = dev::warp_sum(qv * sz.y);
            if (lane == 0) sQZ[bi][h][c / 32] = qz;
          }
        }
        __syncthreads();
      }
      // B: scores
      {
        const int t = tid, i = tb + t;
        float s[HT];
        if (t < n) {
          if (!resid) {
            const int bi = t / grp;
            uint32_t w[WPT];
#pragma unroll
            for (int k = 0; k < WPT / 4; ++k) {
              const uint4 u = *reinterpret_cast<const uint4*>(&sK[t * WPT + 4 * k]);
              w[4 * k] = u.x, w[4 * k + 1] = u.y, w[4 * k + 2] = u.z, w[4 * k + 3] = u.w;
            }
#pragma unroll
            for (int h = 0; h < HT; ++h) {
              float z = 0.f;
#pragma unroll
              for (int j = 0; j < D / 32; ++j) z += sQZ[bi][h][j];
              s[h] = z;
            }
#pragma unroll
            for (int ww = 0; ww < WPT; ++ww) {
              float cf[CPW];
#pragma unroll
              for (int k = 0; k < CPW; ++k) cf[k] = code_to_float((w[ww] >> (k * BITS)) & MASK);
              // q_c s_c four channels per shared-memory load (a broadcast: every lane reads the same address)
#pragma unroll
              for (int k4 = 0; k4 < CPW / 4; ++k4)
#pragma unroll
                for (int h = 0; h < HT; ++h) {
                  const float4 qs = *reinterpret_cast<const float4*>(&sQS[bi][h][ww * CPW + 4 * k4]);
                  s[h] = fmaf(qs.x, cf[4 * k4], s[h]);
                  s[h] = fmaf(qs.y, cf[4 * k4 + 1], s[h]);
                  s[h] = fmaf(qs.z, cf[4 * k4 + 2], s[h]);
                  s[h] = fmaf(qs.w, cf[4 * k4 + 3], s[h]);
                }
            }
          } else {
            const uint4* src = reinterpret_cast<const uint4*>(rk + static_cast<int64_t>(i % R) * D);
#pragma unroll
            for (int h = 0; h < HT; ++h) s[h] = 0.f;
#pragma unroll 4
            for (int k = 0; k < D / 8; ++k) {
              const uint4 u = src[k];
              const __half2* hv = reinterpret_cast<const __half2*>(&u);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float2 f = __half22float2(hv[j]);
#pragma unroll
                for (int h = 0; h < HT; ++h) s[h] = fmaf(sQ[h][8 * k + 2 * j + 1], f.y, fmaf(sQ[h][8 * k + 2 * j], f.x, s[h]));
              }
            }
            if (i < cn.v_end)
              for (int g = 0; g < nvg; ++g) sVSZ[t * nvg + g] = vsz[static_cast<int64_t>(i) * nvg + g];
          }
        } else {
#pragma unroll
          for (int h = 0; h < HT; ++h) s[h] = -INFINITY;
        }
#pragma unroll
        for (int h = 0; h < HT; ++h) sS[h][t] = s[h];
      }
      __syncthreads();
      // C: online softmax, warp h for head h
      if (warp < HT) {
        const int h = warp;
        float sv[kTileCC / 32], mx = -INFINITY;
#pragma unroll
        for (int k = 0; k < kTileCC / 32; ++k) sv[k] = sS[h][lane + 32 * k], mx = fmaxf(mx, sv[k]);
        mx = dev::warp_max(mx);  // finite: the tile holds n >= 1 tokens
        const float m_old = sM[h], m_new = fmaxf(m_old, mx);
        const float alpha = exp2f(m_old - m_new);  // 0 while m_old = -inf
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < kTileCC / 32; ++k) {
          const int t = lane + 32 * k, i = tb + t;
          if (t < n) {
            const float pv = exp2f(sv[k] - m_new);
            sum += pv;
            if (resid && i >= cn.v_end) {
              sPSZ[h][0][t] = make_float2(pv, 0.f);
            } else {
              for (int g = 0; g < nvg; ++g) {
                const float2 sz = __half22float2(sVSZ[t * nvg + g]);
                sPSZ[h][g][t] = make_float2(pv * sz.x, pv * sz.y);
              }
            }
          }
        }
        sum = dev::warp_sum(sum);
        __syncwarp();  // every lane has read sM[h] and sL[h] before lane 0 writes them
        if (lane == 0) {
          sM[h] = m_new;
          sL[h] = sL[h] * alpha + sum;
          sAlpha[h] = alpha;
        }
      }
      __syncthreads();
      // the next quantized tile's codes and scales (sK, sKSZ, sVSZ were last read above)
      if (!resid && tb + kTileCC < t1) prefetch(tb + kTileCC, min(kTileCC, t1 - tb - kTileCC));
      // D: values
#pragma unroll
      for (int h = 0; h < HT; ++h) {
        const float a = sAlpha[h];
        oz[h] *= a;
#pragma unroll
        for (int j = 0; j < CPL; ++j) o[h][j] *= a;
      }
      if (!resid) {
        for (int k0 = 0; k0 < kTileCC / NW; k0 += 8) {
          uint32_t wv[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            const int t = warp + NW * (k0 + u);
            wv[u] = t < n ? __ldg(vc + static_cast<int64_t>(tb + t) * WPT + wi) >> sh : 0u;
          }
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            const int t = warp + NW * (k0 + u);
            if (t < n) {
              float cf[CPL];
#pragma unroll
              for (int j = 0; j < CPL; ++j) cf[j] = code_to_float((wv[u] >> (j * BITS)) & MASK);
#pragma unroll
              for (int h = 0; h < HT; ++h) {
                const float2 psz = sPSZ[h][lg][t];
                oz[h] += psz.y;
#pragma unroll
                for (int j = 0; j < CPL; ++j) o[h][j] = fmaf(psz.x, cf[j], o[h][j]);
              }
            }
          }
        }
      } else {
        for (int t = warp; t < n; t += NW) {
          const int i = tb + t;
          if (i < cn.v_end) {
            const uint32_t word = __ldg(vc + static_cast<int64_t>(i) * WPT + wi) >> sh;
#pragma unroll
            for (int h = 0; h < HT; ++h) {
              const float2 psz = sPSZ[h][lg][t];
              oz[h] += psz.y;
#pragma unroll
              for (int j = 0; j < CPL; ++j) o[h][j] = fmaf(psz.x, code_to_float((word >> (j * BITS)) & MASK), o[h][j]);
            }
          } else {
            const __half* vr = rv + static_cast<int64_t>(i % R) * D + c0;
            float v[CPL];
#pragma unroll
            for (int j = 0; j < CPL; j += 2) {
              const float2 f = __half22float2(*reinterpret_cast<const __half2*>(vr + j));
              v[j] = f.x, v[j + 1] = f.y;
            }
#pragma unroll
            for (int h = 0; h < HT; ++h) {
              const float pv = sPSZ[h][0][t].x;
#pragma unroll
              for (int j = 0; j < CPL; ++j) o[h][j] = fmaf(pv, v[j], o[h][j]);
            }
          }
        }
      }
    }
  }

  // the split's record: warps summed in shared memory
  __syncthreads();  // sQS's last reader (phase B) and every warp's phase D done
#pragma unroll
  for (int h = 0; h < HT; ++h)
#pragma unroll
    for (int j = 0; j < CPL; ++j) sO[warp][h][c0 + j] = o[h][j] + oz[h];
  __syncthreads();
  const int NS = p.n_splits;
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * NS * D;
  for (int e = tid; e < HT * D; e += kTileCC) {
    const int h = e / D, c = e % D;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) acc += sO[w][h][c];
    const int64_t slot = (static_cast<int64_t>(b) * p.n_heads + h0 + h) * NS + split;
    wo[slot * D + c] = acc;
    if (c == 0) {
      wml[slot * 2] = sM[h];
      wml[slot * 2 + 1] = sL[h];
    }
  }
}
