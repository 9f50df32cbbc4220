#include "calibrate/calibrate.h"

#include <algorithm>
#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
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
#include "model/checkpoint.h"
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

int64_t calibration_min_tokens(const Recipe& r) {
  return int64_t{1} << std::max(r.quant.keys.b, r.quant.values.b);
}

CalibrationPlan plan_calibration(std::vector<int32_t> ids, int64_t tokens, int seq_len, int stride,
                                 const std::string& text_name, int64_t min_text_tokens) {
  const int64_t text_tokens = static_cast<int64_t>(ids.size()) - 1;  // after BOS
  ANTKV_CHECK(text_tokens >= std::max<int64_t>(1, min_text_tokens),
              "{}: too short for calibration: {} tokens of text, fewer than the {} the codebooks need (one per "
              "centroid at least)", text_name, std::max<int64_t>(0, text_tokens), std::max<int64_t>(1, min_text_tokens));
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

inline float half_bits_to_float(uint16_t h) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(h));
}

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

void query_moment(const float* q, int T, int n_heads, int n_kv_heads, int d, int64_t stride, std::vector<float>& out) {
  const int G = n_heads / n_kv_heads;
  out.assign(static_cast<size_t>(n_kv_heads) * d * d, 0.0f);
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (int kv = 0; kv < n_kv_heads; ++kv) {
    Eigen::Map<RowMat> m(out.data() + static_cast<size_t>(kv) * d * d, d, d);
    for (int g = 0; g < G; ++g) {  // rows t of query head kv*G + g: [T, d] with row stride `stride`
      Eigen::Map<const RowMat, 0, Eigen::OuterStride<>> x(q + static_cast<int64_t>(kv * G + g) * d, T, d,
                                                           Eigen::OuterStride<>(stride));
      m.noalias() += x.transpose() * x;
    }
  }
}

namespace {

// One window: its tokens (BOS first), its index, and the rows (positions) stored.
struct WindowJob {
  int64_t index = 0;
  std::vector<int32_t> tokens, rows;
  int slot = 0;
};

// The host half of calibration, shared by both paths: per window its token rows, per layer the anchor
// score combination, the summary statistics and the stored rows' K/V (fp16) and scores.
class HostHalf {
 public:
  HostHalf(const ModelConfig& cfg, const Recipe& r, CalibDumpWriter& w, std::vector<LayerStats>& stats)
      : cfg_(cfg), r_(r), writer_(w), stats_(stats), kind_(r.anchor.score) {}

  double write_seconds = 0;

  void begin_window(const WindowJob& w) {
    const size_t n = w.rows.size();
    std::vector<int32_t> tok_ids(n), positions(n), win(n, static_cast<int32_t>(w.index));
    for (size_t i = 0; i < n; ++i) {
      tok_ids[i] = w.tokens[static_cast<size_t>(w.rows[i])];
      positions[i] = w.rows[i];
    }
    const auto t0 = Clock::now();
    writer_.append_tokens(static_cast<int>(n), tok_ids.data(), positions.data(), win.data());
    write_seconds += since(t0);
  }

