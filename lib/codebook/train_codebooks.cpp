#include "codebook/train_codebooks.h"

#include <Eigen/Core>
#include <Eigen/Dense>

#include <algorithm>
#include <future>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "anchor/anchor_scores.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/interrupt.h"
#include "core/progress.h"
#include "core/system_info.h"
#include "io/calib_dump.h"
#include "quant/vq.h"

namespace antkv {

namespace {

// Which rows train, which are held out, and each row's anchor flag per head.
struct RowPlan {
  std::vector<int64_t> train, holdout;
  std::vector<uint8_t> anchor;  // [N, kv_heads]
};

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// One layer of the dump in memory: K/V as the stored fp16 bits, the scores as fp32.
struct LayerData {
  int layer = 0;
  std::vector<uint16_t> keys, values;       // [N, kv_heads, d]
  std::vector<float> s_k, s_v, score;       // [N, kv_heads]
  double read_s = 0;
};

// Reads one layer (the prefetch thread: the only HDF5 user while it runs) and checks K/V for NaN/Inf
// (fp16 exponent all ones) in parallel. key_order (key_rope=commute: quant/vq.h rope_pair_order, else empty): each
// key row is put in that channel order, in which the codebooks are trained and stored.
LayerData load_layer(const CalibDumpReader& dump, int layer, const std::vector<int>& key_order) {
  const auto t0 = Clock::now();
  const int64_t N = dump.n_tokens();
  const size_t kv = static_cast<size_t>(dump.meta().num_kv_heads), d = static_cast<size_t>(dump.meta().head_dim);
  LayerData L;
  L.layer = layer;
  L.keys.resize(N * kv * d);
  L.values.resize(L.keys.size());
  L.s_k.resize(N * kv);
  L.s_v.resize(N * kv);
  L.score.resize(N * kv);
  dump.read_keys_half(layer, 0, N, L.keys.data());
  dump.read_values_half(layer, 0, N, L.values.data());
  dump.read_scores(layer, "S_K", 0, N, L.s_k.data());
  dump.read_scores(layer, "S_V", 0, N, L.s_v.data());
  dump.read_scores(layer, "anchor_score", 0, N, L.score.data());
  for (auto [name, v] : {std::pair<const char*, const std::vector<uint16_t>*>{"keys", &L.keys}, {"values", &L.values}}) {
    int64_t bad = 0;
    const int64_t n = static_cast<int64_t>(v->size());
    const uint16_t* p = v->data();
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) bad += (p[i] & 0x7c00) == 0x7c00;
    ANTKV_CHECK(bad == 0, "{}: layer {} {} contain NaN or Inf ({} values)", dump.path(), layer, name, bad);
  }
  if (!key_order.empty()) {
    const int64_t rows = static_cast<int64_t>(N * kv);
#pragma omp parallel
    {
      std::vector<uint16_t> tmp(d);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* row = L.keys.data() + r * static_cast<int64_t>(d);
        for (size_t i = 0; i < d; ++i) tmp[i] = row[key_order[i]];
        std::copy(tmp.begin(), tmp.end(), row);
      }
    }
  }
  L.read_s = since(t0);
  return L;
}

inline float half_to_float(uint16_t h) { return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(h)); }

RowPlan plan_rows(const CalibDumpReader& dump, const Recipe& r, const LayerData& data, const std::vector<int32_t>& windows,
                  const std::vector<int32_t>& positions) {
  const int64_t N = dump.n_tokens();
  const int KV = static_cast<int>(dump.meta().num_kv_heads);
  RowPlan p;
  p.anchor.assign(static_cast<size_t>(N) * KV, 0);
  const std::vector<float>& score = data.score;
  // anchors per window and head: the window's rows are contiguous in the dump
  for (int64_t a = 0; a < N;) {
    int64_t b = a;
    while (b < N && windows[b] == windows[a]) ++b;
    const int T = static_cast<int>(b - a);
    for (int h = 0; h < KV; ++h) {
      // select_anchors forces row 0 of the slice; that is position 0 only when the sample kept it
      for (int32_t t : select_anchors(score.data() + a * KV, T, KV, h, r.anchor.ratio))
        if (t != 0 || positions[a] == 0) p.anchor[(a + t) * KV + h] = 1;
      if (positions[a] == 0) p.anchor[a * KV + h] = 1;
    }
    a = b;
  }
  std::mt19937_64 rng(r.kmeans.seed * 7919 + 17);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t j = 0; j < N; ++j) (u(rng) < r.kmeans.holdout ? p.holdout : p.train).push_back(j);
  if (r.kmeans.max_points > 0 && static_cast<int64_t>(p.train.size()) > r.kmeans.max_points) {
    std::shuffle(p.train.begin(), p.train.end(), rng);
    p.train.resize(static_cast<size_t>(r.kmeans.max_points));
    std::sort(p.train.begin(), p.train.end());
  }
  return p;
}

