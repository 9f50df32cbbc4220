#include "kernels/calibrate/calib_stage.h"

#include <cuda_fp16.h>

#include <chrono>
#include <vector>

#include "core/error.h"
#include "kernels/anchor/anchor_scores.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"

namespace antkv {

namespace {

using cuda::DeviceBuffer;
using cuda::PinnedBuffer;

// dst [rows, width] fp16 (packed) <- src [rows, width] fp32 with row stride `stride` (elements).
__global__ void to_half_rows(const float* __restrict__ src, int64_t stride, int width, int64_t rows,
                             __half* __restrict__ dst) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i - r * width;
    dst[i] = __float2half_rn(src[r * stride + c]);
  }
}

void launch_to_half(const float* src, int64_t stride, int width, int64_t rows, __half* dst, cudaStream_t s) {
  const int64_t n = rows * width;
  if (n == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 132 * 16));
  to_half_rows<<<blocks, threads, 0, s>>>(src, stride, width, rows, dst);
  ANTKV_CUDA_CHECK(cudaGetLastError());
}

// metric=task: the window's query second moment per KV head, m[kv][i][j] = sum over tokens t and the KV head's
// G query heads of q[t][kv G + g][i] q[t][kv G + g][j] (the CPU's query_moment, calibrate.h). Block (kv, tile of
// kQmRows rows i), one thread per column j; kQmChunk query rows staged in shared memory at a time. fp32 sums.
constexpr int kQmRows = 16, kQmChunk = 32;
__global__ void query_moment_kernel(const float* __restrict__ q, int64_t stride, int T, int G, int d,
                                    float* __restrict__ m) {
  extern __shared__ float rows[];  // [kQmChunk][d]
  const int kv = blockIdx.x, i0 = blockIdx.y * kQmRows, j = threadIdx.x;
  float acc[kQmRows];
#pragma unroll
  for (int ii = 0; ii < kQmRows; ++ii) acc[ii] = 0.0f;
  const int64_t n = static_cast<int64_t>(T) * G;
  for (int64_t r0 = 0; r0 < n; r0 += kQmChunk) {
    const int rn = n - r0 < kQmChunk ? static_cast<int>(n - r0) : kQmChunk;
    for (int rr = 0; rr < rn; ++rr) {
      const int64_t r = r0 + rr, t = r / G, g = r - t * G;
      rows[rr * d + j] = q[t * stride + (static_cast<int64_t>(kv) * G + g) * d + j];
    }
    __syncthreads();
    for (int rr = 0; rr < rn; ++rr) {
      const float qj = rows[rr * d + j];
#pragma unroll
      for (int ii = 0; ii < kQmRows; ++ii) acc[ii] += rows[rr * d + i0 + ii] * qj;
    }
    __syncthreads();
  }
#pragma unroll
  for (int ii = 0; ii < kQmRows; ++ii) m[(static_cast<int64_t>(kv) * d + i0 + ii) * d + j] = acc[ii];
}

