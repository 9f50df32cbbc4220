// antkv-calibrate: the dump's layout, metadata and contents against the runtime, the reference tensors
// and the anchor-score reference; bad recipes and paths leave nothing behind.
#include <filesystem>
#include <fstream>
#include <map>

#include <Eigen/Core>

#include "anchor/anchor_scores.h"
#include "calibrate/calibrate.h"
#include "core/atomic_file.h"
#include "io/calib_dump.h"
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {
struct Capture : ForwardObserver {
  std::vector<std::vector<float>> q, k_pre, k_post, v;
  size_t qd = 0, kd = 0;
  void on_layer(const LayerActivations& a) override {
    if (q.size() <= static_cast<size_t>(a.layer)) q.resize(a.layer + 1), k_pre.resize(a.layer + 1), k_post.resize(a.layer + 1), v.resize(a.layer + 1);
    q[a.layer].assign(a.q, a.q + a.n_tokens * qd);
    k_pre[a.layer].assign(a.k_pre_rope, a.k_pre_rope + a.n_tokens * kd);
    k_post[a.layer].assign(a.k_post_rope, a.k_post_rope + a.n_tokens * kd);
    v[a.layer].assign(a.v, a.v + a.n_tokens * kd);
  }
};

std::string run_cli(const std::string& args, int* rc) {
  const std::string err = test::temp_dir() + "/stderr.txt";
  *rc = std::system((std::string(ANTKV_CALIBRATE_PATH) + " " + args + " -q > /dev/null 2> " + err).c_str());
  return read_file(err);
}
}  // namespace

TEST_CASE("calibration plan: windows cover the requested tokens", "[calibrate]") {
  std::vector<int32_t> ids(1 + 100);
  auto p = plan_calibration(ids, 50, 11, 0);  // 10 text tokens a window
  CHECK(p.windows == 5);
  CHECK(p.window(0, 7).size() == 11);
  CHECK(p.window(0, 7)[0] == 7);
  p = plan_calibration(ids, 55, 11, 0);
  CHECK(p.windows == 6);
  CHECK(p.window(5, 7).size() == 6);  // the last window holds the 5 remaining tokens
  p = plan_calibration(ids, 1000, 11, 5);  // overlapping windows, capped by the text
  CHECK(p.text_tokens_used == 100);
  CHECK(p.windows == 19);
}

