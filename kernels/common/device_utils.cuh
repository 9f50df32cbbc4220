// Device helpers shared by the kernels: warp/block reductions, tensor-core fragments (mma.sync
// m16n8k16 bf16 -> fp32, ldmatrix), cp.async, and the 16-byte XOR swizzle of shared-memory tiles.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace antkv::cuda::dev {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float red[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // red[] may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
}

// ---- tensor cores ----
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A(16x16, row) * B(16x8, col) + D; bf16 (or, mma_f16_16816, fp16) inputs, fp32 accumulators.
#define ANTKV_MMA_16816(NAME, TYPE)                                                                             \
  __device__ __forceinline__ void NAME(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {       \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
                 "{%8,%9}, {%0,%1,%2,%3};\n"                                                                    \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                               \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                               \
  }
ANTKV_MMA_16816(mma_bf16_16816, "bf16")
ANTKV_MMA_16816(mma_f16_16816, "f16")
#undef ANTKV_MMA_16816

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_halves(__half lo, __half hi) {
  __half2 v = __halves2half2(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- low-bit codes to fp16 operands ----
// (w & mask) | 0x64006400 in one LOP3: each 16-bit half is the fp16 1024 + (its masked bits), exact while the
// masked field stays below bit 10 (an fp16 has 10 mantissa bits).
__device__ __forceinline__ uint32_t codes_plus_1024(uint32_t w, uint32_t mask) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w), "r"(mask), "r"(0x64006400u));  // (a & b) | c
  return r;
}
// The two halves minus 1024: the codes as fp16 (exact), one HSUB2.
__device__ __forceinline__ uint32_t sub_1024(uint32_t x) {
  __half2 h = *reinterpret_cast<__half2*>(&x);
  h = __hsub2(h, __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400)));
  return *reinterpret_cast<uint32_t*>(&h);
}
// (x - 1024) / 4 for fields at bits 2..3 of each half (1024 + 4 code), one HFMA2: x * 0.25 - 256, exact.
__device__ __forceinline__ uint32_t sub_1024_quarter(uint32_t x) {
  __half2 h = *reinterpret_cast<__half2*>(&x);
  h = __hfma2(h, __halves2half2(__ushort_as_half(0x3400), __ushort_as_half(0x3400)),
              __halves2half2(__ushort_as_half(0xDC00), __ushort_as_half(0xDC00)));
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16-byte asynchronous copy global -> shared; when !valid the 16 bytes are zero-filled and global
// memory is not read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_size));
}
// 4-byte asynchronous copy global -> shared (cached in L1: small scattered records, e.g. per-token scales).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A [rows][D] bf16 tile in shared memory, rows of D/8 16-byte chunks; chunk c of row r is stored at
// chunk c ^ (r & 7), so the 8 rows read by one ldmatrix 8x8 matrix hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

}  // namespace antkv::cuda::dev
