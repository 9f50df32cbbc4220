#include "calibrate/calibrate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "core/error.h"
#include "core/finite.h"
#include "core/hash.h"
#include "core/interrupt.h"
#include "core/progress.h"
#include "core/system_info.h"
#include "io/calib_dump.h"
#include "tokenizer/tokenizer.h"

namespace antkv {

std::vector<int32_t> CalibrationPlan::window(int64_t c, int32_t bos) const {
  const int64_t b = 1 + c * stride;
  const int64_t e = std::min<int64_t>(b + seq_len - 1, 1 + text_tokens_used);
  // no BOS (Qwen2's tokenizer has none): the text token before the window's span takes its place
  std::vector<int32_t> w{bos >= 0 ? bos : ids[static_cast<size_t>(b - 1)]};
  w.insert(w.end(), ids.begin() + b, ids.begin() + e);
  return w;
}

CalibrationPlan plan_calibration(std::vector<int32_t> ids, int64_t tokens, int seq_len, int stride) {
  ANTKV_CHECK(ids.size() >= 2, "calibration text: too short ({} tokens)", ids.size());
  CalibrationPlan p;
  p.seq_len = seq_len;
  p.stride = stride > 0 ? stride : seq_len - 1;
  p.text_tokens_used = std::min<int64_t>(tokens, static_cast<int64_t>(ids.size()) - 1);
  const int64_t span = seq_len - 1;
  // windows until the text tokens to use are covered; the last may be shorter
  p.windows = p.text_tokens_used <= span ? 1 : 1 + (p.text_tokens_used - span + p.stride - 1) / p.stride;
  // a last window of a few tokens adds nothing to the codebooks but skews the per-window statistics
  const int64_t last = p.text_tokens_used - (p.windows - 1) * p.stride;
  if (p.windows > 1 && last < (span + 1) / 2) {
    p.windows -= 1;
    const int64_t used = (p.windows - 1) * p.stride + span;
    p.dropped_tokens = p.text_tokens_used - used;
    p.text_tokens_used = used;
  }
  p.ids = std::move(ids);
  return p;
}

std::string calibration_plan_line(const CalibrationPlan& p) {
  std::string s = fmt::format("calibration: {} text tokens in {} windows of {}", p.text_tokens_used, p.windows,
                              p.seq_len);
  if (p.dropped_tokens > 0)
    s += fmt::format(" (the last {} tokens, less than half a window, are left out)", p.dropped_tokens);
  return s;
}

namespace {

// Per-layer running statistics for the summary.
struct LayerStats {
  double share_att = 0, share_anchor = 0, sink_att = 0;
  int64_t n_heads_windows = 0;  // sum of window lengths over heads and windows
  std::map<int32_t, int64_t> anchor_pos, anchor_tok;
  std::vector<double> k_abs, v_abs;
  int64_t n_tokens = 0;
};

double top_share(std::vector<float> x, int top) {
  const double total = std::accumulate(x.begin(), x.end(), 0.0);
  if (total <= 0) return 0;
  std::partial_sort(x.begin(), x.begin() + top, x.end(), std::greater<float>());
  return std::accumulate(x.begin(), x.begin() + top, 0.0) / total;
}

class CalibObserver : public ForwardObserver {
 public:
  CalibObserver(const ModelConfig& cfg, const Recipe& r, CalibDumpWriter& w, const AnchorScoreFn& fn,
                std::vector<LayerStats>& stats)
      : cfg_(cfg), r_(r), writer_(w), fn_(fn), stats_(stats), kind_(parse_anchor_score_kind(r.anchor.score)) {}

  void begin_window(const std::vector<int32_t>& window, int64_t index, const std::vector<int32_t>& rows) {
    window_ = &window;
    index_ = index;
    rows_ = &rows;
  }

