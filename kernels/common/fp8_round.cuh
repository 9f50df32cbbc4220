// quant/fp8.h round_fp8_e4m3 on the device: nearest E4M3 value, ties to even, saturating at +-448, NaN kept (the
// CUDA conversion with __NV_SATFINITE; E4M3 -> fp16 is exact). The gain-shape norm of norm=fp8 in the simulated
// quantizer and the compressed cache.
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace antkv::cuda {

__device__ __forceinline__ float round_fp8_e4m3(float x) {
  const __nv_fp8_storage_t v = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3)));
}

}  // namespace antkv::cuda
