#include "kernels/anchor/anchor_score_fn.h"

#include <cuda_runtime.h>

#include <memory>
#include <mutex>

#include "core/error.h"
#include "kernels/anchor/anchor_scores.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"

namespace antkv {

using cuda::DeviceBuffer;

AnchorScoreFn gpu_anchor_score_fn() {
  struct State {
    std::mutex mu;
    int device = -1;
    cudaStream_t stream = nullptr;
    DeviceBuffer<float> q, k, v, s_k, s_v;
    cuda::AnchorScoreWorkspace ws;
    ~State() {
      if (stream) cudaStreamDestroy(stream);
    }
  };
  auto st = std::make_shared<State>();
  return [st](const AnchorScoreArgs& a, float* s_k, float* s_v) {
    std::lock_guard<std::mutex> lock(st->mu);
    ANTKV_CHECK(a.n_tokens >= 0 && a.n_heads > 0 && a.n_kv_heads > 0 && a.head_dim > 0,
                "gpu anchor scores: bad shape (T {}, heads {}/{}, head_dim {})", a.n_tokens, a.n_heads, a.n_kv_heads,
                a.head_dim);
    if (a.n_tokens == 0) return;
    ANTKV_CHECK(a.q && a.k && a.v && s_k && s_v, "gpu anchor scores: null pointer");
    if (!st->stream) {
      ANTKV_CUDA_CHECK(cudaGetDevice(&st->device));
      ANTKV_CUDA_CHECK(cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking));
    }
    const size_t T = static_cast<size_t>(a.n_tokens);
    const size_t nq = T * a.n_heads * a.head_dim, nkv = T * a.n_kv_heads * a.head_dim, ns = T * a.n_kv_heads;
    st->q.ensure(nq), st->k.ensure(nkv), st->v.ensure(nkv), st->s_k.ensure(ns), st->s_v.ensure(ns);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(st->q.get(), a.q, nq * sizeof(float), cudaMemcpyHostToDevice, st->stream));
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(st->k.get(), a.k, nkv * sizeof(float), cudaMemcpyHostToDevice, st->stream));
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(st->v.get(), a.v, nkv * sizeof(float), cudaMemcpyHostToDevice, st->stream));
    cuda::AnchorScoreGpuArgs p;
    p.q = st->q.get(), p.k = st->k.get(), p.v = st->v.get(), p.s_k = st->s_k.get(), p.s_v = st->s_v.get();
    p.n_tokens = a.n_tokens, p.n_heads = a.n_heads, p.n_kv_heads = a.n_kv_heads, p.head_dim = a.head_dim;
    cuda::anchor_scores_gpu(p, st->ws, st->stream);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(s_k, st->s_k.get(), ns * sizeof(float), cudaMemcpyDeviceToHost, st->stream));
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(s_v, st->s_v.get(), ns * sizeof(float), cudaMemcpyDeviceToHost, st->stream));
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(st->stream));
  };
}

}  // namespace antkv