struct Side {
  const char* name;   // "keys" | "values"
  int c, b;
  bool keys;
  bool gain = false;  // gain-shape: train on unit vectors (kmeans.gain)
  bool rotate = false;  // rotate=pca: train in the centered PCA basis with OPQ allocation (kmeans.rotate)
  // metric=task (kmeans.metric): [KV, d, d] per head, the task metric of this side in the original basis (keys:
  // query second moment, values: o_proj Gram; metric_of_side); empty: plain
  const std::vector<double>* metric = nullptr;
};

struct SideTimes {
  double prepare = 0, kmeans = 0, heldout = 0;
};

// Buffers reused by every side of every layer: a LLaMA-3-8B side's batch is 1 GiB, and allocating it anew
// each time cost more than filling it (zeroing plus a page fault per 4 KiB, serialized in the kernel).
struct Workspace {
  std::vector<float> tw, bx, bw, hx, hr;
};
template <typename T>
T* sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Trains one layer's codebooks for one side; fills cb and the held-out error report.
void train_side(const CalibDumpReader& dump, const Recipe& r, const TrainCodebooksOptions& o, const LayerData& data,
                const RowPlan& plan, const Side& side, LayerCodebooks& cb, QuantErrorReport& rep, SideTimes& times,
                Workspace& ws) {
  const int layer = data.layer;
  const int KV = static_cast<int>(dump.meta().num_kv_heads), d = static_cast<int>(dump.meta().head_dim);
  const int c = side.c, groups = d / c, k = 1 << side.b;
  const uint16_t* x = side.keys ? data.keys.data() : data.values.data();  // [N, KV, d] fp16 bits
  const std::vector<float>& w = side.keys ? data.s_k : data.s_v;
  auto t0 = Clock::now();

  const bool weighted = r.kmeans.weighting == Weighting::kAnchor;
  // per-head token weights over the training rows, normalized to mean 1 over the rows that train
  const int64_t n = static_cast<int64_t>(plan.train.size());
  float* tw = sized(ws.tw, static_cast<size_t>(KV) * n);
  for (int h = 0; h < KV; ++h) {
    double sum = 0;
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = plan.train[i];
      const bool excluded = r.kmeans.exclude_anchors && plan.anchor[j * KV + h];
      const float v = excluded ? 0.0f : (weighted ? w[j * KV + h] : 1.0f);
      tw[h * n + i] = v;
      if (v > 0) sum += v, ++cnt;
    }
    const double mean = cnt ? sum / cnt : 1.0;
    for (int64_t i = 0; i < n; ++i) tw[h * n + i] = static_cast<float>(tw[h * n + i] / (mean > 0 ? mean : 1.0));
  }
  // rotate=pca: per head, the weighted mean and covariance of the training rows (the k-means weights, anchors
  // left out as they are) -> fp16 mean and basis (quant/vq.h pca_rotation)
  if (side.rotate) {
    cb.rotation.assign(static_cast<size_t>(KV) * d * d, 0.0f);
    cb.mean.assign(static_cast<size_t>(KV) * d, 0.0f);
    // heads in parallel, each covariance summed over chunks of rows, without an [n, d] double copy per head
    // (at the 8B shape a gain/rotate codebook set's training went from 46 to 23 s with this)
    constexpr int64_t kCovRows = 4096;
#pragma omp parallel for schedule(dynamic)
    for (int h = 0; h < KV; ++h) {
      double wsum = 0;
      for (int64_t i = 0; i < n; ++i) wsum += tw[h * n + i];
      const bool uniform = !(wsum > 0);
      if (uniform) wsum = static_cast<double>(n);
      Eigen::VectorXd mu = Eigen::VectorXd::Zero(d);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t* src = x + plan.train[i] * KV * d + static_cast<int64_t>(h) * d;
        const double wi = uniform ? 1.0 : tw[h * n + i];
        for (int t = 0; t < d; ++t) mu[t] += wi * half_to_float(src[t]);
      }
      mu /= wsum;
      float* mean = cb.mean.data() + static_cast<int64_t>(h) * d;
      for (int t = 0; t < d; ++t) mean[t] = static_cast<float>(Eigen::half(static_cast<float>(mu[t])));
      Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> C =
          Eigen::MatrixXd::Zero(d, d);
      Eigen::MatrixXd X(std::min(n, kCovRows), d);
      for (int64_t i0 = 0; i0 < n; i0 += kCovRows) {
        const int64_t rows = std::min(kCovRows, n - i0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const uint16_t* src = x + plan.train[i] * KV * d + static_cast<int64_t>(h) * d;
          const double sw = std::sqrt(uniform ? 1.0 : static_cast<double>(tw[h * n + i]));
          for (int t = 0; t < d; ++t) X(r, t) = (half_to_float(src[t]) - mean[t]) * sw;
        }
        C.noalias() += X.topRows(rows).transpose() * X.topRows(rows);
      }
      C /= wsum;
      pca_rotation(C.data(), d, c, cb.rotation.data() + static_cast<int64_t>(h) * d * d);
    }
  }
  // metric=task: per head and group the fp16 Cholesky factor L of the c x c diagonal block of the metric in the
  // coded basis (R M R^T after rotate=pca's rotation: the error there is R (x - x_hat)); the codebooks learn L^T x
  const bool task = side.metric != nullptr;
  if (task) {
    cb.metric.assign(static_cast<size_t>(KV) * groups * c * c, 0.0f);
    for (int h = 0; h < KV; ++h) {
      using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      RowMat M = Eigen::Map<const RowMat>(side.metric->data() + static_cast<size_t>(h) * d * d, d, d);
      if (side.rotate) {
        RowMat R(d, d);
        const float* Rh = cb.rotation.data() + static_cast<int64_t>(h) * d * d;
        for (int i = 0; i < d * d; ++i) R.data()[i] = Rh[i];
        M = R * M * R.transpose();
      }
      for (int g = 0; g < groups; ++g) {
        const RowMat block = M.block(static_cast<int64_t>(g) * c, static_cast<int64_t>(g) * c, c, c);
        const std::string what = fmt::format("{}: layer {} {} head {} group {}", dump.path(), layer, side.name, h, g);
        metric_factor(block.data(), c, cb.metric.data() + (static_cast<size_t>(h) * groups + g) * c * c, what.c_str());
      }
    }
  }
  // the batch: codebook (h, g) -> points x[train rows, h, g*c : (g+1)*c], gathered and converted in one
  // parallel pass over the rows (each row read once, contiguously)
  const int B = KV * groups;
  float* bx = sized(ws.bx, static_cast<size_t>(B) * n * c);
  float* bw = sized(ws.bw, static_cast<size_t>(B) * n);
  // (in chunks of rows, so that rotate=pca transforms many rows per call)
  constexpr int64_t kChunk = 256;