  void layer(const WindowJob& w, int layer, const CalibLayerHost& h) {
    check_interrupted();
    const int T = static_cast<int>(w.tokens.size()), KV = cfg_.num_kv_heads, d = cfg_.head_dim;
    const size_t ns = static_cast<size_t>(T) * KV;
    // NaN/Inf in what would be stored stop calibration (both paths come through here). Scores first (the
    // anchor selection below must not sort NaN), naming the K/V when they are the cause; K/V with finite
    // scores are checked in the statistics pass that already reads every value.
    if (first_non_finite(h.s_k, ns) >= 0 || first_non_finite(h.s_v, ns) >= 0) {
      check_finite_kv(w.index, layer, h, T, KV * d);
      check_finite_f32(w.index, layer, "S_K", h.s_k, T, KV);
      check_finite_f32(w.index, layer, "S_V", h.s_v, T, KV);
    }
    ans_.resize(ns);
    combine_anchor_scores(kind_, h.s_k, h.s_v, nullptr, nullptr, T, KV,
                          static_cast<uint64_t>(r_.calibration.seed) * 1000003u + w.index * 131u + layer, ans_.data());

    // summary statistics over the whole window
    LayerStats& st = stats_[layer];
    const int top = std::max(1, static_cast<int>(std::ceil(0.01 * T)));
    std::vector<float> col(static_cast<size_t>(T));
    for (int hd = 0; hd < KV; ++hd) {
      for (int t = 0; t < T; ++t) col[t] = h.s_v[static_cast<size_t>(t) * KV + hd];
      const double tot = std::accumulate(col.begin(), col.end(), 0.0);
      // weighted by the window's length, so a short last window does not count as much as a full one
      st.sink_att += T * (tot > 0 ? col[0] / tot : 0);
      st.share_att += T * top_share(col, top);
      for (int t = 0; t < T; ++t) col[t] = ans_[static_cast<size_t>(t) * KV + hd];
      st.share_anchor += T * top_share(col, top);
      st.n_heads_windows += T;
      for (int32_t t : select_anchors(ans_.data(), T, KV, hd, r_.anchor.ratio)) {
        st.anchor_pos[t] += 1;
        st.anchor_tok[w.tokens[static_cast<size_t>(t)]] += 1;
      }
    }
    const int64_t row = static_cast<int64_t>(KV) * d;
    if (st.k_abs.empty()) st.k_abs.assign(static_cast<size_t>(row), 0.0), st.v_abs.assign(static_cast<size_t>(row), 0.0);
    // mean |x| per channel: blocks of 64 channels in parallel, rows in order within a block. A sum of |x| is
    // non-finite exactly when some x is (fp16 magnitudes cannot overflow a double sum): the finiteness check
    // of the K/V costs no extra pass over them.
    int any_non_finite = 0;
#pragma omp parallel for schedule(static) reduction(| : any_non_finite)
    for (int64_t c0 = 0; c0 < row; c0 += 64) {
      const int64_t c1 = std::min<int64_t>(row, c0 + 64);
      double ka[64] = {0}, va[64] = {0};
      for (int t = 0; t < T; ++t) {
        const uint16_t* kr = h.keys + static_cast<int64_t>(t) * row;
        const uint16_t* vr = h.values + static_cast<int64_t>(t) * row;
        for (int64_t c = c0; c < c1; ++c) {
          ka[c - c0] += std::fabs(half_bits_to_float(kr[c]));
          va[c - c0] += std::fabs(half_bits_to_float(vr[c]));
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        any_non_finite |= !std::isfinite(ka[c - c0]) || !std::isfinite(va[c - c0]);
        st.k_abs[c] += ka[c - c0], st.v_abs[c] += va[c - c0];
      }
    }
    if (any_non_finite) check_finite_kv(w.index, layer, h, T, KV * d);
    st.n_tokens += T;

    // the stored rows (all, or a sample)
    const int n = static_cast<int>(w.rows.size());
    const bool all = n == T;
    const uint16_t* keys = h.keys;
    const uint16_t* values = h.values;
    const float *s_k = h.s_k, *s_v = h.s_v, *an = ans_.data();
    if (!all) {
      kbuf_.resize(static_cast<size_t>(n) * row);
      vbuf_.resize(kbuf_.size());
      sk_buf_.resize(static_cast<size_t>(n) * KV);
      sv_buf_.resize(sk_buf_.size());
      an_buf_.resize(sk_buf_.size());
      for (int i = 0; i < n; ++i) {
        const size_t t = static_cast<size_t>(w.rows[i]);
        std::copy_n(h.keys + t * row, row, kbuf_.data() + i * row);
        std::copy_n(h.values + t * row, row, vbuf_.data() + i * row);
        std::copy_n(h.s_k + t * KV, KV, sk_buf_.data() + static_cast<size_t>(i) * KV);
        std::copy_n(h.s_v + t * KV, KV, sv_buf_.data() + static_cast<size_t>(i) * KV);
        std::copy_n(ans_.data() + t * KV, KV, an_buf_.data() + static_cast<size_t>(i) * KV);
      }
      keys = kbuf_.data(), values = vbuf_.data(), s_k = sk_buf_.data(), s_v = sv_buf_.data(), an = an_buf_.data();
    }
    const auto t0 = Clock::now();
    writer_.append_layer_f16(layer, n, keys, values, s_k, s_v, an);
    write_seconds += since(t0);

    // metric=task: the query second moment, summed over every window (all T tokens run, sampled rows or not)
    if (qm_.empty()) qm_.resize(static_cast<size_t>(cfg_.num_layers)), qm_tokens_.assign(qm_.size(), 0), qm_missing_.assign(qm_.size(), 0);
    auto& acc = qm_[static_cast<size_t>(layer)];
    if (!h.q_moment) {
      qm_missing_[static_cast<size_t>(layer)] = 1;
    } else {
      if (acc.empty()) acc.assign(static_cast<size_t>(KV) * d * d, 0.0);
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += h.q_moment[i];
      qm_tokens_[static_cast<size_t>(layer)] += T;
    }
  }

  // Hands the query moments (mean over the tokens run) to the writer when every window of every layer had them.
  void finish_query_moment() {
    for (size_t l = 0; l < qm_.size(); ++l)
      if (qm_missing_[l] || qm_[l].empty() || qm_tokens_[l] == 0) return;
    for (size_t l = 0; l < qm_.size(); ++l) {
      std::vector<float> m(qm_[l].size());
      for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(qm_[l][i] / static_cast<double>(qm_tokens_[l]));
      writer_.set_query_moment(static_cast<int>(l), m);
    }
  }

 private:
  static void check_finite_kv(int64_t window, int layer, const CalibLayerHost& h, int T, int width) {
    check_finite_f16(window, layer, "keys", h.keys, T, width);
    check_finite_f16(window, layer, "values", h.values, T, width);
  }
  // NaN/Inf (fp16: exponent all ones; an fp32 value past fp16's range became Inf) name the window, layer,
  // tensor and token.
  static void check_finite_f16(int64_t window, int layer, const char* name, const uint16_t* x, int T, int width) {
    // on the host half's critical path at 7-8B shapes (4M values per layer and window): in parallel
    const int64_t n = static_cast<int64_t>(T) * width;
    int64_t first = n;
#pragma omp parallel for schedule(static) reduction(min : first)
    for (int64_t i = 0; i < n; ++i)
      if ((x[i] & 0x7C00u) == 0x7C00u && i < first) first = i;
    if (first < n)
      throw NonFinite(fmt::format("calibration window {}: layer {} {} are not finite (token {}, value {})", window,
                                  layer, name, first / width, half_bits_to_float(x[first])));
  }
  static void check_finite_f32(int64_t window, int layer, const char* name, const float* x, int T, int width) {
    const int64_t i = first_non_finite(x, static_cast<size_t>(T) * width);
    if (i >= 0)
      throw NonFinite(fmt::format("calibration window {}: layer {} {} are not finite (token {}, value {})", window,
                                  layer, name, i / width, x[i]));
  }

  const ModelConfig& cfg_;
  const Recipe& r_;
  CalibDumpWriter& writer_;
  std::vector<LayerStats>& stats_;
  AnchorScoreKind kind_;
  std::vector<float> ans_, sk_buf_, sv_buf_, an_buf_;
  std::vector<uint16_t> kbuf_, vbuf_;
  std::vector<std::vector<double>> qm_;  // [layer] -> [KV, d, d] sum of the windows' q_moment
  std::vector<int64_t> qm_tokens_;
  std::vector<uint8_t> qm_missing_;
};

// Host path: the runtime hands fp32 host copies of every layer; anchor scores by anchor_fn.
class HostObserver : public ForwardObserver {
 public:
  HostObserver(const ModelConfig& cfg, const Recipe& r, const AnchorScoreFn& fn, HostHalf& half)
      : cfg_(cfg), pre_(r.key_rope != KeyRope::kPost), fn_(fn), half_(half) {}
  void set_window(const WindowJob* w) { w_ = w; }

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
    fn_(args, s_k_.data(), s_v_.data());
    const size_t n = static_cast<size_t>(T) * KV * d;
    kh_.resize(n);
    vh_.resize(n);
    const float* keys = pre_ ? a.k_pre_rope : a.k_post_rope;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
      kh_[i] = Eigen::numext::bit_cast<uint16_t>(Eigen::half(keys[i]));
      vh_[i] = Eigen::numext::bit_cast<uint16_t>(Eigen::half(a.v[i]));
    }
    query_moment(a.q, T, cfg_.num_heads, KV, d, static_cast<int64_t>(cfg_.num_heads) * d, qm_);
    half_.layer(*w_, a.layer, CalibLayerHost{kh_.data(), vh_.data(), s_k_.data(), s_v_.data(), qm_.data()});
  }

