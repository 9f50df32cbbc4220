#include "quant/quantized_cache.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <numeric>

#include "anchor/anchor_scores.h"
#include "core/error.h"
#include "quant/anchor_rule.h"
#include "quant/codebook_fit.h"
#include "quant/method_support.h"
#include "quant/vq.h"
#include "runtime/rope.h"

namespace antkv {

void uniform_quantize(float* x, int64_t n, int64_t stride, int bits) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) lo = std::min(lo, x[i * stride]), hi = std::max(hi, x[i * stride]);
  // scale and zero point are stored in fp16
  const float zero = static_cast<float>(Eigen::half(lo));
  const float levels = static_cast<float>((1 << bits) - 1);
  float scale = static_cast<float>(Eigen::half((hi - zero) / levels));
  if (!(scale > 0)) {
    for (int64_t i = 0; i < n; ++i) x[i * stride] = zero;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::min(levels, std::max(0.0f, std::nearbyint((x[i * stride] - zero) / scale)));
    x[i * stride] = q * scale + zero;
  }
}

namespace {
float round_fp16(float x) { return static_cast<float>(Eigen::half(x)); }
}  // namespace

QuantizedKvCache::QuantizedKvCache(const ModelConfig& cfg, const MethodSpec& m, std::shared_ptr<const CodebookSet> cb)
    : cfg_(cfg), method_(m), cb_(std::move(cb)), decode_window_(m.decode_window), row_(static_cast<size_t>(cfg.kv_dim())) {
  const ModelShapeFacts shape = ModelShapeFacts::of(cfg);
  require_support(m, MethodPath::kCpu, &shape);  // what the CPU cache runs: quant/method_support.h
  if (m.needs_codebooks()) {
    ANTKV_CHECK(cb_, "method {}: needs codebooks", m.text);
    check_codebooks_fit(m, *cb_, cfg);
  }
  inv_freq_ = rope_inv_freq(cfg);
  const size_t L = static_cast<size_t>(cfg.num_layers);
  k_.resize(L), v_.resize(L), k_exact_.resize(L), v_exact_.resize(L), k_pre_exact_.resize(L), anchor_.resize(L), key_err_.resize(L);
  running_.resize(L);
  metric_cents_.resize(2 * L);
  anchor_count_.assign(L, std::vector<int>(static_cast<size_t>(cfg.num_kv_heads), 0));
  quantized_upto_.assign(L * 2, 0);  // [layer][0 = keys, 1 = values]
}

void QuantizedKvCache::reset() {
  for (size_t l = 0; l < k_.size(); ++l) {
    k_[l].clear(), v_[l].clear(), k_exact_[l].clear(), v_exact_[l].clear(), k_pre_exact_[l].clear(), anchor_[l].clear(), key_err_[l].clear();
    running_[l].clear();
    std::fill(anchor_count_[l].begin(), anchor_count_[l].end(), 0);
  }
  std::fill(quantized_upto_.begin(), quantized_upto_.end(), 0);
  stats_ = {};
}