TEST_CASE("calibrate: antkv-ref-18m reference prompt dump equals the runtime, the reference and the anchor reference",
          "[calibrate][shared]") {
  const std::string dir = test::model_dir("antkv-ref-18m");
  Checkpoint ckpt = Checkpoint::open(dir);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  auto ref = SafetensorsFile::open(dir + "/reference/reference.safetensors");
  const auto& pid = ref->get("prompt_ids");
  const std::vector<int32_t> prompt(static_cast<const int32_t*>(pid.data), static_cast<const int32_t*>(pid.data) + pid.numel());
  const ModelConfig& cfg = ckpt.config();
  const int T = static_cast<int>(prompt.size()), KV = cfg.num_kv_heads, d = cfg.head_dim;

  for (const char* key_rope : {"post", "pre"}) {
    const Recipe recipe = Recipe::defaults_with({"model=" + dir, std::string("key_rope=") + key_rope});
    CpuRuntimeOptions o;
    o.kv_dtype = KvDType::kF32;
    CpuRuntime rt(ckpt, o);
    const std::string out = test::temp_dir() + "/c.h5";
    CalibrationOptions co;
    co.recipe = &recipe;
    co.out_path = out;
    co.model_dir = dir;
    co.version = "test";
    co.progress = false;
    const auto res = run_calibration(rt, tok, plan_calibration(prompt, 1000, 2048, 0), co);
    CHECK(res.windows == 1);
    CHECK(res.tokens_stored == T);

    CalibDumpReader dump(out);
    CHECK(dump.meta().config_hash == cfg.config_hash);
    CHECK(dump.meta().key_rope == key_rope);
    CHECK(dump.meta().num_layers == cfg.num_layers);
    CHECK(dump.meta().recipe.find(std::string("key_rope: ") + key_rope) != std::string::npos);
    CHECK(dump.tokens() == prompt);
    CHECK(dump.positions()[T - 1] == T - 1);

    Capture cap;
    cap.qd = static_cast<size_t>(cfg.q_dim());
    cap.kd = static_cast<size_t>(cfg.kv_dim());
    rt.reset();
    ForwardRequest req;
    req.tokens = prompt.data();
    req.n_tokens = T;
    req.observer = &cap;
    ForwardResult fr;
    rt.forward(req, fr);

    std::vector<float> keys(static_cast<size_t>(T) * KV * d), values(keys.size()), s_k(static_cast<size_t>(T) * KV),
        s_v(s_k.size()), ref_k(s_k.size()), ref_v(s_k.size());
    for (int layer = 0; layer < cfg.num_layers; ++layer) {
      dump.read_keys(layer, 0, T, keys.data());
      dump.read_values(layer, 0, T, values.data());
      const auto& want_k = std::string(key_rope) == "post" ? cap.k_post[layer] : cap.k_pre[layer];
      // stored as fp16: relative rounding 2^-11 of each element
      CHECK(test::max_rel_error(keys.data(), want_k.data(), keys.size()) < 1e-3);
      CHECK(test::max_rel_error(values.data(), cap.v[layer].data(), values.size()) < 1e-3);

      dump.read_scores(layer, "S_K", 0, T, s_k.data());
      dump.read_scores(layer, "S_V", 0, T, s_v.data());
      AnchorScoreArgs a{cap.q[layer].data(), cap.k_post[layer].data(), cap.v[layer].data(), T, cfg.num_heads, KV, d};
      anchor_scores_reference(a, ref_k.data(), ref_v.data());
      CHECK(test::max_rel_error(s_k.data(), ref_k.data(), s_k.size()) < 1e-4);
      CHECK(test::max_rel_error(s_v.data(), ref_v.data(), s_v.size()) < 1e-4);

      // metric=task statistics, against a direct computation in double: the query second moment (post-RoPE
      // queries, summed over the KV head's G query heads, mean over the T tokens) and the o_proj Gram
      // sum_g W_o,g^T W_o,g from the checkpoint's weights
      REQUIRE(dump.has_query_moment());
      REQUIRE(dump.has_oproj_gram());
      const std::vector<float> qm = dump.read_query_moment(layer), gram = dump.read_oproj_gram(layer);
      const int H = cfg.num_heads, G = H / KV;
      const std::vector<float> wo = ckpt.tensor(Checkpoint::layer_name(layer, "self_attn.o_proj.weight")).to_float();
      double qm_err = 0, qm_max = 0, gram_err = 0, gram_max = 0;
      for (int h = 0; h < KV; ++h)
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j) {
            double want = 0, wg = 0;
            for (int g = 0; g < G; ++g) {
              const int qh = h * G + g;
              for (int t = 0; t < T; ++t)
                want += double(cap.q[layer][(size_t(t) * H + qh) * d + i]) * cap.q[layer][(size_t(t) * H + qh) * d + j];
              for (int o = 0; o < cfg.hidden_size; ++o)
                wg += double(wo[size_t(o) * H * d + qh * d + i]) * wo[size_t(o) * H * d + qh * d + j];
            }
            want /= T;
            const size_t at = (size_t(h) * d + i) * d + j;
            qm_err = std::max(qm_err, std::abs(qm[at] - want)), qm_max = std::max(qm_max, std::abs(want));
            gram_err = std::max(gram_err, std::abs(gram[at] - wg)), gram_max = std::max(gram_max, std::abs(wg));
          }
      INFO("layer " << layer << ": query moment max error " << qm_err << " of " << qm_max << ", o_proj Gram " << gram_err
                    << " of " << gram_max);
      CHECK(qm_err < 1e-4 * qm_max);
      CHECK(gram_err < 1e-4 * gram_max);
    }
    if (std::string(key_rope) == "post") {
      // the reference tensors: k_post_rope [kv_heads, T, d] of layers 0 and 5
      for (int layer : {0, 5}) {
        dump.read_keys(layer, 0, T, keys.data());
        const auto kref = ref->get("layer" + std::to_string(layer) + ".k_post_rope").to_float();
        std::vector<float> ours(kref.size());
        for (int h = 0; h < KV; ++h)
          for (int t = 0; t < T; ++t)
            for (int c = 0; c < d; ++c) ours[(size_t(h) * T + t) * d + c] = keys[(size_t(t) * KV + h) * d + c];
        CHECK(test::max_rel_error(ours.data(), kref.data(), kref.size()) < 1e-3);
      }
    }
  }
}