 private:
  const ModelConfig& cfg_;
  bool pre_;
  const AnchorScoreFn& fn_;
  HostHalf& half_;
  const WindowJob* w_ = nullptr;
  std::vector<float> s_k_, s_v_, qm_;
  std::vector<uint16_t> kh_, vh_;
};

// Device path: every layer's work is enqueued on the runtime's stream into the window's slot.
class DeviceObserver : public ForwardObserver {
 public:
  DeviceObserver(CalibDeviceStage& stage, bool pre) : stage_(stage), pre_(pre) {}
  void set_slot(int slot) { slot_ = slot; }
  void on_layer(const LayerActivations&) override {
    fail("calibration: the device stage needs a GPU runtime (this runtime handed host activations)");
  }
  bool wants_device() const override { return true; }
  void on_layer_device(const DeviceLayerActivations& a) override {
    ANTKV_CHECK(a.position0 == 0, "calibration runs whole windows from position 0");
    stage_.enqueue(a, pre_, slot_);
  }

 private:
  CalibDeviceStage& stage_;
  bool pre_;
  int slot_ = 0;
};

// The worker thread of the device path: runs the host half of each finished window, in order.
class HostWorker {
 public:
  HostWorker(HostHalf& half, CalibDeviceStage& stage, int num_layers)
      : half_(half), stage_(stage), layers_(num_layers), thread_([this] { loop(); }) {}
  ~HostWorker() { stop(); }

