#include "runtime/cpu_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace antkv::cpu {

void rmsnorm(const float* x, const float* weight, float* y, int64_t n_rows, int n, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0;  // double: the mean of squares over 4096-8192 channels, as a stable reference
    for (int i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void swiglu(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void attention(const float* q, const float* k, const float* v, float* out, float* lse, int n_q,
               int n_kv_tokens, int n_heads, int n_kv_heads, int d, float scale) {
  const int past = n_kv_tokens - n_q;
  const int group = n_heads / n_kv_heads;
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(n_kv_tokens));
    std::vector<double> acc(static_cast<size_t>(d));
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int h = 0; h < n_heads; ++h) {
      for (int i = 0; i < n_q; ++i) {
        const int kvh = h / group;
        const float* qi = q + (static_cast<int64_t>(i) * n_heads + h) * d;
        const int n_keys = past + i + 1;  // causal: keys 0 .. past + i
        float m = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < n_keys; ++j) {
          const float* kj = k + (static_cast<int64_t>(j) * n_kv_heads + kvh) * d;
          float s = 0;
          for (int c = 0; c < d; ++c) s += qi[c] * kj[c];
          scores[j] = s * scale;
          m = std::max(m, scores[j]);
        }
        double sum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int j = 0; j < n_keys; ++j) {
          const double p = std::exp(static_cast<double>(scores[j]) - m);
          sum += p;
          const float* vj = v + (static_cast<int64_t>(j) * n_kv_heads + kvh) * d;
          for (int c = 0; c < d; ++c) acc[c] += p * vj[c];
        }
        float* oi = out + (static_cast<int64_t>(i) * n_heads + h) * d;
        for (int c = 0; c < d; ++c) oi[c] = static_cast<float>(acc[c] / sum);
        if (lse) lse[static_cast<int64_t>(h) * n_q + i] = static_cast<float>(m + std::log(sum));
      }
    }
  }
}

void nll_from_logits(const float* logits, const int32_t* targets, float* nll, int64_t n_rows, int vocab) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    if (targets[r] < 0) {
      nll[r] = 0;
      continue;
    }
    const float* lr = logits + r * vocab;
    float m = lr[0];
    for (int i = 1; i < vocab; ++i) m = std::max(m, lr[i]);
    double sum = 0;
    for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(lr[i]) - m);
    nll[r] = static_cast<float>(m + std::log(sum) - lr[targets[r]]);
  }
}

}  // namespace antkv::cpu