void QuantizedKvCache::quantize_rows(int layer, int64_t row0, int64_t n, const float* k_pre, const float* k_post,
                                     const float* v, const uint8_t* keep, int position0) {
  const int KV = cfg_.num_kv_heads, d = cfg_.head_dim;
  float* kd = k_[layer].data() + row0 * row_;
  float* vd = v_[layer].data() + row0 * row_;
  const bool pre = method_.pre_rope();
  if (method_.kind == MethodKind::kRsq) {  // training-free: rotate, fp16 norm, Lloyd-Max levels per coordinate
    for (int h = 0; h < KV; ++h)
      for (int side = 0; side < 2; ++side) {
        float* dst = (side == 0 ? kd : vd) + static_cast<int64_t>(h) * d;
        const float* src = (side == 0 ? (pre ? k_pre : k_post) : v) + static_cast<int64_t>(h) * d;
        for (int64_t r = 0; r < n; ++r) std::copy_n(src + r * row_, d, dst + r * row_);
        const std::vector<float> signs = rsq_signs(d, layer, side, h);
        rsq_quantize(dst, n, static_cast<int64_t>(row_), d, method_.bits, signs.data());
      }
    if (pre) {
      std::vector<int32_t> pos(static_cast<size_t>(n));
      std::iota(pos.begin(), pos.end(), position0);
      rope_apply(kd, static_cast<int>(n), KV, d, pos.data(), inv_freq_.data());
    }
    return;
  }
  const LayerCodebooks& kc = cb_->keys[layer];
  const LayerCodebooks& vc = cb_->values[layer];
  const VqConfig kq = method_.key_config(layer), vq = method_.value_config(layer);
  const int kg = d / kq.c, vg = d / vq.c;
  const int kk = 1 << kq.b, vk = 1 << vq.b;
  // one head's n rows of one tensor: src/dst [n, row_] at the head's offset
  std::vector<float> unit, norms;
  const bool rotate = method_.rotate != Rotate::kOff;
  const bool task = method_.metric != Metric::kPlain;
  // key_rope=commute: keys are coded in RoPE pair order (quant/vq.h rope_pair_order; parse_method refuses rotate=pca)
  const std::vector<int> pair_order = method_.commute() ? rope_pair_order(d, kq.c) : std::vector<int>();
  auto quantize_head = [&](const VqHeadCodebooks& hc, const float* src, float* dst, bool gain, const float* rot,
                           const float* mean, const float* metric, const float* mapped, bool pairs) {
    // metric=task: the nearest centroid in the metric |L^T (x - c)|^2, decoded as the centroid itself
    auto code = [&](const float* x, int64_t stride, float* out) {
      if (task) vq_quantize_metric(hc, mapped, metric, x, n, stride, out);
      else vq_quantize(hc, x, n, stride, out);
    };
    if (!gain && !rotate && !pairs) return code(src, static_cast<int64_t>(row_), dst);
    unit.resize(static_cast<size_t>(n) * d), norms.resize(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) std::copy_n(src + r * row_, d, unit.data() + r * d);
    if (pairs) permute_channels(pair_order, true, unit.data(), n, d);
    if (rotate) rotate_forward(rot, mean, d, unit.data(), n, d);  // x' = R (x - mean)
    // gain-shape: fp16 (norm=fp8: E4M3) norm + quantized unit direction, renormalized (see gain_restore)
    if (gain) gain_normalize(unit.data(), n, d, d, norms.data(), method_.norm);
    code(unit.data(), d, unit.data());
    if (gain) gain_restore(unit.data(), n, d, d, norms.data());
    if (rotate) rotate_inverse(rot, mean, d, unit.data(), n, d);
    if (pairs) permute_channels(pair_order, false, unit.data(), n, d);
    for (int64_t r = 0; r < n; ++r) std::copy_n(unit.data() + r * d, d, dst + r * row_);
  };
  auto rot_of = [&](const LayerCodebooks& c, int h) {
    return rotate ? c.rotation.data() + static_cast<int64_t>(h) * d * d : nullptr;
  };
  auto mean_of = [&](const LayerCodebooks& c, int h) {
    return rotate ? c.mean.data() + static_cast<int64_t>(h) * d : nullptr;
  };
  auto metric_of = [&](const LayerCodebooks& c, int h) {  // [groups, c, c] of head h (d x c values per head)
    return task ? c.metric.data() + static_cast<int64_t>(h) * d * (&c == &kc ? kq.c : vq.c) : nullptr;
  };
  // metric=task: the searched centroids L^T c of the layer's heads, mapped on first use and kept (every decode step
  // quantizes with them)
  auto mapped_of = [&](int side, int h) -> const float* {
    if (!task) return nullptr;
    const LayerCodebooks& c = side ? vc : kc;
    const int groups = side ? vg : kg, k = side ? vk : kk, cc = side ? vq.c : kq.c;
    std::vector<float>& m = metric_cents_[static_cast<size_t>(layer) * 2 + side];
    if (m.empty()) m = metric_centroids(VqHeadCodebooks{c.centroids.data(), KV * groups, k, cc}, c.metric.data());
    return m.data() + static_cast<int64_t>(h) * groups * k * cc;
  };
  for (int h = 0; h < KV; ++h) {
    VqHeadCodebooks khc{kc.centroids.data() + static_cast<int64_t>(h) * kg * kk * kq.c, kg, kk, kq.c};
    VqHeadCodebooks vhc{vc.centroids.data() + static_cast<int64_t>(h) * vg * vk * vq.c, vg, vk, vq.c};
    quantize_head(khc, (pre ? k_pre : k_post) + static_cast<int64_t>(h) * d, kd + static_cast<int64_t>(h) * d,
                  method_.gain_keys(), rot_of(kc, h), mean_of(kc, h), metric_of(kc, h), mapped_of(0, h),
                  method_.commute());
    quantize_head(vhc, v + static_cast<int64_t>(h) * d, vd + static_cast<int64_t>(h) * d, method_.gain_values(),
                  rot_of(vc, h), mean_of(vc, h), metric_of(vc, h), mapped_of(1, h), false);
  }
  if (pre) {  // rotate the dequantized pre-RoPE keys to their positions (commute: each codeword times e^{i pos theta})
    std::vector<int32_t> pos(static_cast<size_t>(n));
    std::iota(pos.begin(), pos.end(), position0);
    rope_apply(kd, static_cast<int>(n), KV, d, pos.data(), inv_freq_.data());
  }
  for (int64_t r = 0; r < n; ++r)
    for (int h = 0; h < KV; ++h)
      if (keep && keep[r * KV + h]) {  // anchors stay exact (FP16), in the tensors anchors=kv|k|v names
        if (method_.anchor_keys()) std::copy_n(k_post + r * row_ + h * d, d, kd + r * row_ + h * d);
        if (method_.anchor_values()) std::copy_n(v + r * row_ + h * d, d, vd + r * row_ + h * d);
      }
  if (method_.correct) {
    float* e = key_err_[layer].data() + row0 * KV;
    for (int64_t r = 0; r < n; ++r)
      for (int h = 0; h < KV; ++h) {
        double s = 0;
        for (int c = 0; c < d; ++c) {
          const double diff = k_post[r * row_ + h * d + c] - kd[r * row_ + h * d + c];
          s += diff * diff;
        }
        e[r * KV + h] = round_fp16(static_cast<float>(s / d));  // 0 for anchors
      }
  }
}

