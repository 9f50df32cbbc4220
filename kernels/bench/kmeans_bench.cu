// The GPU k-means benchmark (kernels/bench/kmeans_bench.h): synthetic Gaussian-mixture data generated on the
// device, whole jobs of cuda::KMeansGpu run chunk by chunk and timed.
#include "kernels/bench/kmeans_bench.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/cuda_timing.h"
#include "kernels/common/device_buffer.h"

namespace antkv::cuda {
namespace {

// ---- synthetic data ------------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float u01(uint64_t h) { return ((h >> 40) + 0.5f) * (1.0f / 16777216.0f); }
__device__ __forceinline__ float gauss(uint64_t h) {
  const float u1 = u01(h), u2 = u01(splitmix64(h));
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

constexpr int kMix = 32;

__global__ void synth_kernel(float* __restrict__ x, float* __restrict__ w, int64_t cb0, int64_t n, int dim,
                             uint64_t seed, int zero_weights) {
  __shared__ float s_mu[kMix * 16];
  __shared__ float s_sd[kMix];
  const int b = blockIdx.y;
  const uint64_t cbh = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(cb0 + b) * 0x632BE59BD9B4E019ull));
  for (int i = threadIdx.x; i < kMix * dim; i += blockDim.x) s_mu[i] = gauss(splitmix64(cbh + 2 * i + 1));
  for (int i = threadIdx.x; i < kMix; i += blockDim.x)
    s_sd[i] = 0.1f + 0.5f * u01(splitmix64(cbh ^ (0xA5A5A5A5ull + i)));
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const uint64_t ph = splitmix64(cbh ^ (static_cast<uint64_t>(j) * 0xD1B54A32D192ED03ull));
    const int comp = static_cast<int>(ph % kMix);
    float* xo = x + (static_cast<int64_t>(b) * n + j) * dim;
    for (int t = 0; t < dim; ++t) xo[t] = s_mu[comp * dim + t] + s_sd[comp] * gauss(splitmix64(ph + t + 1));
    if (w) {
      const uint64_t wh = splitmix64(ph ^ 0x5851F42D4C957F2Dull);
      float wv = expf(0.75f * gauss(wh));
      if (zero_weights && u01(splitmix64(wh)) < 0.1f) wv = 0.f;
      w[static_cast<int64_t>(b) * n + j] = wv;
    }
  }
}

}  // namespace

// ---- benchmark -----------------------------------------------------------------------------------------
void kmeans_synthetic_data(float* d_x, float* d_w, int64_t cb0, int n_codebooks, int64_t n_points, int dim,
                           uint64_t seed, bool zero_weights, cudaStream_t stream) {
  ANTKV_CHECK(dim >= 1 && dim <= 16, "kmeans_synthetic_data: dim {} (1..16)", dim);
  const int nbx = static_cast<int>(std::min<int64_t>(256, (n_points + 255) / 256));
  synth_kernel<<<dim3(nbx, n_codebooks), 256, 0, stream>>>(d_x, d_w, cb0, n_points, dim, seed, zero_weights ? 1 : 0);
  ANTKV_LAUNCH_CHECK("kmeans synth_kernel");
}

KMeansJobResult run_kmeans_job(const KMeansJob& job, void (*log)(const std::string&)) {
  KMeansJobResult r;
  r.job = job;
  const int chunk = std::max(1, std::min(job.chunk_codebooks, job.n_codebooks));
  const int64_t n = job.n_points;
  const int dim = job.dim, k = job.k;
  DeviceBuffer<float> dx(static_cast<size_t>(chunk) * n * dim), dw(static_cast<size_t>(chunk) * n),
      dc(static_cast<size_t>(chunk) * k * dim);
  KMeansParams p;
  p.k = k;
  p.iters = job.iters;
  p.tol = job.tol;
  p.seed = job.seed;
  p.init_sample = job.init_sample;
  KMeansGpu gpu(p, job.path);
  cudaStream_t s = nullptr;
  {  // warm-up (kernel attributes, workspace growth) on the first chunk's shape, 1 iteration, not timed
    KMeansParams pw = p;
    pw.iters = 1;
    KMeansGpu warm(pw, job.path);
    kmeans_synthetic_data(dx.get(), dw.get(), 0, chunk, n, dim, job.seed + 99, true, s);
    KMeansResult tmp;
    warm.train_device({chunk, n, dim, dx.get(), dw.get()}, nullptr, dc.get(), tmp, s, 0, nullptr);
  }
  double obj_sum = 0, it_sum = 0;
  for (int cb0 = 0; cb0 < job.n_codebooks; cb0 += chunk) {
    const int nb = std::min(chunk, job.n_codebooks - cb0);
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(s));
    const double g0 = now_s();
    kmeans_synthetic_data(dx.get(), dw.get(), cb0, nb, n, dim, job.seed, true, s);
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(s));
    const double g1 = now_s();
    r.gen_s += g1 - g0;
    KMeansResult part;
    gpu.train_device({nb, n, dim, dx.get(), dw.get()}, nullptr, dc.get(), part, s, cb0, &r.t);
    r.seconds += now_s() - g1;
    for (int i = 0; i < nb; ++i) {
      obj_sum += part.objective[i] / static_cast<double>(n);
      it_sum += part.iterations[i];
      r.reseeded += part.reseeded[i];
    }
    if (log)
      log(fmt::format("  {}: codebooks {}..{} done, {:.2f} s so far (mean objective/point {:.5f})", job.name, cb0,
                      cb0 + nb - 1, r.seconds, obj_sum / (cb0 + nb)));
  }
  r.device_bytes = dx.bytes() + dw.bytes() + dc.bytes() + gpu.workspace_bytes();
  r.mean_objective_per_point = obj_sum / job.n_codebooks;
  r.mean_iterations = it_sum / job.n_codebooks;
  r.assign_tflops = r.t.assign_s > 0 ? r.t.assign_flops / r.t.assign_s * 1e-12 : 0;
  r.lloyd_tflops = r.t.lloyd_s > 0 ? r.t.assign_flops / r.t.lloyd_s * 1e-12 : 0;
  {  // what streaming the data from the host would add: one chunk-sized copy from pinned memory (<= 1 GiB)
    const size_t chunk_bytes = static_cast<size_t>(chunk) * n * (dim + 1) * sizeof(float);
    const size_t bytes = std::min<size_t>(chunk_bytes, size_t{1} << 30);
    PinnedBuffer<unsigned char> h;
    h.ensure(bytes);
    std::memset(h.get(), 0, bytes);
    ANTKV_CUDA_CHECK(cudaMemcpy(dx.get(), h.get(), bytes, cudaMemcpyHostToDevice));  // warm
    const double u0 = now_s();
    ANTKV_CUDA_CHECK(cudaMemcpy(dx.get(), h.get(), bytes, cudaMemcpyHostToDevice));
    const double u1 = now_s();
    r.upload_gbps = bytes / (u1 - u0) * 1e-9;
    r.upload_s_est = static_cast<double>(job.n_codebooks) * n * (dim + 1) * sizeof(float) / (r.upload_gbps * 1e9);
  }
  return r;
}

}  // namespace antkv::cuda
