// antkv-calibrate on the GPU (GpuRuntime + the GPU anchor-score pass) against the CPU path on the same
// windows of antkv-ref-18m: same tokens, K/V within bf16 rounding, anchor scores close, same anchors mostly.
#include "test_support.h"
#include "gpu_test_support.h"

#ifdef ANTKV_HAVE_CUDA
#include <algorithm>
#include <cmath>
#include <set>

#include <fmt/format.h>

#include "calibrate/calibrate.h"
#include "core/atomic_file.h"
#include "io/calib_dump.h"
#include "kernels/calibrate/calib_stage.h"
#include "kernels/anchor/anchor_score_fn.h"
#include "anchor/anchor_scores.h"
#include "kernels/runtime/gpu_runtime.h"
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"

using namespace antkv;

TEST_CASE("calibrate: GPU dump agrees with the CPU dump (antkv-ref-18m, 2 windows)", "[gpu][calibrate][shared]") {
  SKIP_WITHOUT_GPU();
  const std::string dir = test::model_dir("antkv-ref-18m");
  Checkpoint ckpt = Checkpoint::open(dir);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const auto ids = tok.encode(read_file(test::shared_path("data/books-calib.txt")).substr(0, 40000));
  const Recipe recipe = Recipe::defaults_with({"model=" + dir});
  const std::string tmp = test::temp_dir();

  CpuRuntimeOptions co;
  co.kv_dtype = KvDType::kF32;
  CpuRuntime cpu(ckpt, co);
  auto gpu = make_gpu_runtime(ckpt);
  CalibrationOptions o;
  o.recipe = &recipe;
  o.progress = false;
  o.out_path = tmp + "/cpu.h5";
  run_calibration(cpu, tok, plan_calibration(ids, 2 * 2047, 2048, 0), o);
  o.out_path = tmp + "/gpu.h5";
  o.device_stage = gpu_calib_device_stage();  // the device path: anchor pass, fp16 and copies on the GPU
  const auto res = run_calibration(*gpu, tok, plan_calibration(ids, 2 * 2047, 2048, 0), o);
  CHECK(res.device_path);
  CHECK(res.windows == 2);

  CalibDumpReader a(tmp + "/cpu.h5"), b(tmp + "/gpu.h5");
  REQUIRE(a.n_tokens() == b.n_tokens());
  CHECK(a.tokens() == b.tokens());
  const int64_t N = a.n_tokens();
  const int KV = ckpt.config().num_kv_heads, d = ckpt.config().head_dim;
  std::vector<float> x(N * KV * d), y(x.size()), s(N * KV), t(s.size());
  for (int layer = 0; layer < ckpt.config().num_layers; ++layer) {
    // The GPU runtime runs bf16 GEMMs (8 mantissa bits) over 6 layers: K/V differ by ~1% of their scale,
    // more in the last layers as the errors compound; 3% catches a wrong layout or position, not rounding.
    a.read_keys(layer, 0, N, x.data());
    b.read_keys(layer, 0, N, y.data());
    const double ek = test::max_rel_error(y.data(), x.data(), x.size());
    a.read_values(layer, 0, N, x.data());
    b.read_values(layer, 0, N, y.data());
    const double ev = test::max_rel_error(y.data(), x.data(), x.size());
    // Scores are sums over 2048 rows of attention weights: relative error of the totals ~ the logits' error.
    double es = 0;
    for (const char* name : {"S_K", "S_V", "anchor_score"}) {  // the combined score's values, not only its top 1%
      a.read_scores(layer, name, 0, N, s.data());
      b.read_scores(layer, name, 0, N, t.data());
      es = std::max(es, test::max_rel_error(t.data(), s.data(), s.size()));
    }
    // anchors (top 1% by the combined score, per window and head): overlap of the two selections
    a.read_scores(layer, "anchor_score", 0, N, s.data());
    b.read_scores(layer, "anchor_score", 0, N, t.data());
    int same = 0, total = 0;
    for (int64_t w0 = 0; w0 < N; w0 += 2048) {
      const int T = static_cast<int>(std::min<int64_t>(2048, N - w0));
      for (int h = 0; h < KV; ++h) {
        const auto pa = select_anchors(s.data() + w0 * KV, T, KV, h, 0.01);
        const auto pb = select_anchors(t.data() + w0 * KV, T, KV, h, 0.01);
        std::set<int32_t> sa(pa.begin(), pa.end());
        for (auto p : pb) same += sa.count(p);
        total += static_cast<int>(pa.size());
      }
    }
    INFO("layer " << layer << ": keys " << ek << ", values " << ev << ", scores " << es << ", anchors shared "
                  << same << "/" << total);
    fmt::print("calibrate GPU vs CPU layer {}: keys {:.2e}, values {:.2e}, scores {:.2e}, anchors shared {}/{}\n", layer,
               ek, ev, es, same, total);
    // measured over the layers (H100, 2026-12-07): keys 1.8e-3..4.4e-3, values 1.2e-3..7.2e-3, scores 8.5e-4..5.6e-3
    // (bf16 runtime against fp32), anchors shared 0.988..1; bounds ~3x, anchors 0.95
    CHECK_MEASURED("test_calibrate_gpu: GPU vs CPU dump keys rel err", ek, 0.015);
    CHECK_MEASURED("test_calibrate_gpu: GPU vs CPU dump values rel err", ev, 0.02);
    CHECK_MEASURED("test_calibrate_gpu: GPU vs CPU dump scores rel err", es, 0.02);
    test::report_measured("test_calibrate_gpu: GPU vs CPU dump anchors shared (share, at least)",
                          total ? double(same) / total : 1.0, 0.95);
    CHECK(same >= 0.95 * total);  // near-ties between the 1% cut and the next token may swap
    // metric=task: the query second moment (GPU: query_moment_kernel, fp32 sums) against the CPU's, relative to the
    // largest entry; the queries themselves carry the bf16 runtime's error: measured 2.5e-5..2.2e-4 (H100), bound 1e-3
    REQUIRE(a.has_query_moment());
    REQUIRE(b.has_query_moment());
    const std::vector<float> qa = a.read_query_moment(layer), qb = b.read_query_moment(layer);
    double qerr = 0, qmax = 0;
    for (size_t i = 0; i < qa.size(); ++i)
      qerr = std::max(qerr, double(std::abs(qa[i] - qb[i]))), qmax = std::max(qmax, double(std::abs(qa[i])));
    fmt::print("calibrate GPU vs CPU layer {}: query moment max error {:.2e} of {:.2e}\n", layer, qerr, qmax);
    test::report_measured("test_calibrate_gpu: GPU vs CPU dump query moment max err / max |entry|", qerr / qmax, 1e-3);
    CHECK(qerr < 1e-3 * qmax);
  }
}
#endif