#pragma omp parallel for schedule(static)
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t rows = std::min<int64_t>(kChunk, n - i0);
    std::vector<float> hv(static_cast<size_t>(rows) * d);
    for (int h = 0; h < KV; ++h) {
      for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* src = x + plan.train[i0 + r] * KV * d + static_cast<int64_t>(h) * d;
        for (int t = 0; t < d; ++t) hv[r * d + t] = half_to_float(src[t]);
      }
      // rotate=pca: the codebooks learn R (x - mean)
      if (side.rotate)
        rotate_forward(cb.rotation.data() + static_cast<int64_t>(h) * d * d, cb.mean.data() + static_cast<int64_t>(h) * d,
                       d, hv.data(), rows, d);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const float* hr = hv.data() + r * d;
        // gain-shape: the codebooks learn directions (each token's head vector / its L2 norm; a zero vector stays 0)
        float scale = 1.0f;
        if (side.gain) {
          double sq = 0;
          for (int t = 0; t < d; ++t) sq += static_cast<double>(hr[t]) * hr[t];
          scale = sq > 0 ? static_cast<float>(1.0 / std::sqrt(sq)) : 0.0f;
        }
        for (int g = 0; g < groups; ++g) {
          const int64_t cbi = static_cast<int64_t>(h) * groups + g;
          const float* src = hr + static_cast<int64_t>(g) * c;
          float* dst = bx + (cbi * n + i) * c;
          for (int t = 0; t < c; ++t) dst[t] = src[t] * scale;
          if (task) metric_forward(cb.metric.data() + cbi * c * c, 1, c, dst, 1, c);  // x' = L^T x
          bw[cbi * n + i] = tw[h * n + i];
        }
      }
    }
  }
  KMeansParams kp;
  kp.k = k;
  kp.iters = r.kmeans.iters;
  kp.tol = r.kmeans.tol;
  // k-means++ on a sample: enough points per centroid to seed well, not all of them (init is sequential in k)
  kp.init_sample = std::min<int64_t>(n, std::max<int64_t>(16384, 8LL * k));
  kp.seed = r.kmeans.seed + static_cast<uint64_t>(layer) * 1000 + (side.keys ? 0 : 500);
  KMeansBatch batch;
  batch.n_codebooks = B;
  batch.n_points = n;
  batch.dim = c;
  batch.x = bx;
  batch.weights = bw;
  const std::string what = fmt::format("{}: layer {} {} (c={}, 2^b={})", dump.path(), layer, side.name, c, k);
  validate_kmeans_batch(batch, k, what);
  times.prepare += since(t0);
  t0 = Clock::now();
  auto trainer = o.make_trainer ? o.make_trainer(kp) : make_kmeans_cpu(kp);
  KMeansResult res = trainer->train(batch);
  cb.centroids = std::move(res.centroids);
  if (task)  // centroids back to the coded basis: c = L^-T c' (the objective stays the metric's)
    for (int64_t cbi = 0; cbi < B; ++cbi)
      metric_inverse(cb.metric.data() + cbi * c * c, 1, c, cb.centroids.data() + cbi * k * c, k, c);
  cb.objective = res.objective;
  cb.iterations.assign(res.iterations.begin(), res.iterations.end());
  cb.reseeded = res.reseeded;
  times.kmeans += since(t0);
  t0 = Clock::now();

  // held-out error (all held-out rows, anchors included: they are what a cache would see); the rows are
  // gathered and quantized in one parallel pass per head
  cb.error_norm.assign(static_cast<size_t>(KV), 0.0f);
  const int64_t nh = static_cast<int64_t>(plan.holdout.size());
  const int64_t row = static_cast<int64_t>(KV) * d;
  float* hx = sized(ws.hx, static_cast<size_t>(nh) * row);
  float* hr = sized(ws.hr, static_cast<size_t>(nh) * row);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nh; ++i) {
    const uint16_t* src = x + plan.holdout[i] * row;
    for (int64_t t = 0; t < row; ++t) hx[i * row + t] = half_to_float(src[t]);
  }
  // rotate=pca: quantize R (x - mean) (and compare in the original basis below)
  if (side.rotate)
    for (int h = 0; h < KV; ++h)
      rotate_forward(cb.rotation.data() + static_cast<int64_t>(h) * d * d, cb.mean.data() + static_cast<int64_t>(h) * d, d,
                     hx + static_cast<int64_t>(h) * d, nh, row);
  // gain-shape: quantize the unit directions, then compare fp16 norm * renormalized direction (what the cache
  // reconstructs) with the input
  std::vector<float> norms, norms16;  // [nh, KV]: exact, fp16-rounded
  if (side.gain) {
    norms.resize(static_cast<size_t>(nh) * KV), norms16.resize(norms.size());
    for (size_t i = 0; i < norms.size(); ++i) {
      double sq = 0;
      for (int t = 0; t < d; ++t) sq += static_cast<double>(hx[i * d + t]) * hx[i * d + t];
      norms[i] = static_cast<float>(std::sqrt(sq));
    }
    gain_normalize(hx, nh * KV, d, d, norms16.data());
  }
  for (int h = 0; h < KV; ++h) {
    VqHeadCodebooks hc{cb.centroids.data() + static_cast<int64_t>(h) * groups * k * c, groups, k, c};
    if (task)  // the nearest centroid in the metric, as the cache assigns
      vq_quantize_metric(hc, cb.metric.data() + static_cast<size_t>(h) * groups * c * c, hx + static_cast<int64_t>(h) * d,
                         nh, row, hr + static_cast<int64_t>(h) * d);
    else
      vq_quantize(hc, hx + static_cast<int64_t>(h) * d, nh, row, hr + static_cast<int64_t>(h) * d);
  }
  if (side.gain) {
    gain_restore(hr, nh * KV, d, d, norms16.data());
    for (size_t i = 0; i < norms.size(); ++i)
      for (int t = 0; t < d; ++t) hx[i * d + t] *= norms[i];
  }
  if (side.rotate) {  // reconstructions back to the original basis; the inputs gathered again as they were
    for (int h = 0; h < KV; ++h)
      rotate_inverse(cb.rotation.data() + static_cast<int64_t>(h) * d * d, cb.mean.data() + static_cast<int64_t>(h) * d, d,
                     hr + static_cast<int64_t>(h) * d, nh, row);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nh; ++i) {
      const uint16_t* src = x + plan.holdout[i] * row;
      for (int64_t t = 0; t < row; ++t) hx[i * row + t] = half_to_float(src[t]);
    }
  }
  double err = 0, norm = 0, werr = 0, wnorm = 0;
  std::vector<double> en(static_cast<size_t>(KV), 0.0);
  for (int64_t i = 0; i < nh; ++i)
    for (int h = 0; h < KV; ++h) {
      const float* xj = hx + (i * KV + h) * d;
      const float* xr = hr + (i * KV + h) * d;
      double e = 0, sq = 0;
      for (int t = 0; t < d; ++t) e += (xj[t] - xr[t]) * double(xj[t] - xr[t]), sq += xj[t] * double(xj[t]);
      const double wj = w[plan.holdout[i] * KV + h];  // the sensitivity weights, whatever the training weighting
      err += e, norm += sq, werr += wj * e, wnorm += wj * sq;
      en[h] += std::sqrt(e);
      rep.mse += e / d;
    }
  for (int h = 0; h < KV; ++h) cb.error_norm[h] = nh ? static_cast<float>(en[h] / nh) : 0.0f;
  rep.tokens = static_cast<int64_t>(plan.holdout.size());
  const double cnt = static_cast<double>(plan.holdout.size()) * KV;
  rep.mse = cnt > 0 ? rep.mse / cnt : 0;
  rep.relative = norm > 0 ? err / norm : 0;
  rep.weighted_relative = wnorm > 0 ? werr / wnorm : 0;
  times.heldout += since(t0);
}

}  // namespace