  void on_layer(const LayerActivations& a) override {
    check_interrupted();
    const int T = a.n_tokens, KV = cfg_.num_kv_heads, d = cfg_.head_dim;
    ANTKV_CHECK(a.position0 == 0, "calibration runs whole windows from position 0");
    AnchorScoreArgs args;
    args.q = a.q;
    args.k = a.k_post_rope;
    args.v = a.v;
    args.n_tokens = T;
    args.n_heads = cfg_.num_heads;
    args.n_kv_heads = KV;
    args.head_dim = d;
    s_k_.resize(static_cast<size_t>(T) * KV);
    s_v_.resize(s_k_.size());
    ans_.resize(s_k_.size());
    fn_(args, s_k_.data(), s_v_.data());
    combine_anchor_scores(kind_, s_k_.data(), s_v_.data(), nullptr, nullptr, T, KV,
                          static_cast<uint64_t>(r_.calibration.seed) * 1000003u + index_ * 131u + a.layer, ans_.data());
    check_finite(a.layer, "keys", r_.key_rope == "pre" ? a.k_pre_rope : a.k_post_rope, T, KV * d);
    check_finite(a.layer, "values", a.v, T, KV * d);
    check_finite(a.layer, "S_K", s_k_.data(), T, KV);
    check_finite(a.layer, "S_V", s_v_.data(), T, KV);

    // summary statistics over the whole window
    LayerStats& st = stats_[a.layer];
    const int top = std::max(1, static_cast<int>(std::ceil(0.01 * T)));
    std::vector<float> col(static_cast<size_t>(T));
    for (int h = 0; h < KV; ++h) {
      for (int t = 0; t < T; ++t) col[t] = s_v_[static_cast<size_t>(t) * KV + h];
      const double tot = std::accumulate(col.begin(), col.end(), 0.0);
      // weighted by the window's length, so a short last window does not count as much as a full one
      st.sink_att += T * (tot > 0 ? col[0] / tot : 0);
      st.share_att += T * top_share(col, top);
      for (int t = 0; t < T; ++t) col[t] = ans_[static_cast<size_t>(t) * KV + h];
      st.share_anchor += T * top_share(col, top);
      st.n_heads_windows += T;
      for (int32_t t : select_anchors(ans_.data(), T, KV, h, r_.anchor.ratio)) {
        st.anchor_pos[t] += 1;
        st.anchor_tok[(*window_)[t]] += 1;
      }
    }
    const float* keys = r_.key_rope == "pre" ? a.k_pre_rope : a.k_post_rope;
    const size_t row = static_cast<size_t>(KV) * d;
    if (st.k_abs.empty()) st.k_abs.assign(row, 0.0), st.v_abs.assign(row, 0.0);
    for (int t = 0; t < T; ++t)
      for (size_t c = 0; c < row; ++c) {
        st.k_abs[c] += std::fabs(keys[t * row + c]);
        st.v_abs[c] += std::fabs(a.v[t * row + c]);
      }
    st.n_tokens += T;

    // the stored rows (all, or a sample)
    const auto& rows = *rows_;
    const int n = static_cast<int>(rows.size());
    kbuf_.resize(n * row);
    vbuf_.resize(n * row);
    sk_buf_.resize(static_cast<size_t>(n) * KV);
    sv_buf_.resize(sk_buf_.size());
    an_buf_.resize(sk_buf_.size());
    for (int i = 0; i < n; ++i) {
      const size_t t = static_cast<size_t>(rows[i]);
      std::copy_n(keys + t * row, row, kbuf_.data() + i * row);
      std::copy_n(a.v + t * row, row, vbuf_.data() + i * row);
      std::copy_n(s_k_.data() + t * KV, KV, sk_buf_.data() + static_cast<size_t>(i) * KV);
      std::copy_n(s_v_.data() + t * KV, KV, sv_buf_.data() + static_cast<size_t>(i) * KV);
      std::copy_n(ans_.data() + t * KV, KV, an_buf_.data() + static_cast<size_t>(i) * KV);
    }
    writer_.append_layer(a.layer, n, kbuf_.data(), vbuf_.data(), sk_buf_.data(), sv_buf_.data(), an_buf_.data());
  }

