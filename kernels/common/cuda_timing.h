// Timing helpers: a pair of CUDA events (elapsed ms on a stream), an owned stream and the host's steady clock.
#pragma once
#include <cuda_runtime.h>

#include <chrono>

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

// Seconds on the host's steady clock (differences are wall time).
inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace antkv::cuda
