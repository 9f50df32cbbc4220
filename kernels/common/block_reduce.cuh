// Fixed-order block reductions for kernels whose results must not depend on timing (k-means): each warp reduces by
// xor / up shuffles, then the warps' values are combined in warp order through the caller's shared buffer `red`.
// blockDim.x a multiple of 32; `red` holds blockDim.x / 32 entries (block_exclusive_scan: 65).
#pragma once
#include <cuda_runtime.h>

namespace antkv::cuda::dev {

// Sum over the block, delivered to thread 0 (fixed order: xor butterfly in each warp, then warps in order).
__device__ __forceinline__ double block_sum_to_0(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < nw; ++i) s += red[i];
  return s;
}

// Exclusive prefix over the block (thread order) and the total, both to every thread. Fixed order.
__device__ __forceinline__ void block_exclusive_scan(double v, double* red, double& excl, double& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  double ex = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) ex = 0;
  __syncthreads();
  if (lane == 31) red[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double t = lane < nw ? red[lane] : 0.0;
    double ti = t;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, ti, o);
      if (lane >= o) ti += y;
    }
    double te = __shfl_up_sync(0xffffffffu, ti, 1);
    if (lane == 0) te = 0;
    if (lane < nw) red[32 + lane] = te;
    if (lane == nw - 1) red[64] = ti;
  }
  __syncthreads();
  excl = red[32 + warp] + ex;
  total = red[64];
}

__device__ __forceinline__ long long block_min_ll(long long v, long long* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  long long r = red[0];
  for (int i = 1; i < nw; ++i) r = min(r, red[i]);
  return r;
}

__device__ __forceinline__ long long block_max_ll(long long v, long long* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  long long r = red[0];
  for (int i = 1; i < nw; ++i) r = max(r, red[i]);
  return r;
}

}  // namespace antkv::cuda::dev