 private:
  // NaN/Inf in what would be stored stop calibration, naming the layer, tensor, window and token.
  void check_finite(int layer, const char* name, const float* x, int T, int width) const {
    const int64_t i = first_non_finite(x, static_cast<size_t>(T) * width);
    if (i >= 0)
      throw NonFinite(fmt::format("calibration window {}: layer {} {} are not finite (token {}, value {})", index_,
                                  layer, name, i / width, x[i]));
  }

  const ModelConfig& cfg_;
  const Recipe& r_;
  CalibDumpWriter& writer_;
  const AnchorScoreFn& fn_;
  std::vector<LayerStats>& stats_;
  AnchorScoreKind kind_;
  const std::vector<int32_t>* window_ = nullptr;
  const std::vector<int32_t>* rows_ = nullptr;
  int64_t index_ = 0;
  std::vector<float> s_k_, s_v_, ans_, kbuf_, vbuf_, sk_buf_, sv_buf_, an_buf_;
};

std::vector<std::pair<int32_t, int64_t>> most_frequent(const std::map<int32_t, int64_t>& m, size_t k) {
  std::vector<std::pair<int32_t, int64_t>> v(m.begin(), m.end());
  std::stable_sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second > b.second; });
  if (v.size() > k) v.resize(k);
  return v;
}

}  // namespace

CalibrationResult run_calibration(Runtime& rt, const Tokenizer& tok, const CalibrationPlan& plan,
                                  const CalibrationOptions& o) {
  ANTKV_CHECK(o.recipe, "run_calibration: no recipe");
  const Recipe& r = *o.recipe;
  const ModelConfig& cfg = rt.config();
  AnchorScoreFn fn = o.anchor_fn ? o.anchor_fn : AnchorScoreFn(anchor_scores_cpu);
  CalibDumpWriter writer(o.out_path, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim);
  std::vector<LayerStats> stats(static_cast<size_t>(cfg.num_layers));
  CalibObserver obs(cfg, r, writer, fn, stats);

  CalibrationResult res;
  std::mt19937_64 rng(r.calibration.seed);
  Progress progress("calibrate", plan.windows, "windows", o.progress);
  const auto t0 = std::chrono::steady_clock::now();
  ForwardResult fr;
  for (int64_t c = 0; c < plan.windows; ++c) {
    check_interrupted();
    const auto w = plan.window(c, tok.bos_id());
    const int T = static_cast<int>(w.size());
    std::vector<int32_t> rows(static_cast<size_t>(T));
    std::iota(rows.begin(), rows.end(), 0);
    if (r.calibration.sample_per_window > 0 && r.calibration.sample_per_window < T) {
      std::shuffle(rows.begin(), rows.end(), rng);
      rows.resize(static_cast<size_t>(r.calibration.sample_per_window));
      std::sort(rows.begin(), rows.end());
    }
    std::vector<int32_t> tok_ids(rows.size()), positions(rows.size()), win(rows.size(), static_cast<int32_t>(c));
    for (size_t i = 0; i < rows.size(); ++i) {
      tok_ids[i] = w[static_cast<size_t>(rows[i])];
      positions[i] = rows[i];
    }
    writer.append_tokens(static_cast<int>(rows.size()), tok_ids.data(), positions.data(), win.data());
    obs.begin_window(w, c, rows);
    rt.reset();
    ForwardRequest req;
    req.tokens = w.data();
    req.n_tokens = T;
    req.logits = LogitsMode::kNone;
    req.observer = &obs;
    rt.forward(req, fr);
    res.windows += 1;
    res.tokens_run += T;
    res.tokens_stored += static_cast<int64_t>(rows.size());
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    progress.advance(1, fmt::format("{:.0f} tokens/s", res.tokens_run / std::max(el, 1e-9)));
  }
  progress.finish();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.tokens_per_second = res.tokens_run / std::max(res.seconds, 1e-9);

  for (auto& st : stats) {
    LayerSummary s;
    const double n = std::max<int64_t>(1, st.n_heads_windows);
    s.top1_share_attention = st.share_att / n;
    s.top1_share_anchor = st.share_anchor / n;
    s.sink_share_attention = st.sink_att / n;
    s.top_anchor_positions = most_frequent(st.anchor_pos, 8);
    s.top_anchor_tokens = most_frequent(st.anchor_tok, 8);
    for (double x : st.k_abs) s.key_channel_mean_abs.push_back(static_cast<float>(x / std::max<int64_t>(1, st.n_tokens)));
    for (double x : st.v_abs) s.value_channel_mean_abs.push_back(static_cast<float>(x / std::max<int64_t>(1, st.n_tokens)));
    res.layers.push_back(std::move(s));
  }

  CalibMeta m;
  m.model = o.model_dir;
  m.config_hash = cfg.config_hash;
  m.recipe = r.to_yaml();
  m.key_rope = r.key_rope;
  m.anchor_score = r.anchor.score;
  m.text = o.text_path;
  m.text_hash = o.text_path.empty() ? "" : hash_file(o.text_path);
  m.version = o.version;
  m.created = utc_timestamp();
  m.fingerprint = o.fingerprint;
  m.tokens = res.tokens_stored;
  m.seq_len = plan.seq_len;
  m.windows = res.windows;
  m.seed = static_cast<int64_t>(r.calibration.seed);
  m.num_layers = cfg.num_layers;
  m.num_kv_heads = cfg.num_kv_heads;
  m.head_dim = cfg.head_dim;
  writer.finish(m);
  return res;
}

