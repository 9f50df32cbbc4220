#include "kernels/common/cuda_check.h"

#include <cstdlib>
#include <cstring>

namespace antkv::cuda {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  fail("CUDA error {} ({}) at {}:{} in {}", cudaGetErrorName(err), cudaGetErrorString(err), file, line, call);
}

const char* cublas_status_name(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}

void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line) {
  fail("cuBLAS error {} ({}) at {}:{} in {}", cublas_status_name(st), static_cast<int>(st), file, line, call);
}

bool sync_mode() {
  static const bool on = [] {
    const char* v = std::getenv("ANTKV_CUDA_SYNC");
    return v && std::strcmp(v, "0") != 0 && *v != '\0';
  }();
  return on;
}

void check_launch(const char* kernel, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    fail("CUDA launch of kernel {} failed at {}:{}: {} ({})", kernel, file, line, cudaGetErrorName(err),
         cudaGetErrorString(err));
  if (sync_mode()) {
    err = cudaDeviceSynchronize();
    if (err != cudaSuccess)
      fail("CUDA kernel {} (launched at {}:{}) failed (ANTKV_CUDA_SYNC=1): {} ({})", kernel, file, line,
           cudaGetErrorName(err), cudaGetErrorString(err));
  }
}

}  // namespace antkv::cuda