  // Blocks until at most `pending` windows are queued or in work; rethrows the worker's error.
  void wait_until_at_most(size_t pending) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return err_ || queue_.size() + busy_ <= pending; });
    if (err_) std::rethrow_exception(err_);
  }
  void push(WindowJob job) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(job));
    }
    cv_.notify_all();
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  double busy_seconds() const { return busy_s_; }

 private:
  void loop() {
    for (;;) {
      WindowJob job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty() || err_) return;  // stop_ with nothing left (or after an error)
        job = std::move(queue_.front());
        queue_.pop_front();
        busy_ = 1;
      }
      const auto t0 = Clock::now();
      try {
        half_.begin_window(job);
        for (int l = 0; l < layers_; ++l) half_.layer(job, l, stage_.host(l, job.slot));
      } catch (const std::bad_alloc&) {
        std::lock_guard<std::mutex> lk(mu_);
        err_ = std::make_exception_ptr(Error(fmt::format(
            "calibration: out of host memory storing window {} ({} tokens)", job.index, job.tokens.size())));
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        err_ = std::current_exception();
      }
      busy_s_ += since(t0);
      {
        std::lock_guard<std::mutex> lk(mu_);
        busy_ = 0;
      }
      cv_.notify_all();
    }
  }

  HostHalf& half_;
  CalibDeviceStage& stage_;
  int layers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WindowJob> queue_;
  size_t busy_ = 0;
  bool stop_ = false;
  std::exception_ptr err_;
  double busy_s_ = 0;
  std::thread thread_;  // last: started after the members it uses
};

