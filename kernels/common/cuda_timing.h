// Timing helpers for the benchmarks: a pair of CUDA events (elapsed ms on a stream) and an owned stream.
#pragma once
#include <cuda_runtime.h>

#include "kernels/common/cuda_check.h"

namespace antkv::cuda {

class Events {
 public:
  Events() {
    ANTKV_CUDA_CHECK(cudaEventCreate(&a_));
    ANTKV_CUDA_CHECK(cudaEventCreate(&b_));
  }
  ~Events() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  void start(cudaStream_t s) { ANTKV_CUDA_CHECK(cudaEventRecord(a_, s)); }
  float stop_ms(cudaStream_t s) {
    ANTKV_CUDA_CHECK(cudaEventRecord(b_, s));
    ANTKV_CUDA_CHECK(cudaEventSynchronize(b_));
    float ms = 0;
    ANTKV_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_));
    return ms;
  }

 private:
  cudaEvent_t a_ = nullptr, b_ = nullptr;
};

class Stream {
 public:
  Stream() { ANTKV_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

}  // namespace antkv::cuda
