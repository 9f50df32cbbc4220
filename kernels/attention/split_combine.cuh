// The second step of split attention (flash-decoding), shared by the fp16 decode (flash_decode.cu: the last
// split block of each (sequence, kv head) combines the group's heads) and the quantized decode
// (quant_decode.cu: one block per (head, sequence)): the splits' partial softmax results are merged into
// the output row and its log-sum-exp.
//
// Workspace layout (both kernels), for nh = batch * n_heads rows and S = n_splits:
//   O partials [nh, S, D]: sum_j exp2(s_j - m) v_j over the split's keys (unnormalized), fp32
//   (m, l)     [nh, S, 2]: the split's log2-domain maximum m and sum l = sum_j exp2(s_j - m)
// A split without keys has m = -inf and O = l = 0 (weight 0 below); at least one combined split of each
// row must hold a key.
// Combine, per row: M = max_s m_s, w_s = exp2(m_s - M), L = sum_s w_s l_s, out = sum_s w_s O_s / L (bf16),
// lse = (M + log2 L) ln 2.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common/device_utils.cuh"

namespace antkv::cuda::dev {

// Floats of shared memory combine_splits needs for `rows` rows of `n_valid` splits.
__host__ __device__ constexpr int split_combine_smem_floats(int rows, int n_valid) { return 2 * rows * n_valid + 2 * rows; }

// Combines the first n_valid splits of rows row0 .. row0 + rows - 1 (consecutive, as a GQA group's query
// heads are) into out[row * D ..] and lse[row] (lse may be null). Called by all NT threads of the block (NT a
// multiple of 32); smem: split_combine_smem_floats(rows, n_valid) floats. Partials are read through L2
// (__ldcg): other blocks or the previous kernel wrote them.
template <int D, int NT>
__device__ __forceinline__ void combine_splits(const float* workspace, int64_t n_rows_total, int n_splits, int64_t row0,
                                               int rows, int n_valid, float* smem, __nv_bfloat16* out, float* lse) {
  static_assert(D % 4 == 0 && NT % 32 == 0, "combine_splits: D a multiple of 4, whole warps");
  constexpr int kWarps = NT / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* wo = workspace;
  const float* wml = workspace + n_rows_total * n_splits * D;
  float* sW = smem;                    // [rows][n_valid]: split maxima, then weights
  float* sL = sW + rows * n_valid;     // [rows][n_valid]: split sums
  float* sMg = sL + rows * n_valid;    // [rows]: row maximum
  float* sLg = sMg + rows;             // [rows]: row sum
  for (int idx = tid; idx < rows * n_valid; idx += NT) {
    const int g = idx / n_valid, s = idx % n_valid;
    const int64_t slot = (row0 + g) * n_splits + s;
    sW[idx] = __ldcg(wml + slot * 2);
    sL[idx] = __ldcg(wml + slot * 2 + 1);
  }
  __syncthreads();
  for (int g = warp; g < rows; g += kWarps) {
    float m = -INFINITY;
    for (int s = lane; s < n_valid; s += 32) m = fmaxf(m, sW[g * n_valid + s]);
    m = warp_max(m);  // finite: some split of the row holds a key
    float l = 0.f;
    for (int s = lane; s < n_valid; s += 32) {
      const float f = exp2f(sW[g * n_valid + s] - m);  // 0 for a split without keys (m_s = -inf)
      sW[g * n_valid + s] = f;
      l += f * sL[g * n_valid + s];
    }
    l = warp_sum(l);
    if (lane == 0) {
      sMg[g] = m;
      sLg[g] = l;
    }
  }
  __syncthreads();
  // one float4 of channels per item, 8 splits' loads in flight per thread
  for (int idx = tid; idx < rows * (D / 4); idx += NT) {
    const int g = idx / (D / 4), c = (idx % (D / 4)) * 4;
    const float4* po = reinterpret_cast<const float4*>(wo + (row0 + g) * n_splits * D + c);
    const float* w = sW + g * n_valid;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    int s = 0;
    for (; s + 8 <= n_valid; s += 8) {
      float4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = __ldcg(po + static_cast<int64_t>(s + u) * (D / 4));
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        acc.x += w[s + u] * v[u].x;
        acc.y += w[s + u] * v[u].y;
        acc.z += w[s + u] * v[u].z;
        acc.w += w[s + u] * v[u].w;
      }
    }
    for (; s < n_valid; ++s) {
      const float4 v = __ldcg(po + static_cast<int64_t>(s) * (D / 4));
      acc.x += w[s] * v.x;
      acc.y += w[s] * v.y;
      acc.z += w[s] * v.z;
      acc.w += w[s] * v.w;
    }
    const float inv_l = 1.f / sLg[g];
    __nv_bfloat16* o = out + (row0 + g) * D + c;
    o[0] = __float2bfloat16_rn(acc.x * inv_l);
    o[1] = __float2bfloat16_rn(acc.y * inv_l);
    o[2] = __float2bfloat16_rn(acc.z * inv_l);
    o[3] = __float2bfloat16_rn(acc.w * inv_l);
    if (lse && c == 0) lse[row0 + g] = (sMg[g] + log2f(sLg[g])) * 0.6931471805599453f;
  }
}

}  // namespace antkv::cuda::dev
