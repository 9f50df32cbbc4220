// Weighted k-means for VQ codebooks (design note §4): minimize sum_j w_j |x_j - c(x_j)|^2 for many
// independent small problems at once (one per layer, KV head and channel group). The CPU trainer goes
// through FAISS (faiss::Clustering with weights); the GPU trainer (kernels/kmeans/kmeans.h) batches thousands of
// codebooks per launch. Both start from the same k-means++ initialization when given one, and are
// compared by objective, not by centroids.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace antkv {

struct KMeansParams {
  int k = 256;               // centroids per codebook (2^b)
  int iters = 20;            // Lloyd iterations at most
  double tol = 1e-4;         // stop when (obj_prev - obj) / obj_prev < tol (GPU trainer; FAISS runs `iters`)
  uint64_t seed = 0;         // same seed -> identical codebooks
  int64_t init_sample = 0;   // k-means++ runs on a random sample of this many points; 0 = min(n, 64 k)
};

// B independent problems with the same number of points and dimension:
struct KMeansBatch {
  int n_codebooks = 0;       // B
  int64_t n_points = 0;      // n per codebook
  int dim = 0;               // c
  const float* x = nullptr;        // [B, n, dim]
  const float* weights = nullptr;  // [B, n] (>= 0; a weight-0 point is ignored) or null for all 1
};

struct KMeansResult {
  std::vector<float> centroids;     // [B, k, dim]
  std::vector<double> objective;    // [B] final weighted objective sum_j w_j |x_j - c(x_j)|^2
  std::vector<int> iterations;      // [B] Lloyd iterations run
  std::vector<int64_t> reseeded;    // [B] empty clusters re-seeded over the run
};

class KMeansTrainer {
 public:
  virtual ~KMeansTrainer() = default;
  virtual std::string name() const = 0;
  // init: [B, k, dim] starting centroids, or null for k-means++ (kmeanspp_init with params.seed).
  virtual KMeansResult train(const KMeansBatch& batch, const float* init = nullptr) = 0;
};

std::unique_ptr<KMeansTrainer> make_kmeans_cpu(const KMeansParams& p);  // FAISS

// --- CPU reference pieces, shared by both trainers and the tests -------------------------------------
// Weighted k-means++ for codebook b of the batch: D^2-weighted seeding (probability ~ w_j D(x_j)^2) on a
// sample of params.init_sample points drawn with seed (params.seed, b). centroids: [k, dim].
void kmeanspp_init(const KMeansParams& p, const KMeansBatch& batch, int b, float* centroids);
// Nearest centroid: x [n, dim], centroids [k, dim] -> assign [n], dist2 [n] (either may be null).
void kmeans_assign_cpu(const float* x, int64_t n, const float* centroids, int k, int dim, int32_t* assign,
                       float* dist2);
// sum_j w_j min_c |x_j - c|^2 (w null = 1).
double kmeans_objective_cpu(const float* x, const float* w, int64_t n, const float* centroids, int k, int dim);
// Checks a batch: no NaN/Inf in x or weights, weights >= 0, enough points with weight > 0.
void validate_kmeans_batch(const KMeansBatch& batch, int k, const std::string& what);

}  // namespace antkv
