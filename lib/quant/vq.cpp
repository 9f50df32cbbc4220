#include "quant/vq.h"

#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace antkv {

namespace {
inline int32_t nearest(const float* x, const float* cents, int k, int c) {
  float best = std::numeric_limits<float>::infinity();
  int32_t arg = 0;
  for (int q = 0; q < k; ++q) {
    const float* cq = cents + static_cast<int64_t>(q) * c;
    float d = 0;
    for (int t = 0; t < c; ++t) {
      const float diff = x[t] - cq[t];
      d += diff * diff;
    }
    if (d < best) best = d, arg = q;  // ties: lowest index, as the k-means assignment
  }
  return arg;
}
}  // namespace

void vq_encode(const VqHeadCodebooks& cb, const float* x, int64_t n, int64_t stride, int32_t* codes) {
#pragma omp parallel for schedule(static) if (n * cb.groups * cb.k > 65536)
  for (int64_t r = 0; r < n; ++r)
    for (int g = 0; g < cb.groups; ++g)
      codes[r * cb.groups + g] =
          nearest(x + r * stride + static_cast<int64_t>(g) * cb.c, cb.centroids + static_cast<int64_t>(g) * cb.k * cb.c, cb.k, cb.c);
}

void vq_decode(const VqHeadCodebooks& cb, const int32_t* codes, int64_t n, int64_t stride, float* out) {
  for (int64_t r = 0; r < n; ++r)
    for (int g = 0; g < cb.groups; ++g) {
      const float* src = cb.centroids + (static_cast<int64_t>(g) * cb.k + codes[r * cb.groups + g]) * cb.c;
      float* dst = out + r * stride + static_cast<int64_t>(g) * cb.c;
      for (int t = 0; t < cb.c; ++t) dst[t] = src[t];
    }
}

void vq_quantize(const VqHeadCodebooks& cb, const float* x, int64_t n, int64_t stride, float* out) {
  std::vector<int32_t> codes(static_cast<size_t>(n) * cb.groups);
  vq_encode(cb, x, n, stride, codes.data());
  vq_decode(cb, codes.data(), n, stride, out);
}

void gain_normalize(float* x, int64_t n, int64_t stride, int d, float* norms) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * stride;
    double sq = 0;
    for (int c = 0; c < d; ++c) sq += static_cast<double>(row[c]) * row[c];
    const double norm = std::sqrt(sq);
    norms[r] = static_cast<float>(Eigen::half(static_cast<float>(norm)));  // stored in fp16
    const double inv = norm > 0 ? 1.0 / norm : 0.0;
    for (int c = 0; c < d; ++c) row[c] = static_cast<float>(row[c] * inv);
  }
}

void gain_restore(float* out, int64_t n, int64_t stride, int d, const float* norms) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = out + r * stride;
    double sq = 0;
    for (int c = 0; c < d; ++c) sq += static_cast<double>(row[c]) * row[c];
    const double scale = sq > 0 ? norms[r] / std::sqrt(sq) : 0.0;
    for (int c = 0; c < d; ++c) row[c] = static_cast<float>(row[c] * scale);
  }
}

}  // namespace antkv

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <numeric>

namespace antkv {

void rotate_forward(const float* R, const float* mean, int d, float* x, int64_t n, int64_t stride) {
#pragma omp parallel if (n * d * d > (1 << 20))
  {
    std::vector<float> tmp(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      float* row = x + r * stride;
      for (int c = 0; c < d; ++c) tmp[c] = row[c] - mean[c];
      for (int i = 0; i < d; ++i) {
        const float* ri = R + static_cast<int64_t>(i) * d;
        double s = 0;
        for (int c = 0; c < d; ++c) s += static_cast<double>(ri[c]) * tmp[c];
        row[i] = static_cast<float>(s);
      }
    }
  }
}

void rotate_inverse(const float* R, const float* mean, int d, float* x, int64_t n, int64_t stride) {
#pragma omp parallel if (n * d * d > (1 << 20))
  {
    std::vector<double> acc(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      float* row = x + r * stride;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int i = 0; i < d; ++i) {
        const float* ri = R + static_cast<int64_t>(i) * d;
        const double xi = row[i];
        for (int c = 0; c < d; ++c) acc[c] += xi * ri[c];
      }
      for (int c = 0; c < d; ++c) row[c] = static_cast<float>(acc[c] + mean[c]);
    }
  }
}

void pca_rotation(const double* cov, int d, int c, float* R) {
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> C(cov, d, d);
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(C);
  const Eigen::VectorXd& lam = es.eigenvalues();  // increasing
  const Eigen::MatrixXd& V = es.eigenvectors();   // columns
  const int groups = d / c;
  const double floor = std::max(lam.maxCoeff(), 1e-30) * 1e-12;
  std::vector<double> logsum(static_cast<size_t>(groups), 0.0);
  std::vector<int> fill(static_cast<size_t>(groups), 0);
  for (int e = d - 1; e >= 0; --e) {  // decreasing eigenvalues
    int best = -1;
    for (int g = 0; g < groups; ++g) {
      if (fill[g] == c) continue;
      // an empty group first (its product is undefined), else the smallest product so far
      if (best < 0 || (fill[g] == 0 && fill[best] > 0) ||
          (fill[g] > 0 && fill[best] > 0 && logsum[g] < logsum[best]))
        best = g;
    }
    logsum[best] += std::log(std::max(lam[e], floor));
    const int row = best * c + fill[best]++;
    for (int t = 0; t < d; ++t) R[static_cast<int64_t>(row) * d + t] = static_cast<float>(Eigen::half(static_cast<float>(V(t, e))));
  }
}

}  // namespace antkv