std::vector<std::pair<int32_t, int64_t>> most_frequent(const std::map<int32_t, int64_t>& m, size_t k) {
  std::vector<std::pair<int32_t, int64_t>> v(m.begin(), m.end());
  std::stable_sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second > b.second; });
  if (v.size() > k) v.resize(k);
  return v;
}

}  // namespace

std::vector<float> oproj_gram(const Checkpoint& ckpt, int layer) {
  const ModelConfig& cfg = ckpt.config();
  const int H = cfg.num_heads, KV = cfg.num_kv_heads, d = cfg.head_dim, G = H / KV;
  const int64_t hidden = cfg.hidden_size;
  // o_proj.weight [hidden, H * d] (out x in): head g's columns g*d .. g*d + d - 1
  const std::vector<float> w = ckpt.tensor(Checkpoint::layer_name(layer, "self_attn.o_proj.weight"),
                                           {hidden, static_cast<int64_t>(H) * d}).to_float();
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMat> W(w.data(), hidden, static_cast<int64_t>(H) * d);
  std::vector<float> out(static_cast<size_t>(KV) * d * d, 0.0f);
  for (int kv = 0; kv < KV; ++kv) {
    Eigen::Map<RowMat> m(out.data() + static_cast<size_t>(kv) * d * d, d, d);
    for (int g = 0; g < G; ++g) {
      const auto Wg = W.middleCols(static_cast<int64_t>(kv * G + g) * d, d);
      m.noalias() += Wg.transpose() * Wg;
    }
  }
  return out;
}

