// The fill kernels of kernels/common/random_fill.h.
#include "kernels/common/random_fill.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/common/cuda_check.h"

namespace antkv::cuda {
namespace {

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

__global__ void fill_bytes_kernel(uint8_t* dst, int64_t n, uint64_t seed) {
  const int64_t words = (n + 7) / 8;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
    if (i * 8 + 8 <= n && reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
      reinterpret_cast<uint64_t*>(dst)[i] = r;
    } else {
      for (int j = 0; j < 8 && i * 8 + j < n; ++j) dst[i * 8 + j] = static_cast<uint8_t>(r >> (8 * j));
    }
  }
}

__global__ void fill_f16_kernel(__half* dst, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
    const float u = static_cast<float>(r >> 40) * (1.f / 16777216.f);  // [0, 1)
    dst[i] = __float2half_rn((2.f * u - 1.f) * scale);
  }
}

}  // namespace

void fill_random_bytes(uint8_t* dst, int64_t n, uint64_t seed, cudaStream_t stream) {
  if (n <= 0) return;
  ANTKV_CHECK(dst, "fill_random_bytes: null pointer");
  const int blocks = static_cast<int>(std::min<int64_t>((n / 8 + 255) / 256 + 1, 4096));
  fill_bytes_kernel<<<blocks, 256, 0, stream>>>(dst, n, seed);
  ANTKV_LAUNCH_CHECK("fill_bytes_kernel");
}

void fill_random_f16(__half* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n <= 0) return;
  ANTKV_CHECK(dst, "fill_random_f16: null pointer");
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
  fill_f16_kernel<<<blocks, 256, 0, stream>>>(dst, n, seed, scale);
  ANTKV_LAUNCH_CHECK("fill_f16_kernel");
}

}  // namespace antkv::cuda
