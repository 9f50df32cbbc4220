#include "anchor/anchor_scores.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>

#include "core/error.h"

namespace antkv {

namespace {
void check_args(const AnchorScoreArgs& a) {
  ANTKV_CHECK(a.q && a.k && a.v && a.n_tokens > 0 && a.n_heads > 0 && a.n_kv_heads > 0 && a.head_dim > 0 &&
                  a.n_heads % a.n_kv_heads == 0,
              "anchor scores: bad arguments (T={}, heads={}, kv_heads={}, d={})", a.n_tokens, a.n_heads,
              a.n_kv_heads, a.head_dim);
}
}  // namespace

void anchor_scores_reference(const AnchorScoreArgs& a, float* s_k, float* s_v) {
  check_args(a);
  const int T = a.n_tokens, H = a.n_heads, KV = a.n_kv_heads, d = a.head_dim, G = H / KV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> sk(static_cast<size_t>(T) * KV, 0.0), sv(sk.size(), 0.0);
  std::vector<double> A(static_cast<size_t>(T) * T), o(static_cast<size_t>(T) * d);
  auto at = [&](const float* base, int t, int heads, int h) { return base + (static_cast<int64_t>(t) * heads + h) * d; };
  for (int h = 0; h < H; ++h) {
    const int kvh = h / G;
    std::fill(A.begin(), A.end(), 0.0);
    std::fill(o.begin(), o.end(), 0.0);
    for (int i = 0; i < T; ++i) {
      double m = -INFINITY;
      for (int j = 0; j <= i; ++j) {
        double s = 0;
        for (int c = 0; c < d; ++c) s += static_cast<double>(at(a.q, i, H, h)[c]) * at(a.k, j, KV, kvh)[c];
        A[static_cast<size_t>(i) * T + j] = s * scale;
        m = std::max(m, s * scale);
      }
      double sum = 0;
      for (int j = 0; j <= i; ++j) sum += (A[static_cast<size_t>(i) * T + j] = std::exp(A[static_cast<size_t>(i) * T + j] - m));
      for (int j = 0; j <= i; ++j) {
        A[static_cast<size_t>(i) * T + j] /= sum;
        for (int c = 0; c < d; ++c) o[static_cast<size_t>(i) * d + c] += A[static_cast<size_t>(i) * T + j] * at(a.v, j, KV, kvh)[c];
      }
    }
    for (int i = 0; i < T; ++i) {
      double qn = 0;
      for (int c = 0; c < d; ++c) qn += static_cast<double>(at(a.q, i, H, h)[c]) * at(a.q, i, H, h)[c];
      qn = std::sqrt(qn);
      for (int j = 0; j <= i; ++j) {
        double dist = 0;
        for (int c = 0; c < d; ++c) {
          const double diff = at(a.v, j, KV, kvh)[c] - o[static_cast<size_t>(i) * d + c];
          dist += diff * diff;
        }
        const double p = A[static_cast<size_t>(i) * T + j];
        sv[static_cast<size_t>(j) * KV + kvh] += p;
        sk[static_cast<size_t>(j) * KV + kvh] += p * qn * std::sqrt(dist) * scale;
      }
    }
  }
  for (size_t x = 0; x < sk.size(); ++x) {
    s_k[x] = static_cast<float>(sk[x]);
    s_v[x] = static_cast<float>(sv[x]);
  }
}

void anchor_scores_cpu(const AnchorScoreArgs& a, float* s_k, float* s_v) {
  check_args(a);
  using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  using ConstStrided = Eigen::Map<const MatrixRM, 0, Stride>;
  const int T = a.n_tokens, H = a.n_heads, KV = a.n_kv_heads, d = a.head_dim, G = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  constexpr int kBlock = 64;  // query rows at a time: scores are kBlock x T, never T x T
  const int n_blocks = (T + kBlock - 1) / kBlock;
  // Per-(head, block) partial sums, reduced in a fixed order afterwards: deterministic, no atomics.
  std::vector<std::vector<double>> part_k(static_cast<size_t>(H) * n_blocks), part_v(part_k.size());
#pragma omp parallel
  {
    MatrixRM P, VO;
    Eigen::VectorXf o_norm2, v_norm2, q_norm;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int h = 0; h < H; ++h) {
      for (int b = 0; b < n_blocks; ++b) {
        const int kvh = h / G, i0 = b * kBlock, rows = std::min(kBlock, T - i0), n_keys = i0 + rows;
        ConstStrided Q(a.q + (static_cast<int64_t>(i0) * H + h) * d, rows, d, Stride(H * d));
        ConstStrided K(a.k + static_cast<int64_t>(kvh) * d, n_keys, d, Stride(KV * d));
        ConstStrided V(a.v + static_cast<int64_t>(kvh) * d, n_keys, d, Stride(KV * d));
        P.noalias() = (Q * K.transpose()) * scale;
        for (int r = 0; r < rows; ++r) {
          const int visible = i0 + r + 1;
          float m = -std::numeric_limits<float>::infinity();
          for (int j = 0; j < visible; ++j) m = std::max(m, P(r, j));
          double sum = 0;
          for (int j = 0; j < visible; ++j) sum += (P(r, j) = std::exp(P(r, j) - m));
          const float inv = static_cast<float>(1.0 / sum);
          for (int j = 0; j < visible; ++j) P(r, j) *= inv;
          for (int j = visible; j < n_keys; ++j) P(r, j) = 0.0f;
        }
        const MatrixRM O = P * V;                         // [rows, d] attention outputs
        VO.noalias() = O * V.transpose();                 // [rows, n_keys]: o_i . v_j
        o_norm2 = O.rowwise().squaredNorm();
        v_norm2 = V.rowwise().squaredNorm();
        q_norm = Q.rowwise().norm();
        auto& pk = part_k[static_cast<size_t>(h) * n_blocks + b];
        auto& pv = part_v[static_cast<size_t>(h) * n_blocks + b];
        pk.assign(static_cast<size_t>(n_keys), 0.0);
        pv.assign(static_cast<size_t>(n_keys), 0.0);
        for (int r = 0; r < rows; ++r) {
          const int visible = i0 + r + 1;
          const float qs = q_norm(r) * scale;
          for (int j = 0; j < visible; ++j) {
            const float p = P(r, j);
            // |v_j - o_i|^2 = |v_j|^2 - 2 v_j.o_i + |o_i|^2; where that cancels (o_i close to v_j, e.g. a row
            // attending mostly to one key) the expansion's rounding dominates: compute the difference directly.
            float dist2 = v_norm2(j) - 2.0f * VO(r, j) + o_norm2(r);
            if (dist2 < (v_norm2(j) + o_norm2(r)) * (1.0f / 16)) dist2 = (V.row(j) - O.row(r)).squaredNorm();
            dist2 = std::max(0.0f, dist2);
            pv[j] += p;
            pk[j] += p * qs * std::sqrt(dist2);
          }
        }
      }
    }
  }
  std::vector<double> sk(static_cast<size_t>(T) * KV, 0.0), sv(sk.size(), 0.0);
  for (int h = 0; h < H; ++h)
    for (int b = 0; b < n_blocks; ++b) {
      const auto& pk = part_k[static_cast<size_t>(h) * n_blocks + b];
      const auto& pv = part_v[static_cast<size_t>(h) * n_blocks + b];
      for (size_t j = 0; j < pk.size(); ++j) {
        sk[j * KV + h / G] += pk[j];
        sv[j * KV + h / G] += pv[j];
      }
    }
  for (size_t x = 0; x < sk.size(); ++x) {
    s_k[x] = static_cast<float>(sk[x]);
    s_v[x] = static_cast<float>(sv[x]);
  }
}