void QuantizedKvCache::append(const KvAppend& a) {
  const int l = a.layer, n = a.n_tokens, KV = cfg_.num_kv_heads, d = cfg_.head_dim;
  ANTKV_CHECK(l >= 0 && l < cfg_.num_layers, "KV cache: layer {} out of range", l);
  ANTKV_CHECK(a.position0 == length(l), "KV cache: layer {} appends at position {} but holds {} tokens", l, a.position0,
              length(l));
  const int64_t row0 = length(l);
  const size_t add = static_cast<size_t>(n) * row_;
  // exact copies, rounded to fp16 (what an FP16 part of the cache holds)
  auto push = [&](std::vector<float>& dst, const float* src) {
    const size_t old = dst.size();
    dst.resize(old + add);
    for (size_t i = 0; i < add; ++i) dst[old + i] = round_fp16(src[i]);
  };
  push(k_exact_[l], a.k_post_rope);
  push(v_exact_[l], a.v);
  push(k_pre_exact_[l], a.k_pre_rope);
  k_[l].insert(k_[l].end(), k_exact_[l].end() - add, k_exact_[l].end());
  v_[l].insert(v_[l].end(), v_exact_[l].end() - add, v_exact_[l].end());
  anchor_[l].resize(anchor_[l].size() + static_cast<size_t>(n) * KV, 0);
  key_err_[l].resize(anchor_[l].size(), 0.0f);
  running_[l].resize(anchor_[l].size(), 0.0);
  const int64_t len = row0 + n;
  stats_.tokens += static_cast<int64_t>(n) * KV;

  if (method_.kind == MethodKind::kFp16) {
    stats_.fp16_tokens += static_cast<int64_t>(n) * KV;
    return;
  }

  if (method_.kind == MethodKind::kUniform) {
    const int G = method_.group;
    const int64_t quantizable = std::max<int64_t>(0, len - method_.window);
    int& k_upto = quantized_upto_[static_cast<size_t>(l) * 2];
    int& v_upto = quantized_upto_[static_cast<size_t>(l) * 2 + 1];
    // keys: complete groups of G tokens, per channel
    const int64_t k_end = quantizable / G * G;
    for (int64_t g0 = k_upto; g0 < k_end; g0 += G)
      for (size_t c = 0; c < row_; ++c) uniform_quantize(k_[l].data() + g0 * row_ + c, G, static_cast<int64_t>(row_), method_.bits);
    k_upto = static_cast<int>(std::max<int64_t>(k_upto, k_end));
    // values: each token, groups of min(G, d) channels
    const int vgs = std::min(G, d);  // groups stay inside a head; the last one is shorter when vgs does not divide d
    for (int64_t r = v_upto; r < quantizable; ++r)
      for (int h = 0; h < KV; ++h)
        for (int c0 = 0; c0 < d; c0 += vgs)
          uniform_quantize(v_[l].data() + r * row_ + static_cast<int64_t>(h) * d + c0, std::min(vgs, d - c0), 1, method_.bits);
    v_upto = static_cast<int>(std::max<int64_t>(v_upto, quantizable));
    return;
  }

  // vq / antkv / rsq
  int& upto = quantized_upto_[static_cast<size_t>(l) * 2];
  if (n > 1) {
    // a prefill chunk: anchors from the chunk's own full-precision attention, everything else quantized now
    std::vector<uint8_t> keep(static_cast<size_t>(n) * KV, 0);
    std::vector<float> chunk_score;  // the chosen anchors' running scores start here
    const double ratio = method_.ratio_of(l);
    if (method_.has_anchors() && ratio > 0) {
      ANTKV_CHECK(a.q, "antkv cache: the runtime passed no queries (anchor scores need them)");
      std::vector<float> s_k(static_cast<size_t>(n) * KV), s_v(s_k.size()), score(s_k.size());
      AnchorScoreArgs args{a.q, a.k_post_rope, a.v, n, cfg_.num_heads, KV, d};
      anchor_scores_cpu(args, s_k.data(), s_v.data());
      combine_anchor_scores(method_.score, s_k.data(), s_v.data(),
                            cb_->keys[l].error_norm.data(), cb_->values[l].error_norm.data(), n, KV,
                            static_cast<uint64_t>(l) * 7919 + static_cast<uint64_t>(row0), score.data());
      mark_chunk_anchors(score.data(), n, KV, ratio, a.position0 == 0, keep.data());
      chunk_score = std::move(score);
    }
    quantize_rows(l, row0, n, k_pre_exact_[l].data() + row0 * row_, k_exact_[l].data() + row0 * row_,
                  v_exact_[l].data() + row0 * row_, keep.data(), a.position0);
    for (size_t i = 0; i < keep.size(); ++i) {
      anchor_[l][static_cast<size_t>(row0) * KV + i] = keep[i];
      stats_.anchors += keep[i];
      anchor_count_[l][i % KV] += keep[i];
      if (keep[i] && !chunk_score.empty()) running_[l][static_cast<size_t>(row0) * KV + i] = chunk_score[i];
    }
    upto = static_cast<int>(len);
  } else {
    // decode: what left the FP16 window is quantized or kept as an anchor, then the new row's attention
    // updates the running scores
    const int64_t end = std::max<int64_t>(upto, len - decode_window_);
    for (int64_t r = upto; r < end; ++r) {
      if (method_.promotes()) decide_leaving(l, r, len);
      quantize_rows(l, r, 1, k_pre_exact_[l].data() + r * row_, k_exact_[l].data() + r * row_,
                    v_exact_[l].data() + r * row_, anchor_[l].data() + static_cast<size_t>(r) * KV, static_cast<int>(r));
    }
    upto = static_cast<int>(end);
    if (method_.promotes()) {
      ANTKV_CHECK(a.q, "antkv cache: the runtime passed no query at decode (the running anchor scores need it)");
      add_attention_row(l, a.q);
    }
  }
}