class GpuCalibStage : public CalibDeviceStage {
 public:
  GpuCalibStage(const ModelConfig& cfg, int max_tokens) : cfg_(cfg), max_T_(max_tokens) {
    ANTKV_CHECK(max_tokens > 0, "calibration device stage: bad window length {}", max_tokens);
    const int L = cfg.num_layers;
    kvd_ = static_cast<size_t>(cfg.kv_dim());
    const size_t T = static_cast<size_t>(max_tokens), KV = static_cast<size_t>(cfg.num_kv_heads);
    per_layer_halves_ = 2 * T * kvd_;
    per_layer_floats_ = 2 * T * KV;
    for (int s = 0; s < kSlots; ++s) {
      halves_[s].ensure(per_layer_halves_ * L);
      floats_[s].ensure(per_layer_floats_ * L);
      events_[s].assign(L, nullptr);
      tokens_[s].assign(L, 0);
      for (auto& e : events_[s]) ANTKV_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    // metric=task query moments: head_dim a multiple of kQmRows, one thread per channel
    qm_on_ = cfg.head_dim % kQmRows == 0 && cfg.head_dim <= 256;
    qm_size_ = KV * cfg.head_dim * cfg.head_dim;
    if (qm_on_) {
      for (int s = 0; s < kSlots; ++s) qm_host_[s].ensure(qm_size_ * L);
      qm_.resize(qm_size_);
    }
    kh_.resize(2 * T * kvd_);  // keys | values, fp16
    sk_.resize(2 * T * KV);    // S_K | S_V
  }
  ~GpuCalibStage() override {
    for (auto& ev : events_)
      for (auto e : ev)
        if (e) cudaEventDestroy(e);
  }

  void enqueue(const DeviceLayerActivations& a, bool pre_rope, int slot) override {
    ANTKV_CHECK(slot >= 0 && slot < kSlots && a.layer >= 0 && a.layer < cfg_.num_layers,
                "calibration device stage: bad slot {} or layer {}", slot, a.layer);
    ANTKV_CHECK(a.n_tokens > 0 && a.n_tokens <= max_T_, "calibration device stage: {} tokens in a window of at most {}",
                a.n_tokens, max_T_);
    auto stream = static_cast<cudaStream_t>(a.stream);
    const int T = a.n_tokens, KV = cfg_.num_kv_heads;
    const size_t kvd = kvd_;
    cuda::AnchorScoreGpuArgs p;
    ws_.pack(a, cfg_.num_heads, KV, cfg_.head_dim, p, stream);  // dense q, k_post, v in the workspace
    p.s_k = sk_.get(), p.s_v = sk_.get() + static_cast<size_t>(T) * KV;
    cuda::anchor_scores_gpu(p, ws_, stream);
    __half* kh = reinterpret_cast<__half*>(kh_.get());
    if (pre_rope) launch_to_half(a.k_pre, a.k_pre_stride, static_cast<int>(kvd), T, kh, stream);
    else launch_to_half(p.k, static_cast<int64_t>(kvd), static_cast<int>(kvd), T, kh, stream);
    launch_to_half(p.v, static_cast<int64_t>(kvd), static_cast<int>(kvd), T, kh + static_cast<size_t>(T) * kvd, stream);
    if (qm_on_) {
      const int d = cfg_.head_dim;
      query_moment_kernel<<<dim3(KV, d / kQmRows), d, static_cast<size_t>(kQmChunk) * d * sizeof(float), stream>>>(
          a.q, a.q_stride, T, cfg_.num_heads / KV, d, qm_.get());
      ANTKV_CUDA_CHECK(cudaGetLastError());
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(qm_host_[slot].get() + qm_size_ * a.layer, qm_.get(), qm_size_ * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream));
    }
    uint16_t* hh = halves_[slot].get() + per_layer_halves_ * a.layer;
    float* hf = floats_[slot].get() + per_layer_floats_ * a.layer;
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(hh, kh_.get(), 2 * static_cast<size_t>(T) * kvd * sizeof(uint16_t),
                                     cudaMemcpyDeviceToHost, stream));
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(hf, sk_.get(), 2 * static_cast<size_t>(T) * KV * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream));
    ANTKV_CUDA_CHECK(cudaEventRecord(events_[slot][a.layer], stream));
    tokens_[slot][a.layer] = T;
  }

  CalibLayerHost host(int layer, int slot) override {
    ANTKV_CHECK(slot >= 0 && slot < kSlots && layer >= 0 && layer < cfg_.num_layers,
                "calibration device stage: bad slot {} or layer {}", slot, layer);
    const auto t0 = std::chrono::steady_clock::now();
    ANTKV_CUDA_CHECK(cudaEventSynchronize(events_[slot][layer]));
    wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const size_t T = static_cast<size_t>(tokens_[slot][layer]), KV = static_cast<size_t>(cfg_.num_kv_heads);
    const uint16_t* hh = halves_[slot].get() + per_layer_halves_ * layer;
    const float* hf = floats_[slot].get() + per_layer_floats_ * layer;
    return CalibLayerHost{hh, hh + T * kvd_, hf, hf + T * KV,
                          qm_on_ ? qm_host_[slot].get() + qm_size_ * layer : nullptr};
  }

  double wait_seconds() const override { return wait_s_; }

 private:
  ModelConfig cfg_;
  int max_T_;
  size_t kvd_ = 0, per_layer_halves_ = 0, per_layer_floats_ = 0;
  PinnedBuffer<uint16_t> halves_[kSlots];
  PinnedBuffer<float> floats_[kSlots];
  bool qm_on_ = false;
  size_t qm_size_ = 0;                 // KV * d * d
  PinnedBuffer<float> qm_host_[kSlots];  // [layer][KV, d, d] per slot
  DeviceBuffer<float> qm_;
  std::vector<cudaEvent_t> events_[kSlots];
  std::vector<int> tokens_[kSlots];
  DeviceBuffer<float> sk_;
  DeviceBuffer<uint16_t> kh_;
  cuda::AnchorScoreWorkspace ws_;
  double wait_s_ = 0;
};

}  // namespace

CalibDeviceStageFactory gpu_calib_device_stage() {
  return [](const ModelConfig& cfg, int max_tokens) -> std::unique_ptr<CalibDeviceStage> {
    return std::make_unique<GpuCalibStage>(cfg, max_tokens);
  };
}

}  // namespace antkv
