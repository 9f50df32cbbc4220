// Codebook and calibration-dump files at the counts of real 7-8B models, on the CPU (no GPU, seconds): the
// class of failure where per-codebook data went into one /meta attribute and HDF5's 64 KiB attribute limit
// stopped every 7B-class model from being quantized at the very end of codebook training.
#include <H5Cpp.h>

#include <chrono>
#include <filesystem>
#include <random>

#include "io/calib_dump.h"
#include "calibrate/calibrate.h"
#include "codebook/train_codebooks.h"
#include "core/atomic_file.h"
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"
#include "io/codebooks.h"
#include "recipe/recipe.h"
#include "test_support.h"

using namespace antkv;

namespace {

// /meta holds small scalars only: nothing over 1 element, nothing over 16 KiB (the recipe's YAML text is the
// largest, ~2 KB).
void check_meta_small(const std::string& path) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5::Group g = f.openGroup("meta");
  for (int i = 0; i < g.getNumAttrs(); ++i) {
    H5::Attribute a = g.openAttribute(static_cast<unsigned>(i));
    INFO(path << " /meta attribute " << a.getName());
    CHECK(a.getSpace().getSimpleExtentNpoints() == 1);
    CHECK(a.getStorageSize() <= 16384);
  }
}

}  // namespace

TEST_CASE("scale: codebook file of LLaMA-2-7B at 1 bit (32 layers x 32 heads x 16 groups) writes and reads",
          "[scale]") {
  // The LLaMA-2-7B 1-bit layout has 32 x 32 x 16 = 16,384 codebooks per side; their objectives alone are
  // 256 KiB. Centroids of 2 entries instead of 256 (b = 1) keep the file small: the counts that matter for the
  // layout are the codebooks', not the centroids'.
  CodebookSet s;
  CodebookMeta& m = s.meta;
  m.config_hash = "llama2-7b-shape";
  m.calib_hash = "x";
  m.recipe = Recipe().to_yaml();
  m.key_rope = "post";
  m.weighting = "anchor";
  m.trainer = "test";
  m.version = "test";
  m.fingerprint = "f";
  m.key_c = m.value_c = 8;
  m.key_b = m.value_b = 1;
  m.num_layers = 32;
  m.num_kv_heads = 32;
  m.head_dim = 128;
  const int groups = m.head_dim / m.key_c, k = 1 << m.key_b, ncb = m.num_kv_heads * groups;
  REQUIRE(ncb == 512);
  s.keys.resize(m.num_layers);
  s.values.resize(m.num_layers);
  for (int l = 0; l < m.num_layers; ++l)
    for (auto* cb : {&s.keys[l], &s.values[l]}) {
      cb->centroids.assign(static_cast<size_t>(ncb) * k * m.key_c, 0.25f * l);
      cb->objective.resize(ncb);
      cb->iterations.resize(ncb);
      cb->reseeded.resize(ncb);
      for (int i = 0; i < ncb; ++i) {
        cb->objective[i] = l * 1000.0 + i + (cb == &s.values[l] ? 0.5 : 0.0);
        cb->iterations[i] = i % 20;
        cb->reseeded[i] = i % 3;
      }
      cb->error_norm.assign(m.num_kv_heads, 0.125f * l);
    }
  const std::string path = test::temp_dir() + "/llama2-7b-1bit.h5";
  write_codebooks(path, s);
  check_meta_small(path);
  const CodebookSet back = read_codebooks(path);
  REQUIRE(back.meta.num_layers == 32);
  CHECK(back.meta.num_kv_heads == 32);
  CHECK(back.key_groups() == 16);
  for (int l : {0, 17, 31}) {
    CHECK(back.keys[l].objective == s.keys[l].objective);
    CHECK(back.values[l].objective == s.values[l].objective);
    CHECK(back.values[l].iterations == s.values[l].iterations);
    CHECK(back.keys[l].reseeded == s.keys[l].reseeded);
    CHECK(back.keys[l].centroids == s.keys[l].centroids);
    CHECK(back.values[l].error_norm == s.values[l].error_norm);
  }
  // 2 x 32 layers x 512 codebooks of (2 x 8 fp32 + 8 + 4 + 8 bytes): ~1.2 MB of data
  CHECK(std::filesystem::file_size(path) < 4u << 20);
}