std::vector<double> task_metric(const CalibDumpReader& dump, int layer, bool keys) {
  const int KV = static_cast<int>(dump.meta().num_kv_heads), d = static_cast<int>(dump.meta().head_dim);
  const std::vector<float> m = keys ? dump.read_query_moment(layer) : dump.read_oproj_gram(layer);
  std::vector<double> out(m.begin(), m.end());
  if (keys && dump.meta().key_rope == "pre") {
    // Pre-RoPE keys: the query that reads key j sees it rotated by R(theta (i - j)) in each RoPE pair (i, i + d/2)
    // (half-split layout, runtime/rope.h), so the score metric depends on the positions. A rotation-invariant
    // stand-in: the diagonal with both channels of a pair at the mean of their second moments,
    // (E[q_i^2] + E[q_{i+d/2}^2]) / 2 (the pair's total, which every rotation keeps, spread evenly).
    const int half = d / 2;
    for (int h = 0; h < KV; ++h) {
      double* M = out.data() + static_cast<size_t>(h) * d * d;
      std::vector<double> diag(static_cast<size_t>(d));
      for (int i = 0; i < half; ++i) diag[i] = diag[i + half] = (M[i * d + i] + M[(i + half) * d + i + half]) / 2;
      std::fill(M, M + static_cast<size_t>(d) * d, 0.0);
      for (int i = 0; i < d; ++i) M[i * d + i] = diag[i];
    }
  }
  return out;
}