CalibrationResult run_calibration(Runtime& rt, const Tokenizer& tok, const CalibrationPlan& plan,
                                  const CalibrationOptions& o) {
  ANTKV_CHECK(o.recipe, "run_calibration: no recipe");
  const Recipe& r = *o.recipe;
  const ModelConfig& cfg = rt.config();
  check_window_length(cfg, plan.seq_len, "calibration.seq_len");
  AnchorScoreFn fn = o.anchor_fn ? o.anchor_fn : AnchorScoreFn(anchor_scores_cpu);
  CalibDumpWriter writer(o.out_path, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim);
  std::vector<LayerStats> stats(static_cast<size_t>(cfg.num_layers));
  HostHalf half(cfg, r, writer, stats);

  CalibrationResult res;
  std::mt19937_64 rng(r.calibration.seed);
  Progress progress("calibrate", plan.windows, "windows", o.progress);
  const auto t0 = Clock::now();
  auto make_job = [&](int64_t c) {
    WindowJob job;
    job.index = c;
    job.tokens = plan.window(c, tok.bos_id());
    const int T = static_cast<int>(job.tokens.size());
    job.rows.resize(static_cast<size_t>(T));
    std::iota(job.rows.begin(), job.rows.end(), 0);
    if (r.calibration.sample_per_window > 0 && r.calibration.sample_per_window < T) {
      std::shuffle(job.rows.begin(), job.rows.end(), rng);
      job.rows.resize(static_cast<size_t>(r.calibration.sample_per_window));
      std::sort(job.rows.begin(), job.rows.end());
    }
    return job;
  };
  auto run_forward = [&](const WindowJob& job, ForwardObserver* obs) {
    rt.reset();
    ForwardRequest req;
    req.tokens = job.tokens.data();
    req.n_tokens = static_cast<int>(job.tokens.size());
    req.logits = LogitsMode::kNone;
    req.observer = obs;
    ForwardResult fr;
    const auto tf = Clock::now();
    rt.forward(req, fr);
    res.forward_seconds += since(tf);
    res.windows += 1;
    res.tokens_run += req.n_tokens;
    res.tokens_stored += static_cast<int64_t>(job.rows.size());
    progress.advance(1, fmt::format("{:.0f} tokens/s", res.tokens_run / std::max(since(t0), 1e-9)));
  };

  if (o.device_stage) {
    // GPU: window c runs on the device into slot c % 2 while the worker stores window c - 1
    res.device_path = true;
    std::unique_ptr<CalibDeviceStage> stage;
    try {
      stage = o.device_stage(cfg, plan.seq_len);
    } catch (const std::bad_alloc&) {
      fail("calibration: out of host memory for the device stage's buffers ({} layers, windows of {})", cfg.num_layers,
           plan.seq_len);
    }
    DeviceObserver obs(*stage, r.key_rope != KeyRope::kPost);
    HostWorker worker(half, *stage, cfg.num_layers);
    for (int64_t c = 0; c < plan.windows; ++c) {
      check_interrupted();
      WindowJob job = make_job(c);
      job.slot = static_cast<int>(c % CalibDeviceStage::kSlots);
      const auto ts = Clock::now();
      worker.wait_until_at_most(CalibDeviceStage::kSlots - 1);  // the slot's previous window is stored
      res.stall_seconds += since(ts);
      obs.set_slot(job.slot);
      try {
        run_forward(job, &obs);
      } catch (const std::bad_alloc&) {
        fail("calibration: out of host memory in the forward pass of window {} ({} tokens)", c, job.tokens.size());
      }
      worker.push(std::move(job));
    }
    const auto ts = Clock::now();
    worker.wait_until_at_most(0);
    res.stall_seconds += since(ts);
    worker.stop();
    res.host_seconds = worker.busy_seconds();
  } else {
    HostObserver obs(cfg, r, fn, half);
    for (int64_t c = 0; c < plan.windows; ++c) {
      check_interrupted();
      const WindowJob job = make_job(c);
      half.begin_window(job);
      obs.set_window(&job);
      run_forward(job, &obs);
    }
  }
  progress.finish();
  res.write_seconds = half.write_seconds;
  res.bytes_stored = writer.bytes_appended();

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
  m.key_rope = option_name(dump_key_rope(r.key_rope));  // commute keys are pre-RoPE keys in the dump
  m.anchor_score = option_name(r.anchor.score);
  m.text = o.text_path;
  m.text_hash = o.text_path.empty() ? "" : hash_file(o.text_path);
  m.version = o.version;
  m.fingerprint = o.fingerprint;
  m.tokens = res.tokens_stored;
  m.seq_len = plan.seq_len;
  m.windows = res.windows;
  m.seed = static_cast<int64_t>(r.calibration.seed);
  m.num_layers = cfg.num_layers;
  m.num_kv_heads = cfg.num_kv_heads;
  m.head_dim = cfg.head_dim;
  m.sample_per_window = r.calibration.sample_per_window;
  half.finish_query_moment();
  if (!o.model_dir.empty()) {  // metric=task values: the o_proj Gram of each KV head, from the checkpoint
    const Checkpoint ckpt = Checkpoint::open(o.model_dir);
    ANTKV_CHECK(ckpt.config().config_hash == cfg.config_hash, "calibration: {} is not the model the runtime runs",
                o.model_dir);
    for (int l = 0; l < cfg.num_layers; ++l)
      writer.set_oproj_gram(l, oproj_gram(ckpt, l));
  }
  const auto tf = Clock::now();
  writer.finish(m);
  res.finish_seconds = since(tf);
  res.seconds = since(t0);
  res.tokens_per_second = res.tokens_run / std::max(res.seconds, 1e-9);
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
  j["path"] = r.device_path ? "device" : "host";
  j["seconds_split"] = {{"forward", r.forward_seconds}, {"host_half", r.host_seconds}, {"hdf5_writes", r.write_seconds},
                        {"stalled_on_host_half", r.stall_seconds}, {"close", r.finish_seconds}};
  j["bytes_stored"] = r.bytes_stored;
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