TEST_CASE("scale: calibration dump metadata at the LLaMA-3-8B and LLaMA-2-7B shapes", "[scale]") {
  for (const auto& [name, kv] : {std::pair<const char*, int>{"llama3-8b", 8}, {"llama2-7b", 32}}) {
    const int layers = 32, d = 128, n = 16;
    const std::string path = test::temp_dir() + "/" + name + ".h5";
    CalibDumpWriter w(path, layers, kv, d);
    std::vector<int32_t> toks(n), pos(n), win(n, 0);
    for (int i = 0; i < n; ++i) toks[i] = 128000 + i, pos[i] = i * 2;
    w.append_tokens(n, toks.data(), pos.data(), win.data());
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> k(static_cast<size_t>(n) * kv * d), v(k.size()), s(static_cast<size_t>(n) * kv);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (auto& x : s) x = std::fabs(nd(rng));
    for (int l = 0; l < layers; ++l) w.append_layer(l, n, k.data(), v.data(), s.data(), s.data(), s.data());
    CalibMeta m;
    m.model = std::string(200, 'm');  // a long path
    m.config_hash = name;
    m.recipe = Recipe::defaults_with({"calibration.sample_per_window=8"}).to_yaml();
    m.key_rope = "post";
    m.anchor_score = "error_bound";
    m.tokens = n;
    m.seq_len = 2048;
    m.windows = 1;
    m.num_layers = layers;
    m.num_kv_heads = kv;
    m.head_dim = d;
    m.sample_per_window = 8;
    w.finish(m);
    check_meta_small(path);
    CalibDumpReader r(path);
    CHECK(r.meta().num_kv_heads == kv);
    CHECK(r.meta().sample_per_window == 8);
    CHECK(r.meta().kv_compression == "none");
    CHECK(r.meta().recipe.find("sample_per_window: 8") != std::string::npos);
    CHECK(r.positions() == pos);
    std::vector<float> back(k.size());
    r.read_keys(31, 0, n, back.data());
    CHECK(test::max_rel_error(back.data(), k.data(), k.size()) < 1e-3);  // fp16: 2^-11 relative
    // uncompressed chunks of ~256 KiB are stored whole: 2 x 32 layers x 256 KiB for 16 tokens (measured
    // 16.8 MB), not the 128 or 512 KiB of the data alone
    CHECK(std::filesystem::file_size(path) < 20u << 20);
    std::filesystem::remove(path);
  }
}

// Hidden benchmark (not in CI: [.]): where codebook training's host time goes on a dump of LLaMA-3-8B-shaped
// layers, with an instant k-means (centroids = the first points) so that reading, preparing the batches and
// the held-out error are what is timed. Run: antkv-tests "[.train-bench]".
TEST_CASE("scale: codebook training host time on 8B-shaped layers", "[.train-bench]") {
  const int layers = 2, kv = 8, d = 128, n = 65536, T = 2048;
  const std::string path = test::temp_dir() + "/bench.h5";
  {
    CalibDumpWriter w(path, layers, kv, d);
    std::vector<int32_t> toks(T), pos(T), win(T);
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> k(static_cast<size_t>(T) * kv * d), s(static_cast<size_t>(T) * kv);
    for (auto& x : k) x = nd(rng);
    for (auto& x : s) x = std::fabs(nd(rng));
    for (int c = 0; c < n / T; ++c) {
      for (int i = 0; i < T; ++i) toks[i] = i, pos[i] = i, win[i] = c;
      w.append_tokens(T, toks.data(), pos.data(), win.data());
      for (int l = 0; l < layers; ++l) w.append_layer(l, T, k.data(), k.data(), s.data(), s.data(), s.data());
    }
    CalibMeta m;
    m.config_hash = "bench";
    m.key_rope = "post";
    m.tokens = n;
    m.num_layers = layers;
    m.num_kv_heads = kv;
    m.head_dim = d;
    w.finish(m);
  }
  struct Instant : KMeansTrainer {
    KMeansParams p;
    std::string name() const override { return "instant"; }
    KMeansResult train(const KMeansBatch& b, const float*) override {
      validate_kmeans_batch(b, p.k, "bench");
      KMeansResult r;
      r.centroids.resize(static_cast<size_t>(b.n_codebooks) * p.k * b.dim);
      for (int cb = 0; cb < b.n_codebooks; ++cb)
        std::copy_n(b.x + static_cast<size_t>(cb) * b.n_points * b.dim, static_cast<size_t>(p.k) * b.dim,
                    r.centroids.data() + static_cast<size_t>(cb) * p.k * b.dim);
      r.objective.assign(b.n_codebooks, 0.0);
      r.iterations.assign(b.n_codebooks, 0);
      r.reseeded.assign(b.n_codebooks, 0);
      return r;
    }
  };
  const Recipe r = Recipe::defaults_with({"quant.bits=1"});
  TrainCodebooksOptions o;
  o.recipe = &r;
  o.calib_path = path;
  o.progress = false;
  o.make_trainer = [](const KMeansParams& p) {
    auto t = std::make_unique<Instant>();
    t->p = p;
    return std::unique_ptr<KMeansTrainer>(std::move(t));
  };
  const auto res = train_codebooks(o);
  WARN("n " << n << " x " << kv << " heads, " << layers << " layers: total " << res.seconds << " s, read "
            << res.read_seconds << " (waited " << res.wait_read_seconds << "), prepare " << res.prepare_seconds
            << ", k-means " << res.kmeans_seconds << ", held-out " << res.heldout_seconds);
  std::filesystem::remove(path);
}

