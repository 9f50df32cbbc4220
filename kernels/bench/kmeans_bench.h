// The GPU k-means benchmark behind antkv-bench-kmeans (apps/antkv_bench_kmeans.cpp): cuda::KMeansGpu
// (kernels/kmeans/kmeans.h) on synthetic calibration-like data generated on the device.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/kmeans/kmeans.h"

namespace antkv::cuda {

// ---- benchmark ---------------------------------------------------------------------------------------
// Synthetic calibration-like data for codebooks [cb0, cb0 + B) of a job, generated on the device:
// per codebook a Gaussian mixture of 32 components (means ~ N(0, 1), per-component std in [0.1, 0.6]) in
// R^dim; weights log-normal (exp(N(0, 0.75^2))), about a tenth of them 0 when `zero_weights`. Deterministic
// in (seed, codebook index, point index): any chunking gives the same data.
void kmeans_synthetic_data(float* d_x, float* d_w, int64_t cb0, int n_codebooks, int64_t n_points, int dim,
                           uint64_t seed, bool zero_weights, cudaStream_t stream = nullptr);

struct KMeansJob {
  std::string name;           // "1-bit c8b8"
  int n_codebooks = 8192;
  int64_t n_points = 262144;
  int dim = 8;
  int k = 256;
  int iters = 20;
  double tol = -1;            // < 0: run all iters (the benchmark measures fixed work)
  int64_t init_sample = 0;    // 0: min(n, 64 k)
  int chunk_codebooks = 256;  // codebooks per device chunk (one LLaMA-3-8B layer: 8 heads x 16 groups x 2)
  uint64_t seed = 1;
  KMeansAssignPath path = KMeansAssignPath::Auto;
};

struct KMeansJobResult {
  KMeansJob job;
  double seconds = 0;        // init + Lloyd, all chunks (data generation excluded)
  double gen_s = 0;          // synthetic data generation on the device
  double upload_s_est = 0;   // one chunk's x + w copied from pinned host memory, times the chunks
  double upload_gbps = 0;
  KMeansTimings t;
  double assign_tflops = 0;  // assign_flops / assign_s
  double lloyd_tflops = 0;   // assign_flops / lloyd_s
  double mean_objective_per_point = 0;
  double mean_iterations = 0;
  int64_t reseeded = 0;
  size_t device_bytes = 0;   // data + workspace of one chunk
};

// Runs a whole job in chunks on the current device. `log` gets one line per chunk (may be null).
KMeansJobResult run_kmeans_job(const KMeansJob& job, void (*log)(const std::string&) = nullptr);

}  // namespace antkv::cuda