TrainCodebooksResult train_codebooks(const TrainCodebooksOptions& o) {
  ANTKV_CHECK(o.recipe, "train_codebooks: no recipe");
  const Recipe& r = *o.recipe;
  CalibDumpReader dump(o.calib_path);
  const CalibMeta& m = dump.meta();
  ANTKV_CHECK(o.expected_config_hash.empty() || m.config_hash == o.expected_config_hash,
              "{}: the calibration dump was made with another model (config hash {} in the dump, {} for {})",
              o.calib_path, m.config_hash, o.expected_config_hash, r.model);
  ANTKV_CHECK(m.key_rope == option_name(dump_key_rope(r.key_rope)),
              "{}: the dump holds {}-RoPE keys but the recipe asks key_rope: {} (recalibrate or change the recipe)",
              o.calib_path, m.key_rope, option_name(r.key_rope));
  for (auto [key, q] : {std::pair<const char*, VqConfig>{"quant.keys", r.quant.keys}, {"quant.values", r.quant.values}})
    ANTKV_CHECK(m.head_dim % q.c == 0, "{}: {}.c = {} does not divide head_dim {}", r.source.empty() ? "recipe" : r.source,
                key, q.c, m.head_dim);

  TrainCodebooksResult out;
  CodebookMeta& cm = out.codebooks.meta;
  cm.config_hash = m.config_hash;
  cm.calib_hash = hash_file(o.calib_path);
  cm.recipe = r.to_yaml();
  cm.key_rope = option_name(r.key_rope);
  cm.weighting = option_name(r.kmeans.weighting);
  cm.exclude_anchors = r.kmeans.exclude_anchors;
  cm.gain = option_name(r.kmeans.gain);
  cm.rotate = option_name(r.kmeans.rotate);
  cm.metric = option_name(r.kmeans.metric);
  const bool task = r.kmeans.metric == Metric::kTask;
  // metric=task: every layer's metrics read here, before the prefetch thread (the only HDF5 user while it runs)
  // starts; read_* say clearly what an older dump lacks
  std::vector<std::vector<double>> key_metrics, value_metrics;
  if (task)
    for (int l = 0; l < static_cast<int>(m.num_layers); ++l)
      key_metrics.push_back(task_metric(dump, l, true)), value_metrics.push_back(task_metric(dump, l, false));
  // key_rope=commute: keys (and their metric) in RoPE pair order, so that each group of c channels is c/2 whole pairs
  // and its centroids commute with RoPE (quant/vq.h rope_pair_order); the k-means itself is unchanged
  std::vector<int> key_order;
  if (r.key_rope == KeyRope::kCommute) {
    ANTKV_CHECK(r.quant.keys.c % 2 == 0, "{}: key_rope: commute needs an even key group size, quant.keys.c is {}",
                r.source.empty() ? "recipe" : r.source, r.quant.keys.c);
    ANTKV_CHECK(r.kmeans.rotate == Rotate::kOff,
                "{}: key_rope: commute with kmeans.rotate: pca would mix the RoPE pairs (use key_rope: pre with rotate)",
                r.source.empty() ? "recipe" : r.source);
    key_order = rope_pair_order(static_cast<int>(m.head_dim), r.quant.keys.c);
    const size_t d = m.head_dim;
    for (auto& M : key_metrics)
      for (size_t h = 0; h < static_cast<size_t>(m.num_kv_heads); ++h) {
        const std::vector<double> orig(M.begin() + h * d * d, M.begin() + (h + 1) * d * d);
        for (size_t i = 0; i < d; ++i)
          for (size_t j = 0; j < d; ++j) M[h * d * d + i * d + j] = orig[key_order[i] * d + key_order[j]];
      }
  }
  cm.trainer = o.trainer_name;
  cm.version = o.version;
  cm.fingerprint = o.fingerprint;
  cm.key_c = r.quant.keys.c;
  cm.key_b = r.quant.keys.b;
  cm.value_c = r.quant.values.c;
  cm.value_b = r.quant.values.b;
  cm.num_layers = static_cast<int>(m.num_layers);
  cm.num_kv_heads = static_cast<int>(m.num_kv_heads);
  cm.head_dim = static_cast<int>(m.head_dim);
  out.codebooks.keys.resize(cm.num_layers);
  out.codebooks.values.resize(cm.num_layers);
  out.layers.resize(cm.num_layers);
  out.calibration_tokens = dump.n_tokens();

  const auto windows = dump.windows();
  const auto positions = dump.positions();
  Progress progress("train-codebook", cm.num_layers, "layers", o.progress);
  const auto t0 = Clock::now();
  // layer l + 1 is read (and checked) on a second thread while layer l trains
  std::future<LayerData> next;
  if (cm.num_layers > 0) next = std::async(std::launch::async, load_layer, std::cref(dump), 0, std::cref(key_order));
  SideTimes times;
  Workspace ws;
  for (int l = 0; l < cm.num_layers; ++l) {
    check_interrupted();
    const auto tw = Clock::now();
    const LayerData data = next.get();
    out.wait_read_seconds += since(tw);
    out.read_seconds += data.read_s;
    if (l + 1 < cm.num_layers) next = std::async(std::launch::async, load_layer, std::cref(dump), l + 1, std::cref(key_order));
    const auto tl = Clock::now();
    const RowPlan plan = plan_rows(dump, r, data, windows, positions);
    times.prepare += since(tl);
    train_side(dump, r, o, data, plan,
               {"keys", r.quant.keys.c, r.quant.keys.b, true, r.kmeans.gain != Gain::kOff, r.kmeans.rotate != Rotate::kOff,
                task ? &key_metrics[l] : nullptr},
               out.codebooks.keys[l], out.layers[l].keys, times, ws);
    train_side(dump, r, o, data, plan,
               {"values", r.quant.values.c, r.quant.values.b, false, r.kmeans.gain == Gain::kKeysValues, r.kmeans.rotate != Rotate::kOff,
                task ? &value_metrics[l] : nullptr},
               out.codebooks.values[l], out.layers[l].values, times, ws);
    out.layers[l].seconds = since(tl);
    progress.advance(1, fmt::format("layer {}: K rel err {:.4f}, V rel err {:.4f}", l, out.layers[l].keys.relative,
                                    out.layers[l].values.relative));
  }
  progress.finish();
  out.prepare_seconds = times.prepare;
  out.kmeans_seconds = times.kmeans;
  out.heldout_seconds = times.heldout;
  out.seconds = since(t0);
  return out;
}

