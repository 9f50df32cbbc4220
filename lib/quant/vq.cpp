#include "quant/vq.h"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "quant/fp8.h"

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

void gain_normalize(float* x, int64_t n, int64_t stride, int d, float* norms, Norm format) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * stride;
    double sq = 0;
    for (int c = 0; c < d; ++c) sq += static_cast<double>(row[c]) * row[c];
    const double norm = std::sqrt(sq);
    norms[r] = format == Norm::kFp8 ? round_fp8_e4m3(static_cast<float>(norm))  // stored in fp8 or fp16
                                    : static_cast<float>(Eigen::half(static_cast<float>(norm)));
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

std::vector<int> rope_pair_order(int d, int c) {
  ANTKV_CHECK(c >= 2 && c % 2 == 0 && d % c == 0, "RoPE pair groups: c = {} must be even and divide head_dim {}", c, d);
  std::vector<int> order(static_cast<size_t>(d));
  const int half = d / 2, pairs = c / 2;
  for (int g = 0; g < d / c; ++g)
    for (int t = 0; t < c; ++t) order[static_cast<size_t>(g) * c + t] = t < pairs ? g * pairs + t : half + g * pairs + t - pairs;
  return order;
}

void permute_channels(const std::vector<int>& order, bool to_pairs, float* x, int64_t n, int64_t stride) {
  const size_t d = order.size();
  std::vector<float> tmp(d);
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * stride;
    for (size_t i = 0; i < d; ++i) {
      if (to_pairs) tmp[i] = row[order[i]];
      else tmp[order[i]] = row[i];
    }
    std::copy(tmp.begin(), tmp.end(), row);
  }
}