AnchorScoreKind parse_anchor_score_kind(const std::string& s) {
  if (s == "error_bound") return AnchorScoreKind::kErrorBound;
  if (s == "attention_mass") return AnchorScoreKind::kAttentionMass;
  if (s == "key_bound") return AnchorScoreKind::kKeyBound;
  if (s == "random") return AnchorScoreKind::kRandom;
  if (s == "recent") return AnchorScoreKind::kRecent;
  fail("unknown anchor score \"{}\" (expected error_bound, attention_mass, key_bound, random or recent)", s);
}

const char* anchor_score_kind_name(AnchorScoreKind k) {
  switch (k) {
    case AnchorScoreKind::kErrorBound: return "error_bound";
    case AnchorScoreKind::kAttentionMass: return "attention_mass";
    case AnchorScoreKind::kKeyBound: return "key_bound";
    case AnchorScoreKind::kRandom: return "random";
    case AnchorScoreKind::kRecent: return "recent";
  }
  return "?";
}

std::pair<float, float> anchor_score_weights(AnchorScoreKind kind, const float* e_k, const float* e_v, int h) {
  switch (kind) {
    case AnchorScoreKind::kErrorBound: return {e_k ? e_k[h] : 1.0f, e_v ? e_v[h] : 1.0f};
    case AnchorScoreKind::kAttentionMass: return {0.0f, 1.0f};
    case AnchorScoreKind::kKeyBound: return {1.0f, 0.0f};
    default: fail("anchor score {} is not a sum over attention rows", anchor_score_kind_name(kind));
  }
}

