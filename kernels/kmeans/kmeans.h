// kernels/kmeans/: the GPU counterpart of lib/kmeans (the FAISS trainer).
// GPU weighted k-means (design note §4): the same contract as the FAISS trainer (lib/kmeans/kmeans.h), for
// thousands of independent codebooks per launch. One launch of each kernel covers every codebook of a
// chunk (grid.y = codebook), so a LLaMA-3-8B layer's 256 codebooks train together.
//
// Semantics (per codebook b; both the host entry `train` and the device entry `KMeansGpu::train_device`):
//  - Initialization: the given centroids, or k-means++ on the GPU (kmeanspp_gpu below) that reproduces
//    antkv::kmeanspp_init exactly: the host draws the same random numbers from the same std::mt19937_64
//    stream (the sample's positions, one canonical uniform per centroid) and the GPU does the D^2-weighted
//    picks with the same fp64 distances. The only difference is the summation order of the fp64
//    probabilities (a parallel scan instead of a running sum), which can change a pick only when a draw
//    falls within ~1e-16 * total of a boundary; the [gpu] tests check bit-identical centroids.
//  - Lloyd iterations: assign every point to its nearest centroid (ties: lowest index), objective
//    f = sum_j w_j |x_j - c(x_j)|^2 (fp64), then centroid = sum w x / sum w over its points. Stops when
//    (f_prev - f) / f_prev < tol (after at least one update) or after `iters` updates; the final
//    centroids' objective is what is reported (f of the last assignment pass, which uses those centroids).
//  - Deterministic centroid update without float atomics: sum w x and sum w are accumulated in 64-bit
//    fixed point (integer atomics are associative, so the order of the adds does not matter), with a
//    per-codebook power-of-two scale 2^e chosen so that n * max w * max |x| * 2^e <= 2^62 (no overflow;
//    a value's quantum is ~2^-44 of the largest, far below fp32's 2^-24). The quotient is formed in fp64.
//    Same inputs and seed -> bit-identical centroids, whatever the grid or the chunking.
//  - Empty clusters (sum w = 0): re-seeded, in increasing centroid index, from the points of weight > 0 with
//    the largest w * d^2 of this assignment (ties: lowest point index), each point used once; counted in
//    `reseeded`.
//  - Assignment: one fused kernel, distances as |c|^2 - 2 x.c (FMA chain), argmin in registers; each thread
//    holds P points in registers, the block streams the codebook's centroids through shared memory (all at
//    once when they fit: small k; in tiles of 512..4096 otherwise: a tiled SIMT GEMM fused with the
//    argmin, fp32 throughout), or for large k (dim 8/16) on tensor cores as 3xTF32 mma.sync with the
//    argmin fused in the accumulator epilogue; either way |x - c|^2 is then recomputed directly for the
//    chosen centroid (no cancellation in the reported objective). Closed set of instantiations: dim in
//    {2, 4, 8, 16}; anything else is an antkv::Error.
//
// Measured on the H200 (2026-11, apps/antkv_bench_kmeans.cpp, synthetic Gaussian-mixture data, 20 iterations,
// k-means++ on the GPU included): LLaMA-3-8B 1-bit job (8192 codebooks x 256K points in R^8, k = 256)
// 7.5 s (init 1.7 s, Lloyd 5.8 s; SIMT assignment 32 TFLOP/s = 48% of the 67 TFLOP/s fp32 peak). 0.75-bit
// c16b12 (k = 4096, R^16, k-means++ sample 16384): SIMT 38 TFLOP/s (512 codebooks in 10.8 s), tensor cores
// ~46 TFLOP/s (3584 of the 4096 codebooks in 63.7 s before the run's time limit: ~73 s for the job).
// Objectives within 0.011% of FAISS from the same init on every configuration tested.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/device_buffer.h"
#include "kmeans/kmeans.h"