#ifdef ANTKV_HAVE_CUDA
TEST_CASE("anchor scores: GPU pass equals the CPU reference on real K/V of antkv-ref-18m (T=333, GQA 2)",
          "[gpu][anchor][shared]") {
  SKIP_WITHOUT_GPU();
  const std::string dir = test::model_dir("antkv-ref-18m");
  Checkpoint ckpt = Checkpoint::open(dir);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  auto ids = tok.encode(read_file(test::shared_path("data/wikitext-2-raw-test.txt")).substr(0, 4000));
  ids.resize(333);  // not a multiple of any tile
  const ModelConfig& cfg = ckpt.config();
  struct Capture : ForwardObserver {
    std::vector<std::vector<float>> q, k, v;
    void on_layer(const LayerActivations& a) override {
      const size_t T = a.n_tokens;
      q.emplace_back(a.q, a.q + T * 4 * 128);
      k.emplace_back(a.k_post_rope, a.k_post_rope + T * 2 * 128);
      v.emplace_back(a.v, a.v + T * 2 * 128);
    }
  } cap;
  REQUIRE(cfg.num_heads == 4);
  REQUIRE(cfg.num_kv_heads == 2);
  CpuRuntimeOptions co;
  co.kv_dtype = KvDType::kF32;
  CpuRuntime cpu(ckpt, co);
  ForwardRequest req;
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size());
  req.observer = &cap;
  ForwardResult fr;
  cpu.forward(req, fr);
  const AnchorScoreFn gpu = gpu_anchor_score_fn();
  const int T = req.n_tokens;
  std::vector<float> rk(T * 2), rv(rk.size()), gk(rk.size()), gv(rk.size());
  for (int l = 0; l < cfg.num_layers; ++l) {
    AnchorScoreArgs a{cap.q[l].data(), cap.k[l].data(), cap.v[l].data(), T, 4, 2, 128};
    anchor_scores_reference(a, rk.data(), rv.data());
    gpu(a, gk.data(), gv.data());
    // fp32 on the GPU against a double reference, summed in another order. Measured on the H200
    // (2026-11-29): at most 9.5e-8 (S_K) and 8.6e-8 (S_V) over the 6 layers; bound 1e-6, ~10x that. A tiling,
    // masking or GQA mistake moves some score by O(1) relative.
    const double ek = test::max_rel_error(gk.data(), rk.data(), rk.size());
    const double ev = test::max_rel_error(gv.data(), rv.data(), rv.size());
    fmt::print("anchor scores GPU vs reference on antkv-ref-18m layer {}: S_K {:.2e}, S_V {:.2e}\n", l, ek, ev);
    INFO("layer " << l);
    CHECK_MEASURED("test_calibrate_gpu: anchor pass on 18m K/V S_K rel err", ek, 1e-6);
    CHECK_MEASURED("test_calibrate_gpu: anchor pass on 18m K/V S_V rel err", ev, 1e-6);
  }
}
#endif