std::vector<float> anchor_score_weight_table(AnchorScoreKind kind, const std::vector<float>& e_k,
                                             const std::vector<float>& e_v, int n_kv_heads) {
  ANTKV_CHECK((e_k.empty() || static_cast<int>(e_k.size()) == n_kv_heads) &&
                  (e_v.empty() || static_cast<int>(e_v.size()) == n_kv_heads),
              "anchor score weights: error norms of {} / {} heads, the model has {}", e_k.size(), e_v.size(), n_kv_heads);
  std::vector<float> w(static_cast<size_t>(2) * n_kv_heads);
  for (int h = 0; h < n_kv_heads; ++h)
    std::tie(w[2 * h], w[2 * h + 1]) =
        anchor_score_weights(kind, e_k.empty() ? nullptr : e_k.data(), e_v.empty() ? nullptr : e_v.data(), h);
  return w;
}

void combine_anchor_scores(AnchorScoreKind kind, const float* s_k, const float* s_v, const float* e_k,
                           const float* e_v, int T, int KV, uint64_t seed, float* out) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  const bool sum = kind != AnchorScoreKind::kRandom && kind != AnchorScoreKind::kRecent;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < KV; ++h) {
      const size_t x = static_cast<size_t>(t) * KV + h;
      if (sum) {  // w_K S_K + w_V S_V (a zero weight drops its term exactly)
        const auto [wk, wv] = anchor_score_weights(kind, e_k, e_v, h);
        out[x] = wk == 0.0f ? s_v[x] * wv : wv == 0.0f ? s_k[x] * wk : s_k[x] * wk + s_v[x] * wv;
      } else {
        out[x] = kind == AnchorScoreKind::kRandom ? uni(rng) : static_cast<float>(t);
      }
    }
}

std::vector<int32_t> select_anchors(const float* scores, int T, int KV, int head, double ratio) {
  ANTKV_CHECK(ratio >= 0 && ratio <= 1, "anchor ratio {} must be in [0, 1]", ratio);
  const int n = std::min(T, static_cast<int>(std::ceil(ratio * T)));
  const int keep = std::min(T, std::max(n, T > 0 && ratio > 0 ? 1 : 0));
  // the head's column, contiguous (the scores are [T, KV])
  std::vector<float> col(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) col[t] = scores[static_cast<size_t>(t) * KV + head];
  std::vector<int32_t> order(static_cast<size_t>(T));
  std::iota(order.begin(), order.end(), 0);
  // token 0 first (the attention sink is always an anchor), then by score, ties by position: a strict total
  // order, so the first `keep` of a partial sort are those of a full stable sort (calibration and training
  // call this for every window, layer and head)
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int32_t x, int32_t y) {
    if ((x == 0) != (y == 0)) return x == 0;
    if (col[x] != col[y]) return col[x] > col[y];
    return x < y;
  });
  std::vector<int32_t> out(order.begin(), order.begin() + keep);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace antkv
