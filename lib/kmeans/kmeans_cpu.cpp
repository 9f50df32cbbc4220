#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "core/error.h"
#include "kmeans/kmeans.h"

namespace antkv {

void validate_kmeans_batch(const KMeansBatch& b, int k, const std::string& what) {
  ANTKV_CHECK(b.n_codebooks > 0 && b.n_points > 0 && b.dim > 0 && b.x, "{}: empty k-means batch", what);
  const int64_t total = static_cast<int64_t>(b.n_codebooks) * b.n_points;
  // in parallel (a LLaMA-3-8B layer side is 268M values); the first bad index is reported
  int64_t first_bad = total * b.dim;
#pragma omp parallel for schedule(static) reduction(min : first_bad)
  for (int64_t i = 0; i < total * b.dim; ++i)
    if (!std::isfinite(b.x[i]) && i < first_bad) first_bad = i;
  ANTKV_CHECK(first_bad == total * b.dim,
              "{}: non-finite value (NaN or Inf) in the activations of codebook {}, point {}", what,
              first_bad / b.dim / b.n_points, (first_bad / b.dim) % b.n_points);
  std::vector<int64_t> positive(static_cast<size_t>(b.n_codebooks), 0), bad_at(static_cast<size_t>(b.n_codebooks), -1);
#pragma omp parallel for schedule(static)
  for (int cb = 0; cb < b.n_codebooks; ++cb) {
    for (int64_t j = 0; j < b.n_points; ++j) {
      const float w = b.weights ? b.weights[static_cast<int64_t>(cb) * b.n_points + j] : 1.0f;
      if (!(std::isfinite(w) && w >= 0)) {
        bad_at[cb] = j;
        break;
      }
      positive[cb] += w > 0;
    }
  }
  for (int cb = 0; cb < b.n_codebooks; ++cb) {
    if (bad_at[cb] >= 0)
      fail("{}: bad weight {} (codebook {}, point {})", what, b.weights[static_cast<int64_t>(cb) * b.n_points + bad_at[cb]],
           cb, bad_at[cb]);
    ANTKV_CHECK(positive[cb] >= k, "{}: codebook {} has {} points with weight > 0, fewer than its {} centroids", what,
                cb, positive[cb], k);
  }
}

void kmeans_assign_cpu(const float* x, int64_t n, const float* c, int k, int dim, int32_t* assign, float* dist2) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    float best = std::numeric_limits<float>::infinity();
    int32_t arg = 0;
    for (int q = 0; q < k; ++q) {
      float d = 0;
      for (int t = 0; t < dim; ++t) {
        const float diff = x[j * dim + t] - c[static_cast<int64_t>(q) * dim + t];
        d += diff * diff;
      }
      if (d < best) best = d, arg = q;  // ties: lowest index
    }
    if (assign) assign[j] = arg;
    if (dist2) dist2[j] = best;
  }
}

double kmeans_objective_cpu(const float* x, const float* w, int64_t n, const float* c, int k, int dim) {
  std::vector<float> d2(static_cast<size_t>(n));
  kmeans_assign_cpu(x, n, c, k, dim, nullptr, d2.data());
  double obj = 0;
  for (int64_t j = 0; j < n; ++j) obj += static_cast<double>(w ? w[j] : 1.0f) * d2[j];
  return obj;
}