// Hidden measurement (not in CI: [.]): what shuffle + deflate buys on real fp16 K/V (antkv-ref-18m, a trained
// model, 4 calibration windows of 2048) and what it costs in write time, one core.
TEST_CASE("scale: compression of real fp16 K/V in the calibration dump", "[.compression-bench][shared]") {
  const std::string dir = test::model_dir("antkv-ref-18m");
  Checkpoint ckpt = Checkpoint::open(dir);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const auto ids = tok.encode(read_file(test::shared_path("data/books-calib.txt")).substr(0, 60000));
  const Recipe recipe = Recipe::defaults_with({"model=" + dir});
  CpuRuntime rt(ckpt);
  const std::string tmp = test::temp_dir();
  CalibrationOptions co;
  co.recipe = &recipe;
  co.out_path = tmp + "/plain.h5";
  co.progress = false;
  run_calibration(rt, tok, plan_calibration(ids, 4 * 2047, 2048, 0), co);
  CalibDumpReader src(co.out_path);
  const ModelConfig& cfg = ckpt.config();
  const int64_t N = src.n_tokens();
  const size_t kvd = cfg.kv_dim(), KV = cfg.num_kv_heads;
  for (int level : {0, 1, 6}) {
    const std::string out = tmp + "/deflate" + std::to_string(level) + ".h5";
    CalibDumpWriter w(out, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, level);
    const auto toks = src.tokens(), pos = src.positions(), win = src.windows();
    w.append_tokens(static_cast<int>(N), toks.data(), pos.data(), win.data());
    double seconds = 0;
    for (int l = 0; l < cfg.num_layers; ++l) {
      std::vector<uint16_t> k(N * kvd), v(N * kvd);
      std::vector<float> sk(N * KV), sv(N * KV), an(N * KV);
      src.read_keys_half(l, 0, N, k.data());
      src.read_values_half(l, 0, N, v.data());
      src.read_scores(l, "S_K", 0, N, sk.data());
      src.read_scores(l, "S_V", 0, N, sv.data());
      src.read_scores(l, "anchor_score", 0, N, an.data());
      const auto t0 = std::chrono::steady_clock::now();
      w.append_layer_f16(l, static_cast<int>(N), k.data(), v.data(), sk.data(), sv.data(), an.data());
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    CalibMeta m = src.meta();
    w.finish(m);
    const double mb = std::filesystem::file_size(out) / 1e6;
    WARN("deflate level " << level << ": " << mb << " MB for " << N << " tokens (" << mb * 1e6 / N << " bytes/token), "
                          << seconds << " s of writes (" << w.bytes_appended() / 1e6 / std::max(seconds, 1e-9)
                          << " MB/s)");
  }
}
