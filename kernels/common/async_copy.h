// Checked asynchronous copies of n elements between host and device memory on a stream (cudaMemcpyAsync).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/common/cuda_check.h"

namespace antkv::cuda {

template <typename T>
void upload(T* dst, const T* src, size_t n, cudaStream_t s) {
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, s));
}
template <typename T>
void download(T* dst, const T* src, size_t n, cudaStream_t s) {
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, s));
}

}  // namespace antkv::cuda