std::string train_report_json(const TrainCodebooksResult& r) {
  using json = nlohmann::json;
  const CodebookMeta& m = r.codebooks.meta;
  json j;
  j["config"] = {{"key_c", m.key_c}, {"key_b", m.key_b}, {"value_c", m.value_c}, {"value_b", m.value_b},
                 {"key_bits", double(m.key_b) / m.key_c}, {"value_bits", double(m.value_b) / m.value_c},
                 {"weighting", m.weighting}, {"exclude_anchors", m.exclude_anchors}, {"gain", m.gain}, {"rotate", m.rotate}, {"metric", m.metric}, {"key_rope", m.key_rope},
                 {"trainer", m.trainer}};
  j["seconds"] = r.seconds;
  j["seconds_split"] = {{"read", r.read_seconds}, {"waiting_for_reads", r.wait_read_seconds},
                        {"prepare", r.prepare_seconds}, {"kmeans", r.kmeans_seconds}, {"heldout_error", r.heldout_seconds}};
  j["calibration_tokens"] = r.calibration_tokens;
  json layers = json::array();
  for (size_t l = 0; l < r.layers.size(); ++l) {
    json L;
    L["layer"] = l;
    L["seconds"] = r.layers[l].seconds;
    for (int kind = 0; kind < 2; ++kind) {
      const auto& rep = kind == 0 ? r.layers[l].keys : r.layers[l].values;
      const auto& cb = kind == 0 ? r.codebooks.keys[l] : r.codebooks.values[l];
      json s;
      s["heldout_tokens"] = rep.tokens;
      s["heldout_mse"] = rep.mse;
      s["heldout_relative_error"] = rep.relative;
      s["heldout_weighted_relative_error"] = rep.weighted_relative;
      s["error_norm_per_head"] = cb.error_norm;
      s["objective_per_codebook"] = cb.objective;
      s["iterations_per_codebook"] = cb.iterations;
      s["reseeded_per_codebook"] = cb.reseeded;
      L[kind == 0 ? "keys" : "values"] = s;
    }
    layers.push_back(L);
  }
  j["layers"] = layers;
  return j.dump(1);
}

}  // namespace antkv