TEST_CASE("calibrate: subsampled windows store the sampled rows", "[calibrate][shared]") {
  const std::string dir = test::model_dir("antkv-ref-18m");
  Checkpoint ckpt = Checkpoint::open(dir);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const auto ids = tok.encode(read_file(test::shared_path("data/books-calib.txt")).substr(0, 20000));
  const Recipe recipe = Recipe::defaults_with({"model=" + dir, "calibration.sample_per_window=50", "calibration.seq_len=256"});
  CpuRuntime rt(ckpt);
  const std::string out = test::temp_dir() + "/s.h5";
  CalibrationOptions co;
  co.recipe = &recipe;
  co.out_path = out;
  co.progress = false;
  const auto res = run_calibration(rt, tok, plan_calibration(ids, 255 * 3, 256, 0), co);
  CHECK(res.windows == 3);
  CHECK(res.tokens_stored == 150);
  CalibDumpReader dump(out);
  const auto pos = dump.positions(), win = dump.windows(), toks = dump.tokens();
  REQUIRE(pos.size() == 150);
  for (size_t i = 0; i < pos.size(); ++i) {
    if (i % 50) CHECK(pos[i] > pos[i - 1]);  // sorted within a window
    const int64_t text_index = win[i] * 255 + pos[i];  // position 0 is the BOS of each window
    CHECK(toks[i] == (pos[i] == 0 ? tok.bos_id() : ids[static_cast<size_t>(text_index)]));
  }
}

TEST_CASE("antkv-calibrate CLI: bad recipes and paths give clear errors and leave no output", "[calibrate][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string out = dir + "/c.h5";
  const std::string shared_model = test::model_dir("antkv-ref-18m");
  auto recipe = [&](const std::string& body) {
    const std::string p = dir + "/r.yaml";
    std::ofstream(p) << body;
    return p;
  };
  int rc = 0;
  std::string err = run_cli("--recipe " + recipe("model: x\ncalibration:\n  txt: y\n") + " --out " + out, &rc);
  CHECK(rc != 0);
  CHECK_THAT(err, Contains("unknown key \"calibration.txt\""));
  err = run_cli("--recipe " + recipe("model: /no/such/model\ncalibration:\n  text: " + test::shared_path("data/books-calib.txt") + "\n") +
                    " --out " + out, &rc);
  CHECK(rc != 0);
  CHECK_THAT(err, Contains("/no/such/model"));
  err = run_cli("--recipe " + recipe("model: " + shared_model + "\ncalibration:\n  text: /no/such/text.txt\n") + " --out " + out, &rc);
  CHECK(rc != 0);
  CHECK_THAT(err, Contains("/no/such/text.txt"));
  err = run_cli("--recipe " + recipe("model: " + shared_model + "\n") + " --out /no/such/dir/c.h5", &rc);
  CHECK(rc != 0);
  CHECK_THAT(err, Contains("calibration.text"));
  // nothing was left behind: no output, no temporary file
  for (const auto& e : fs::directory_iterator(dir)) CHECK(e.path().filename() == "r.yaml");

  // a real small run, then the same output again without --force
  const std::string good = recipe("model: " + shared_model + "\ncalibration:\n  text: " +
                                  test::shared_path("data/books-calib.txt") + "\n  tokens: 300\n  seq_len: 128\n");
  err = run_cli("--recipe " + good + " --out " + out, &rc);
  INFO(err);
  CHECK(rc == 0);
  CHECK(fs::exists(out));
  CHECK(fs::exists(out + ".summary.json"));
  CHECK(CalibDumpReader(out).meta().windows == 2);  // 2 x 127 text tokens; the last 46 (< half a window) left out
  err = run_cli("--recipe " + good + " --out " + out, &rc);
  CHECK(rc != 0);
  CHECK_THAT(err, Contains("already exists") && Contains("--force"));
  err = run_cli("--recipe " + good + " --out " + out + " --force --set calibration.tokens=127", &rc);
  CHECK(rc == 0);
  CHECK(CalibDumpReader(out).meta().windows == 1);
}