std::string calibration_summary_json(const CalibrationResult& r, const Tokenizer& tok) {
  using json = nlohmann::json;
  json j;
  j["windows"] = r.windows;
  j["tokens_run"] = r.tokens_run;
  j["tokens_stored"] = r.tokens_stored;
  j["seconds"] = r.seconds;
  j["tokens_per_second"] = r.tokens_per_second;
  json layers = json::array();
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const auto& s = r.layers[l];
    json L;
    L["layer"] = l;
    L["top1pct_share_of_attention_mass"] = s.top1_share_attention;
    L["top1pct_share_of_anchor_score"] = s.top1_share_anchor;
    L["sink_share_of_attention_mass"] = s.sink_share_attention;
    json pos = json::array(), toks = json::array();
    for (auto& [p, n] : s.top_anchor_positions) pos.push_back({{"position", p}, {"count", n}});
    for (auto& [t, n] : s.top_anchor_tokens) toks.push_back({{"id", t}, {"text", tok.decode({t})}, {"count", n}});
    L["top_anchor_positions"] = pos;
    L["top_anchor_tokens"] = toks;
    // outlier channels: mean |x| over 3x the median channel's
    for (auto [name, v] : {std::pair<const char*, const std::vector<float>*>{"key", &s.key_channel_mean_abs},
                           {"value", &s.value_channel_mean_abs}}) {
      std::vector<float> sorted(*v);
      std::sort(sorted.begin(), sorted.end());
      const float med = sorted.empty() ? 0 : sorted[sorted.size() / 2];
      json out = json::array();
      std::vector<size_t> idx(v->size());
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return (*v)[a] > (*v)[b]; });
      for (size_t i = 0; i < std::min<size_t>(idx.size(), 8); ++i)
        if ((*v)[idx[i]] > 3 * med) out.push_back({{"channel", idx[i]}, {"mean_abs", (*v)[idx[i]]}, {"over_median", (*v)[idx[i]] / med}});
      L[std::string(name) + "_channel_median_abs"] = med;
      L[std::string(name) + "_outlier_channels"] = out;
    }
    layers.push_back(L);
  }
  j["layers"] = layers;
  return j.dump(1);
}

}  // namespace antkv