namespace antkv::cuda {

// Device pointers of one chunk of codebooks (same layout as antkv::KMeansBatch).
struct KMeansDeviceBatch {
  int n_codebooks = 0;
  int64_t n_points = 0;
  int dim = 0;
  const float* x = nullptr;        // [B, n, dim] (16-byte aligned)
  const float* weights = nullptr;  // [B, n] or null for all 1
};

// Where the time of train_device went (host wall clock around synchronized phases, CUDA events around
// the assignment kernels). Accumulates over calls.
struct KMeansTimings {
  double stats_s = 0;       // input checks, fixed-point scales, count of weight > 0
  double init_s = 0;        // k-means++ (host draws + GPU picks)
  double lloyd_s = 0;       // the iterations, including the final objective pass
  double assign_s = 0;      // of lloyd_s: the assignment kernels alone (CUDA events)
  double assign_flops = 0;  // 2 * n * k * dim per codebook and assignment pass actually run
  int64_t assign_passes = 0;  // codebook-passes
};

bool kmeans_gpu_supported_dim(int dim);

// Which assignment kernel: SIMT fp32 (centroids through shared memory, FMA chains), or tensor cores
// (3xTF32 mma.sync, fp32-level accuracy; dim 8 and 16 only). Auto: tensor cores for dim >= 8 and
// k >= 1024 (c16b12, c8b10+), SIMT otherwise. The environment variable ANTKV_KMEANS_ASSIGN=simt|tc|auto
// overrides Auto (for experiments).
enum class KMeansAssignPath { Auto, Simt, TensorCore };
const char* to_string(KMeansAssignPath p);

// Reusable trainer: device scratch grows to the largest chunk seen and is kept.
class KMeansGpu {
 public:
  explicit KMeansGpu(const KMeansParams& p, KMeansAssignPath path = KMeansAssignPath::Auto);
  ~KMeansGpu();
  KMeansGpu(const KMeansGpu&) = delete;
  KMeansGpu& operator=(const KMeansGpu&) = delete;

  const KMeansParams& params() const { return p_; }
  // The kernel that a batch of this dimension gets (Auto resolved).
  KMeansAssignPath assign_path(int dim) const;

  // Trains the B codebooks of `b` (device memory). `d_init`: [B, k, dim] device centroids or null for
  // k-means++ (GPU, see above); `d_centroids`: [B, k, dim] device output (may equal d_init).
  // `codebook_offset` is the index of this chunk's first codebook in the whole job: the k-means++ random
  // stream of codebook i is seeded with (seed, codebook_offset + i), so a job trained in chunks equals
  // the same job trained at once. Writes objective / iterations / reseeded for the chunk into `out`
  // (resized to B; centroids are left on the device, out.centroids untouched). Inputs are checked on the
  // device (NaN/Inf, negative weights, fewer points of weight > 0 than centroids): antkv::Error.
  // Synchronizes `stream` (once per Lloyd iteration).
  void train_device(const KMeansDeviceBatch& b, const float* d_init, float* d_centroids, KMeansResult& out,
                    cudaStream_t stream = nullptr, int64_t codebook_offset = 0, KMeansTimings* timings = nullptr);

  // k-means++ alone (what train_device does when d_init is null): [B, k, dim] into d_centroids.
  void kmeanspp_device(const KMeansDeviceBatch& b, float* d_centroids, cudaStream_t stream = nullptr,
                       int64_t codebook_offset = 0);

  size_t workspace_bytes() const;

 private:
  struct Workspace;
  void prepare(const KMeansDeviceBatch& b, cudaStream_t stream);  // stats + validation + scales
  void kmeanspp_prepared(const KMeansDeviceBatch& b, float* d_centroids, cudaStream_t stream,
                         int64_t codebook_offset);
  KMeansParams p_;
  KMeansAssignPath path_;
  std::unique_ptr<Workspace> ws_;
};

}  // namespace antkv::cuda

namespace antkv {
// antkv::KMeansTrainer for host inputs ("cuda"): validate_kmeans_batch, then chunks of codebooks (at most
// `chunk_bytes` of x on the device at a time) are uploaded, trained (cuda::KMeansGpu) and downloaded.
std::unique_ptr<KMeansTrainer> make_kmeans_gpu(const KMeansParams& p, size_t chunk_bytes = size_t{4} << 30,
                                               cuda::KMeansAssignPath path = cuda::KMeansAssignPath::Auto);
}  // namespace antkv
