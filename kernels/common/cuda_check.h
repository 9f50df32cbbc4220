// kernels/common/: what every CUDA room uses: checked calls (this file), DeviceBuffer (device_buffer.h), typed
// asynchronous copies (async_copy.h), the bf16 alias and element tags (dtypes.h), CUDA-event timing and the host
// clock (cuda_timing.h), warp/tensor-core helpers (device_utils.cuh), fixed-order block reductions
// (block_reduce.cuh), a host parallel_for (parallel_for.h).
// Error checking for every CUDA runtime / cuBLAS call and every kernel launch. Failures throw antkv::Error
// naming file:line and the call (or kernel). With ANTKV_CUDA_SYNC=1 in the environment every launch is
// followed by cudaDeviceSynchronize(), so an asynchronous fault is reported against the kernel that caused it.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace antkv::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line);
// cudaGetLastError() after a launch; in sync mode also cudaDeviceSynchronize(). `kernel` names it.
void check_launch(const char* kernel, const char* file, int line);
// Whether ANTKV_CUDA_SYNC=1 (read once).
bool sync_mode();
const char* cublas_status_name(cublasStatus_t st);

}  // namespace antkv::cuda

#define ANTKV_CUDA_CHECK(call)                                                        \
  do {                                                                                \
    const cudaError_t antkv_err_ = (call);                                            \
    if (antkv_err_ != cudaSuccess)                                                    \
      ::antkv::cuda::throw_cuda_error(antkv_err_, #call, __FILE__, __LINE__);         \
  } while (0)

#define ANTKV_CUBLAS_CHECK(call)                                                      \
  do {                                                                                \
    const cublasStatus_t antkv_st_ = (call);                                          \
    if (antkv_st_ != CUBLAS_STATUS_SUCCESS)                                           \
      ::antkv::cuda::throw_cublas_error(antkv_st_, #call, __FILE__, __LINE__);        \
  } while (0)

// After every <<<...>>> launch: ANTKV_LAUNCH_CHECK("kernel_name");
#define ANTKV_LAUNCH_CHECK(name) ::antkv::cuda::check_launch(name, __FILE__, __LINE__)