void QuantizedKvCache::decide_leaving(int l, int64_t r, int64_t len) {
  const int KV = cfg_.num_kv_heads;
  const int budget = static_cast<int>(std::ceil(method_.ratio_of(l) * static_cast<double>(len)));
  std::vector<uint8_t>& flag = anchor_[l];
  int grown = 0;
  for (int h = 0; h < KV; ++h) grown -= anchor_count_[l][h];
  const std::vector<int64_t> displaced = decide_leaving_token(flag, running_[l], anchor_count_[l], KV, r, budget);
  for (int h = 0; h < KV; ++h) grown += anchor_count_[l][h];
  stats_.anchors += grown;
  for (int h = 0; h < KV; ++h) {
    const int64_t w = displaced[static_cast<size_t>(h)];
    if (w < 0) continue;  // displaced: quantized from its exact copy (this head's flag is already 0)
    quantize_rows(l, w, 1, k_pre_exact_[l].data() + w * row_, k_exact_[l].data() + w * row_,
                  v_exact_[l].data() + w * row_, flag.data() + static_cast<size_t>(w) * KV, static_cast<int>(w));
  }
}

void QuantizedKvCache::add_attention_row(int l, const float* q) {
  const int KV = cfg_.num_kv_heads, H = cfg_.num_heads, G = H / KV, d = cfg_.head_dim;
  const int64_t len = length(l), upto = quantized_upto_[static_cast<size_t>(l) * 2];
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const AnchorScoreKind kind = method_.score;
  const std::vector<float>& ek = cb_->keys[l].error_norm;
  const std::vector<float>& ev = cb_->values[l].error_norm;
  const float* K = k_[l].data();
  const float* V = v_[l].data();
  std::vector<double> s(static_cast<size_t>(len)), o(static_cast<size_t>(d));
  for (int h = 0; h < KV; ++h) {
    const auto [ck, cv] = anchor_score_weights(kind, ek.empty() ? nullptr : ek.data(), ev.empty() ? nullptr : ev.data(), h);
    for (int g = 0; g < G; ++g) {
      const float* qg = q + static_cast<int64_t>(h * G + g) * d;
      double qn = 0, m = -INFINITY;
      for (int c = 0; c < d; ++c) qn += static_cast<double>(qg[c]) * qg[c];
      qn = std::sqrt(qn);
      for (int64_t j = 0; j < len; ++j) {
        const float* kj = K + j * row_ + static_cast<int64_t>(h) * d;
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += static_cast<double>(qg[c]) * kj[c];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < len; ++j) sum += (s[j] = std::exp(s[j] - m));
      std::fill(o.begin(), o.end(), 0.0);
      for (int64_t j = 0; j < len; ++j) {
        s[j] /= sum;
        const float* vj = V + j * row_ + static_cast<int64_t>(h) * d;
        for (int c = 0; c < d; ++c) o[c] += s[j] * vj[c];
      }
      for (int64_t j = 0; j < len; ++j) {
        const size_t y = static_cast<size_t>(j) * KV + h;
        if (j < upto && !anchor_[l][y]) continue;  // quantized: not tracked
        const float* vj = V + j * row_ + static_cast<int64_t>(h) * d;
        double dist = 0;
        for (int c = 0; c < d; ++c) dist += (vj[c] - o[c]) * (vj[c] - o[c]);
        running_[l][y] += ck * s[j] * qn * std::sqrt(dist) * scale + cv * s[j];
      }
    }
  }
}

