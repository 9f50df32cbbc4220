#include "kernels/runtime/gemm.h"

#include "kernels/common/cuda_check.h"

namespace antkv::cuda {

Blas::Blas(cudaStream_t stream, size_t workspace_bytes) {
  ANTKV_CUBLAS_CHECK(cublasCreate(&handle_));
  try {
    ANTKV_CUBLAS_CHECK(cublasSetStream(handle_, stream));
    ANTKV_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes));
    ANTKV_CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace_, workspace_bytes));
  } catch (...) {
    cublasDestroy(handle_);
    if (workspace_) cudaFree(workspace_);
    throw;
  }
}

Blas::~Blas() {
  if (handle_) cublasDestroy(handle_);
  if (workspace_) cudaFree(workspace_);
}

void Blas::linear(const bf16* x, int64_t ldx, const bf16* w, float* y, int64_t ldy, int m, int n, int k,
                  float beta) {
  ANTKV_CHECK(x && w && y, "linear: null pointer");
  ANTKV_CHECK(m >= 0 && n > 0 && k > 0 && ldx >= k && ldy >= n, "linear: bad sizes m={} n={} k={}", m, n, k);
  if (m == 0) return;
  const float alpha = 1.f;
  // Column-major view: Y^T [n, m] = W [n, k] (W^T stored as k x n column-major, op T) * X^T [k, m].
  ANTKV_CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, x,
                                  CUDA_R_16BF, static_cast<int>(ldx), &beta, y, CUDA_R_32F, static_cast<int>(ldy),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace antkv::cuda