TEST_CASE("calibration dump reader: not HDF5, or incomplete, is a clear error", "[calibrate]") {
  const std::string p = test::temp_dir() + "/x.h5";
  std::ofstream(p) << "not hdf5";
  CHECK_THROWS_WITH(CalibDumpReader(p), Contains("x.h5") && Contains("not an HDF5 file"));
  const std::string q = test::temp_dir() + "/partial.h5";
  { CalibDumpWriter w(q, 2, 1, 4); }  // never finished: no /meta
  CHECK_THROWS_WITH(CalibDumpReader(q), Contains("partial.h5") && Contains("/meta"));
}

namespace {
// The device path of run_calibration without a GPU: a runtime that hands its activations through
// on_layer_device (host pointers standing in for device ones) and a stage that does on the host what the
// GPU stage does (anchor scores, fp16, per-slot copies). The dump must equal the host path's bit for bit.
class DeviceStyleRuntime : public Runtime {
 public:
  explicit DeviceStyleRuntime(CpuRuntime& rt) : rt_(rt) {}
  const ModelConfig& config() const override { return rt_.config(); }
  std::string device_name() const override { return "fake-device"; }
  void reset() override { rt_.reset(); }
  int cached_tokens() const override { return rt_.cached_tokens(); }
  void forward(const ForwardRequest& req, ForwardResult& out) override {
    struct Relay : ForwardObserver {
      ForwardObserver* to = nullptr;
      int qd = 0, kd = 0;
      void on_layer(const LayerActivations& a) override {
        DeviceLayerActivations d;
        d.layer = a.layer, d.n_tokens = a.n_tokens, d.position0 = a.position0;
        d.q = a.q, d.k_pre = a.k_pre_rope, d.k_post = a.k_post_rope, d.v = a.v;
        d.q_stride = qd, d.k_pre_stride = d.k_post_stride = d.v_stride = kd;
        to->on_layer_device(d);
      }
    } relay;
    ForwardRequest r = req;
    if (req.observer && req.observer->wants_device()) {
      relay.to = req.observer;
      relay.qd = rt_.config().q_dim();
      relay.kd = rt_.config().kv_dim();
      r.observer = &relay;
    }
    rt_.forward(r, out);
  }

 private:
  CpuRuntime& rt_;
};

class HostStage : public CalibDeviceStage {
 public:
  explicit HostStage(const ModelConfig& cfg) : cfg_(cfg) {}
  void enqueue(const DeviceLayerActivations& a, bool pre_rope, int slot) override {
    REQUIRE(a.q_stride == cfg_.q_dim());
    auto& s = slots_[slot][a.layer];
    const size_t T = a.n_tokens, n = T * cfg_.kv_dim();
    s.keys.resize(n), s.values.resize(n), s.s_k.resize(T * cfg_.num_kv_heads), s.s_v.resize(T * cfg_.num_kv_heads);
    AnchorScoreArgs args{a.q, a.k_post, a.v, a.n_tokens, cfg_.num_heads, cfg_.num_kv_heads, cfg_.head_dim};
    anchor_scores_cpu(args, s.s_k.data(), s.s_v.data());
    query_moment(a.q, a.n_tokens, cfg_.num_heads, cfg_.num_kv_heads, cfg_.head_dim, a.q_stride, s.qm);
    const float* k = pre_rope ? a.k_pre : a.k_post;
    for (size_t i = 0; i < n; ++i) {
      s.keys[i] = Eigen::numext::bit_cast<uint16_t>(Eigen::half(k[i]));
      s.values[i] = Eigen::numext::bit_cast<uint16_t>(Eigen::half(a.v[i]));
    }
    ++enqueued;
  }
  CalibLayerHost host(int layer, int slot) override {
    auto& s = slots_[slot][layer];
    return {s.keys.data(), s.values.data(), s.s_k.data(), s.s_v.data(), s.qm.data()};
  }
  int enqueued = 0;