void kmeanspp_init(const KMeansParams& p, const KMeansBatch& batch, int b, float* centroids) {
  const int64_t n = batch.n_points;
  const int dim = batch.dim, k = p.k;
  const float* x = batch.x + static_cast<int64_t>(b) * n * dim;
  const float* w = batch.weights ? batch.weights + static_cast<int64_t>(b) * n : nullptr;
  std::mt19937_64 rng(p.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(b) + 1);
  // the sample: points with weight > 0, at most init_sample of them (uniformly, without replacement)
  std::vector<int64_t> idx;
  idx.reserve(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j)
    if (!w || w[j] > 0) idx.push_back(j);
  const int64_t want = p.init_sample > 0 ? p.init_sample : std::min<int64_t>(n, 64LL * k);
  if (static_cast<int64_t>(idx.size()) > want) {
    for (int64_t i = 0; i < want; ++i) {
      std::uniform_int_distribution<int64_t> u(i, static_cast<int64_t>(idx.size()) - 1);
      std::swap(idx[i], idx[u(rng)]);
    }
    idx.resize(static_cast<size_t>(want));
    std::sort(idx.begin(), idx.end());
  }
  const int64_t m = static_cast<int64_t>(idx.size());
  ANTKV_CHECK(m >= k, "k-means++: {} points with weight > 0 for {} centroids", m, k);
  auto weight = [&](int64_t i) { return w ? static_cast<double>(w[idx[i]]) : 1.0; };
  std::vector<double> d2(static_cast<size_t>(m), std::numeric_limits<double>::infinity());
  auto pick = [&](const std::vector<double>& prob) {
    double total = 0;
    for (double v : prob) total += v;
    std::uniform_real_distribution<double> u(0.0, total);
    double r = u(rng), acc = 0;
    for (int64_t i = 0; i < m; ++i) {
      acc += prob[i];
      if (r < acc && prob[i] > 0) return i;
    }
    for (int64_t i = m - 1; i >= 0; --i)
      if (prob[i] > 0) return i;
    return int64_t{0};
  };
  std::vector<double> prob(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) prob[i] = weight(i);
  for (int q = 0; q < k; ++q) {
    const int64_t chosen = pick(prob);
    const float* src = x + idx[chosen] * dim;
    std::copy_n(src, dim, centroids + static_cast<int64_t>(q) * dim);
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + idx[i] * dim;
      double d = 0;
      for (int t = 0; t < dim; ++t) d += (xi[t] - src[t]) * static_cast<double>(xi[t] - src[t]);
      d2[i] = std::min(d2[i], d);
      prob[i] = weight(i) * d2[i];
    }
    // all remaining points coincide with chosen centroids: fall back to weights (duplicates allowed)
    double total = 0;
    for (double v : prob) total += v;
    if (total <= 0)
      for (int64_t i = 0; i < m; ++i) prob[i] = weight(i);
  }
}

namespace {

class FaissKMeans : public KMeansTrainer {
 public:
  explicit FaissKMeans(const KMeansParams& p) : p_(p) {}
  std::string name() const override { return "faiss-cpu"; }

  KMeansResult train(const KMeansBatch& b, const float* init) override {
    validate_kmeans_batch(b, p_.k, "k-means (FAISS)");
    KMeansResult r;
    const int k = p_.k, dim = b.dim;
    r.centroids.resize(static_cast<size_t>(b.n_codebooks) * k * dim);
    r.objective.resize(b.n_codebooks);
    r.iterations.assign(b.n_codebooks, p_.iters);
    r.reseeded.assign(b.n_codebooks, 0);
    // Codebooks in parallel, each FAISS run single-threaded inside (nested OpenMP regions run serially):
    // thousands of small problems, where FAISS's own per-call threading costs more than it gains.
    std::vector<std::string> errors(static_cast<size_t>(b.n_codebooks));
#pragma omp parallel for schedule(dynamic, 1)
    for (int cb = 0; cb < b.n_codebooks; ++cb) {
      try {
        train_one(b, init, cb, r);
      } catch (const std::exception& e) {
        errors[cb] = e.what();
      }
    }
    for (const auto& e : errors) ANTKV_CHECK(e.empty(), "k-means (FAISS): {}", e);
    return r;
  }

 private:
  void train_one(const KMeansBatch& b, const float* init, int cb, KMeansResult& r) const {
    const int k = p_.k, dim = b.dim;
    const int64_t n = b.n_points;
    {
      const float* x = b.x + static_cast<int64_t>(cb) * n * dim;
      const float* w = b.weights ? b.weights + static_cast<int64_t>(cb) * n : nullptr;
      float* out = r.centroids.data() + static_cast<int64_t>(cb) * k * dim;
      faiss::ClusteringParameters cp;
      cp.niter = p_.iters;
      cp.seed = static_cast<int>(p_.seed % INT_MAX);
      cp.max_points_per_centroid = INT_MAX;  // train on every point (FAISS subsamples by default)
      cp.min_points_per_centroid = 1;
      cp.verbose = false;
      faiss::Clustering cl(dim, k, cp);
      cl.centroids.resize(static_cast<size_t>(k) * dim);
      if (init) {
        std::copy_n(init + static_cast<int64_t>(cb) * k * dim, static_cast<size_t>(k) * dim, cl.centroids.data());
      } else {
        kmeanspp_init(p_, b, cb, cl.centroids.data());
      }
      faiss::IndexFlatL2 index(dim);
      cl.train(n, x, index, w);
      std::copy(cl.centroids.begin(), cl.centroids.end(), out);
      for (const auto& s : cl.iteration_stats) r.reseeded[cb] += s.nsplit;
      r.objective[cb] = kmeans_objective_cpu(x, w, n, out, k, dim);
    }
  }

  KMeansParams p_;
};

}  // namespace

std::unique_ptr<KMeansTrainer> make_kmeans_cpu(const KMeansParams& p) { return std::make_unique<FaissKMeans>(p); }

}  // namespace antkv