double QuantizedKvCache::stored_bits(bool include_codebooks) const {
  const int KV = cfg_.num_kv_heads, d = cfg_.head_dim;
  const double row = static_cast<double>(row_);
  double bits = 0;
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const int64_t len = length(l);
    if (method_.kind == MethodKind::kFp16) {
      bits += 2 * 16.0 * len * row;
      continue;
    }
    if (method_.kind == MethodKind::kUniform) {
      const int64_t k_upto = quantized_upto_[static_cast<size_t>(l) * 2];
      const int64_t v_upto = quantized_upto_[static_cast<size_t>(l) * 2 + 1];
      // keys: k_upto / group groups per channel, each with an fp16 scale and zero point
      bits += k_upto * row * method_.bits + static_cast<double>(k_upto / method_.group) * row * 32.0 +
              (len - k_upto) * row * 16.0;
      const int vgs = std::min(method_.group, d);
      const int groups_per_head = (d + vgs - 1) / vgs;
      bits += v_upto * (row * method_.bits + static_cast<double>(KV) * groups_per_head * 32.0) +
              (len - v_upto) * row * 16.0;
      continue;
    }
    // vq / antkv / rsq: rows [0, upto) are codes or anchors, the rest waits in the FP16 decode window
    const int64_t upto = quantized_upto_[static_cast<size_t>(l) * 2];
    if (method_.kind == MethodKind::kRsq) {  // per token, head and tensor: d x bits of codes and an fp16 norm
      bits += 2.0 * upto * KV * (static_cast<double>(d) * method_.bits + 16.0) + (len - upto) * 2 * 16.0 * row;
      continue;
    }
    int64_t anchors = 0;
    for (int64_t i = 0; i < upto * KV; ++i) anchors += anchor_[l][static_cast<size_t>(i)];
    // per tensor: anchors=k|v keeps only that tensor of an anchor token in FP16, the other is coded
    const int64_t key_anchors = method_.anchor_keys() ? anchors : 0, value_anchors = method_.anchor_values() ? anchors : 0;
    const int64_t key_coded = upto * KV - key_anchors, value_coded = upto * KV - value_anchors;  // token-heads as codes
    const VqConfig kq = method_.key_config(l), vq = method_.value_config(l);
    const double key_code = static_cast<double>(d) / kq.c * kq.b;
    const double value_code = static_cast<double>(d) / vq.c * vq.b;
    // coded keys carry an fp16 error (correct=on) and a norm (gain=k|kv; fp16, or 8 bits with norm=fp8); coded
    // values a norm (gain=kv)
    bits += key_coded * (key_code + (method_.correct ? 16.0 : 0.0) + (method_.gain_keys() ? method_.norm_bits() : 0.0));
    bits += value_coded * (value_code + (method_.gain_values() ? method_.norm_bits() : 0.0));
    bits += (key_anchors + value_anchors) * (16.0 * d + 32.0);  // fp16, each with a 32-bit token index
    bits += (len - upto) * 2 * 16.0 * row;
    if (include_codebooks)  // 2^b centroids of c fp16 channels per group of c channels, per head
      bits += KV * 16.0 * d * ((1 << kq.b) + (1 << vq.b));
    if (include_codebooks && method_.rotate != Rotate::kOff)  // rotate=pca: fp16 d x d basis and d-mean per head and tensor
      bits += 2.0 * KV * 16.0 * (static_cast<double>(d) * d + d);
    if (include_codebooks && method_.metric != Metric::kPlain)  // metric=task: fp16 c x c factor per head and group
      bits += KV * 16.0 * d * (kq.c + vq.c);
  }
  return bits;
}

double QuantizedKvCache::effective_bits(bool include_codebooks) const {
  double elements = 0;
  for (int l = 0; l < cfg_.num_layers; ++l) elements += 2.0 * length(l) * static_cast<double>(row_);
  return elements > 0 ? stored_bits(include_codebooks) / elements : 0.0;
}

size_t QuantizedKvCache::stored_bytes() const { return static_cast<size_t>(std::ceil(stored_bits(true) / 8)); }

}  // namespace antkv
