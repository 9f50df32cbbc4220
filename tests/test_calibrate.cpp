// antkv-calibrate: the dump's layout, metadata and contents against the runtime, the reference tensors
// and the anchor-score reference; bad recipes and paths leave nothing behind.
#include <filesystem>
#include <fstream>

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