 private:
  struct Slot {
    std::vector<uint16_t> keys, values;
    std::vector<float> s_k, s_v, qm;
  };
  ModelConfig cfg_;
  std::map<int, std::map<int, Slot>> slots_;
};
}  // namespace

TEST_CASE("calibrate: the device path (worker thread, two slots) writes the same dump as the host path",
          "[calibrate][shared]") {
  const std::string dir = test::model_dir("antkv-ref-18m");
  Checkpoint ckpt = Checkpoint::open(dir);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const auto ids = tok.encode(read_file(test::shared_path("data/books-calib.txt")).substr(0, 20000));
  for (const char* sample : {"0", "40"}) {
    const Recipe recipe = Recipe::defaults_with({"model=" + dir, "calibration.seq_len=128", "key_rope=pre",
                                                 std::string("calibration.sample_per_window=") + sample});
    CpuRuntimeOptions o;
    o.kv_dtype = KvDType::kF32;
    CpuRuntime cpu(ckpt, o);
    const std::string tmp = test::temp_dir();
    CalibrationOptions co;
    co.recipe = &recipe;
    co.progress = false;
    co.out_path = tmp + "/host.h5";
    const auto plan = plan_calibration(ids, 127 * 5 - 30, 128, 0);  // 5 windows, the last one shorter
    const auto a = run_calibration(cpu, tok, plan, co);
    DeviceStyleRuntime dev(cpu);
    co.out_path = tmp + "/device.h5";
    co.device_stage = [](const ModelConfig& cfg, int) {
      return std::unique_ptr<CalibDeviceStage>(std::make_unique<HostStage>(cfg));
    };
    const auto b = run_calibration(dev, tok, plan, co);
    CHECK(b.device_path);
    CHECK(a.tokens_stored == b.tokens_stored);
    CHECK(b.windows == 5);
    CalibDumpReader x(tmp + "/host.h5"), y(tmp + "/device.h5");
    REQUIRE(x.n_tokens() == y.n_tokens());
    CHECK(x.tokens() == y.tokens());
    CHECK(x.positions() == y.positions());
    CHECK(x.windows() == y.windows());
    const int64_t N = x.n_tokens();
    const size_t kvd = ckpt.config().kv_dim(), KV = ckpt.config().num_kv_heads;
    for (int l = 0; l < ckpt.config().num_layers; ++l) {
      std::vector<uint16_t> p(N * kvd), q(N * kvd);
      x.read_keys_half(l, 0, N, p.data());
      y.read_keys_half(l, 0, N, q.data());
      CHECK(p == q);
      x.read_values_half(l, 0, N, p.data());
      y.read_values_half(l, 0, N, q.data());
      CHECK(p == q);
      std::vector<float> s(N * KV), t(N * KV);
      for (const char* name : {"S_K", "S_V", "anchor_score"}) {
        x.read_scores(l, name, 0, N, s.data());
        y.read_scores(l, name, 0, N, t.data());
        CHECK(s == t);
      }
    }
    CHECK(a.layers[1].key_channel_mean_abs == b.layers[1].key_channel_mean_abs);
    // the query moments (every token run, sampled or not) come through the device stage alike; no model_dir here,
    // so no o_proj Gram
    REQUIRE(x.has_query_moment());
    REQUIRE(y.has_query_moment());
    CHECK_FALSE(x.has_oproj_gram());
    for (int l = 0; l < ckpt.config().num_layers; ++l) CHECK(x.read_query_moment(l) == y.read_query_moment(l));
  }
}
