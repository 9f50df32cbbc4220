// GEMMs through cuBLAS: bf16 inputs, fp32 accumulate (CUBLAS_COMPUTE_32F), fp32 output.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/runtime/ops.h"

namespace antkv::cuda {

// A cuBLAS handle bound to a stream, with a preallocated workspace (so no allocation happens in
// cuBLAS during decode).
class Blas {
 public:
  explicit Blas(cudaStream_t stream, size_t workspace_bytes = 32u << 20);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  cublasHandle_t handle() const { return handle_; }

  // Row-major: Y[m, n] = X[m, k] . W[n, k]^T + beta * Y   (a linear layer, W as stored by PyTorch)
  //   x: [m, k] bf16, row stride ldx; w: [n, k] bf16 (row stride k); y: [m, n] fp32, row stride ldy.
  void linear(const bf16* x, int64_t ldx, const bf16* w, float* y, int64_t ldy, int m, int n, int k,
              float beta = 0.f);

 private:
  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
};

}  // namespace antkv::cuda