void rotate_forward(const float* R, const float* mean, int d, float* x, int64_t n, int64_t stride) {
  // The single dot product per output was latency-bound (at the 8B shape it was most of training's gain/rotate
  // preparation). Many rows (the trainer's chunks): R^T in double once per call, the inner loop over the
  // outputs (vectorized); few rows (the CPU cache's decode calls, one row each, where that setup would double
  // the cost): eight outputs per pass over the row. Either way each output keeps its one sum over c in
  // ascending order, so the values are the same bit for bit.
  constexpr int64_t kTransposeRows = 16;
  constexpr int kRows = 8;
  std::vector<double> rt;
  if (n >= kTransposeRows) {
    rt.resize(static_cast<size_t>(d) * d);
    for (int i = 0; i < d; ++i)
      for (int c = 0; c < d; ++c) rt[static_cast<size_t>(c) * d + i] = R[static_cast<int64_t>(i) * d + c];
  }
#pragma omp parallel if (n * d * d > (1 << 20))
  {
    std::vector<float> tmp(static_cast<size_t>(d));
    std::vector<double> acc(rt.empty() ? 0 : static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      float* row = x + r * stride;
      for (int c = 0; c < d; ++c) tmp[c] = row[c] - mean[c];
      if (!rt.empty()) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int c = 0; c < d; ++c) {
          const double* rc = rt.data() + static_cast<size_t>(c) * d;
          const double tc = tmp[c];
          for (int i = 0; i < d; ++i) acc[i] += rc[i] * tc;
        }
        for (int i = 0; i < d; ++i) row[i] = static_cast<float>(acc[i]);
        continue;
      }
      int i = 0;
      for (; i + kRows <= d; i += kRows) {
        const float* ri = R + static_cast<int64_t>(i) * d;
        double s[kRows] = {};
        for (int c = 0; c < d; ++c)
          for (int k = 0; k < kRows; ++k) s[k] += static_cast<double>(ri[static_cast<int64_t>(k) * d + c]) * tmp[c];
        for (int k = 0; k < kRows; ++k) row[i + k] = static_cast<float>(s[k]);
      }
      for (; i < d; ++i) {  // d not a multiple of 8
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


const std::vector<float>& lloyd_max_gaussian(int bits) {
  static std::array<std::vector<float>, 5> cache;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::vector<float>& out = cache.at(static_cast<size_t>(bits));
  if (!out.empty()) return out;
  // Lloyd's algorithm on a fine grid of N(0, 1) over [-8, 8]
  const int G = 32001;
  std::vector<double> xs(G), ps(G);
  for (int i = 0; i < G; ++i) xs[i] = -8.0 + 16.0 * i / (G - 1), ps[i] = std::exp(-0.5 * xs[i] * xs[i]);
  const int L = 1 << bits;
  std::vector<double> lv(static_cast<size_t>(L));
  for (int j = 0; j < L; ++j) lv[j] = -2.5 + 5.0 * (j + 0.5) / L;
  for (int it = 0; it < 2000; ++it) {
    std::vector<double> num(static_cast<size_t>(L), 0.0), den(static_cast<size_t>(L), 0.0);
    int j = 0;
    for (int i = 0; i < G; ++i) {
      while (j + 1 < L && xs[i] > 0.5 * (lv[j] + lv[j + 1])) ++j;
      num[j] += xs[i] * ps[i], den[j] += ps[i];
    }
    for (int q = 0; q < L; ++q)
      if (den[q] > 0) lv[q] = num[q] / den[q];
  }
  for (int q = 0; q < L / 2; ++q) {  // exactly symmetric (the grid's midpoint ties go to the lower level)
    const double a = 0.5 * (lv[L - 1 - q] - lv[q]);
    lv[q] = -a, lv[L - 1 - q] = a;
  }
  for (double v : lv) out.push_back(static_cast<float>(v));
  return out;
}

namespace {
void fwht(float* x, int d) {  // unnormalized Walsh-Hadamard transform, d a power of 2
  for (int h = 1; h < d; h <<= 1)
    for (int i = 0; i < d; i += h << 1)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b, x[j + h] = a - b;
      }
}
}  // namespace

std::vector<float> rsq_signs(int d, int layer, int tensor, int head) {
  std::mt19937_64 rng(0x5eedULL + static_cast<uint64_t>(layer) * 1000003ULL + static_cast<uint64_t>(tensor) * 7919ULL +
                      static_cast<uint64_t>(head) * 131ULL);
  std::vector<float> s(static_cast<size_t>(d));
  for (auto& v : s) v = (rng() >> 63) ? -1.0f : 1.0f;
  return s;
}

void rsq_quantize(float* x, int64_t n, int64_t stride, int d, int bits, const float* signs) {
  const std::vector<float>& lv = lloyd_max_gaussian(bits);
  const int L = static_cast<int>(lv.size());
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> y(static_cast<size_t>(d));
  for (int64_t r = 0; r < n; ++r) {
    float* row = x + r * stride;
    for (int c = 0; c < d; ++c) y[c] = row[c] * signs[c];
    fwht(y.data(), d);
    double sq = 0;
    for (int c = 0; c < d; ++c) y[c] *= inv_sqrt_d, sq += static_cast<double>(y[c]) * y[c];
    const float norm = static_cast<float>(Eigen::half(static_cast<float>(std::sqrt(sq))));  // stored in fp16
    if (!(sq > 0) || norm == 0) {
      for (int c = 0; c < d; ++c) row[c] = 0;
      continue;
    }
    const double scale = std::sqrt(static_cast<double>(d) / sq);
    double rq = 0;
    for (int c = 0; c < d; ++c) {
      const float u = static_cast<float>(y[c] * scale);
      int q = 0;
      while (q + 1 < L && u > 0.5f * (lv[q] + lv[q + 1])) ++q;  // nearest level (ties: the lower)
      y[c] = lv[q], rq += static_cast<double>(lv[q]) * lv[q];
    }
    const float back = static_cast<float>(norm / std::sqrt(rq));  // renormalized to the stored norm
    for (int c = 0; c < d; ++c) y[c] *= back;
    fwht(y.data(), d);  // H is its own inverse up to 1/d: x = S H y / sqrt(d)
    for (int c = 0; c < d; ++c) row[c] = y[c] * inv_sqrt_d * signs[c];
  }
}

void metric_factor(const double* M, int c, float* L, const char* what) {
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> m(M, c, c);
  Eigen::MatrixXd a = (m + m.transpose()) / 2;
  const double tr = a.trace();
  ANTKV_CHECK(a.allFinite(), "{}: metric block is not finite", what);
  // the scale of the metric changes no assignment: normalized to trace c (factors of order 1 in fp16); a block
  // without a positive trace (nothing reads those channels) falls back to the Euclidean distance
  if (tr > 0) a *= c / tr;
  else a.setIdentity();
  a.diagonal().array() += 1e-3;
  Eigen::LLT<Eigen::MatrixXd> llt(a);
  ANTKV_CHECK(llt.info() == Eigen::Success, "{}: metric block is not positive definite", what);
  const Eigen::MatrixXd f = llt.matrixL();
  for (int i = 0; i < c; ++i)
    for (int j = 0; j < c; ++j) L[i * c + j] = j <= i ? static_cast<float>(Eigen::half(static_cast<float>(f(i, j)))) : 0.0f;
}

namespace {
// Applies solve(L, xg, y) to every c-channel group g of the n rows of x (row stride `stride`), L = the group's
// c x c factor, y a double scratch of c that solve fills and that then replaces xg. The trainer's gather loop
// calls this per row and group: no allocation for c <= 64.
template <class Solve>
void for_each_metric_group(const float* metric, int groups, int c, float* x, int64_t n, int64_t stride, Solve solve) {
  double buf[64];
  std::vector<double> heap(c > 64 ? static_cast<size_t>(c) : 0);
  double* y = c > 64 ? heap.data() : buf;
  for (int64_t r = 0; r < n; ++r)
    for (int g = 0; g < groups; ++g) {
      const float* L = metric + static_cast<int64_t>(g) * c * c;
      float* xg = x + r * stride + static_cast<int64_t>(g) * c;
      solve(L, xg, y);
      for (int j = 0; j < c; ++j) xg[j] = static_cast<float>(y[j]);
    }
}
}  // namespace

void metric_forward(const float* metric, int groups, int c, float* x, int64_t n, int64_t stride) {
  for_each_metric_group(metric, groups, c, x, n, stride, [c](const float* L, const float* xg, double* y) {
    for (int j = 0; j < c; ++j) {  // (L^T x)_j = sum_{i >= j} L_ij x_i
      double s = 0;
      for (int i = j; i < c; ++i) s += static_cast<double>(L[i * c + j]) * xg[i];
      y[j] = s;
    }
  });
}

void metric_inverse(const float* metric, int groups, int c, float* x, int64_t n, int64_t stride) {
  for_each_metric_group(metric, groups, c, x, n, stride, [c](const float* L, const float* xg, double* y) {
    for (int j = c - 1; j >= 0; --j) {  // solve L^T y = x (upper triangular): from the last row up
      double s = xg[j];
      for (int i = j + 1; i < c; ++i) s -= static_cast<double>(L[i * c + j]) * y[i];
      y[j] = s / L[j * c + j];
    }
  });
}

std::vector<float> metric_centroids(const VqHeadCodebooks& cb, const float* metric) {
  std::vector<float> tc(cb.centroids, cb.centroids + static_cast<int64_t>(cb.groups) * cb.k * cb.c);  // L^T c
  for (int g = 0; g < cb.groups; ++g)
    metric_forward(metric + static_cast<int64_t>(g) * cb.c * cb.c, 1, cb.c, tc.data() + static_cast<int64_t>(g) * cb.k * cb.c,
                   cb.k, cb.c);
  return tc;
}

void vq_quantize_metric(const VqHeadCodebooks& cb, const float* mapped, const float* metric, const float* x, int64_t n,
                        int64_t stride, float* out) {
  const int64_t gc = static_cast<int64_t>(cb.groups) * cb.c;
  std::vector<float> tx(static_cast<size_t>(n) * gc);
  for (int64_t r = 0; r < n; ++r) std::copy_n(x + r * stride, gc, tx.data() + r * gc);
  metric_forward(metric, cb.groups, cb.c, tx.data(), n, gc);
  std::vector<int32_t> codes(static_cast<size_t>(n) * cb.groups);
  vq_encode(VqHeadCodebooks{mapped, cb.groups, cb.k, cb.c}, tx.data(), n, gc, codes.data());
  vq_decode(cb, codes.data(), n, stride, out);
}

void vq_quantize_metric(const VqHeadCodebooks& cb, const float* metric, const float* x, int64_t n, int64_t stride,
                        float* out) {
  const std::vector<float> mapped = metric_centroids(cb, metric);
  vq_quantize_metric(cb, mapped.data(), metric, x, n, stride, out);
}

}  // namespace antkv
