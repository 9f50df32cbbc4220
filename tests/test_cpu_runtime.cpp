// The CPU runtime against transformers' reference outputs (reference/ of each shared model).
#include <algorithm>
#include <cmath>
#include <random>

#include <fmt/format.h>
#include <vector>

#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "runtime/cpu_ops.h"
#include "runtime/cpu_runtime.h"
#include "gpu_test_support.h"
#include "test_support.h"

using namespace antkv;

namespace {

std::vector<int32_t> ints(const TensorView& t) {
  REQUIRE(t.dtype == DType::kI32);
  const auto* p = static_cast<const int32_t*>(t.data);
  return std::vector<int32_t>(p, p + t.numel());
}

// Captures one layer's activations of the first forward() call.
struct CaptureLayers : ForwardObserver {
  std::vector<std::vector<float>> k_pre, k_post, v, q;
  int n_tokens = 0;
  int kv_dim = 0;
  void on_layer(const LayerActivations& a) override {
    if (static_cast<int>(k_pre.size()) <= a.layer) {
      k_pre.resize(a.layer + 1), k_post.resize(a.layer + 1), v.resize(a.layer + 1), q.resize(a.layer + 1);
    }
    if (!k_pre[a.layer].empty()) return;
    n_tokens = a.n_tokens;
    k_pre[a.layer].assign(a.k_pre_rope, a.k_pre_rope + size_t(a.n_tokens) * kv_dim);
    k_post[a.layer].assign(a.k_post_rope, a.k_post_rope + size_t(a.n_tokens) * kv_dim);
    v[a.layer].assign(a.v, a.v + size_t(a.n_tokens) * kv_dim);
  }
};

std::vector<int32_t> greedy(Runtime& rt, const std::vector<int32_t>& prompt, int n_new) {
  rt.reset();
  std::vector<int32_t> ids = prompt;
  ForwardRequest req;
  ForwardResult res;
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size());
  req.logits = LogitsMode::kLast;
  for (int s = 0; s < n_new; ++s) {
    rt.forward(req, res);
    const int next = static_cast<int>(std::max_element(res.logits.begin(), res.logits.end()) - res.logits.begin());
    ids.push_back(next);
    req.tokens = &ids.back();
    req.n_tokens = 1;
  }
  return ids;
}

// One forward pass over the prompt with every position's logits, the layers' K/V captured.
CaptureLayers forward_captured(Runtime& rt, const ModelConfig& cfg, const std::vector<int32_t>& prompt,
                               ForwardResult& res) {
  CaptureLayers cap;
  cap.kv_dim = cfg.kv_dim();
  ForwardRequest req;
  req.tokens = prompt.data();
  req.n_tokens = static_cast<int>(prompt.size());
  req.logits = LogitsMode::kAll;
  req.observer = &cap;
  rt.forward(req, res);
  return cap;
}

// Our [T, kv_heads, head_dim] rows in the reference's k_post_rope layout [kv_heads, T, head_dim].
std::vector<float> heads_major(const std::vector<float>& rows, int T, int kvh, int d) {
  std::vector<float> out(rows.size());
  for (int hh = 0; hh < kvh; ++hh)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < d; ++c) out[(size_t(hh) * T + t) * d + c] = rows[(size_t(t) * kvh + hh) * d + c];
  return out;
}

}  // namespace

TEST_CASE("CPU runtime: antkv-ref-18m logits and post-RoPE keys match transformers", "[runtime][shared]") {
  const std::string dir = test::model_dir("antkv-ref-18m");
  auto ref = SafetensorsFile::open(dir + "/reference/reference.safetensors");
  const auto prompt = ints(ref->get("prompt_ids"));
  Checkpoint ckpt = Checkpoint::open(dir);
  const ModelConfig& cfg = ckpt.config();
  CpuRuntimeOptions opts;
  opts.kv_dtype = KvDType::kF32;  // the reference is fp32 math throughout
  CpuRuntime rt(ckpt, opts);
  ForwardResult res;
  const CaptureLayers cap = forward_captured(rt, cfg, prompt, res);

  const auto ref_logits = ref->get("logits").to_float();
  REQUIRE(res.logits.size() == ref_logits.size());
  const double err = test::max_rel_error(res.logits.data(), ref_logits.data(), ref_logits.size());
  INFO("max relative logits error " << err);
  // Measured 8.7e-7 (fp32 GEMMs in another summation order); an fp16 cache gives ~1e-3, a wrong
  // rms_norm_eps or rope_theta far more.
  CHECK(err < 3e-6);

  const int T = static_cast<int>(prompt.size()), kvh = cfg.num_kv_heads, d = cfg.head_dim;
  for (int layer : {0, 5}) {
    // reference k_post_rope: [kv_heads, T, head_dim]; ours: [T, kv_heads, head_dim]
    const auto kref = ref->get(fmt::format("layer{}.k_post_rope", layer)).to_float();
    const auto ours = heads_major(cap.k_post[layer], T, kvh, d);
    const double kerr = test::max_rel_error(ours.data(), kref.data(), kref.size());
    INFO("layer " << layer << " post-RoPE key error " << kerr);
    CHECK(kerr < 2e-6);  // measured 5.5e-7 (layer 0), 4.3e-7 (layer 5)
  }
}

TEST_CASE("CPU runtime: antkv-ref-18m pre-RoPE K/V of the reference's last forward step", "[runtime][shared]") {
  // reference k_pre_rope / v_pre_rope are [1, 1, kv_dim]: the k_proj/v_proj outputs of the last forward
  // call of transformers' greedy generation, i.e. the single decode step for greedy_ids[T_total - 2].
  const std::string dir = test::model_dir("antkv-ref-18m");
  auto ref = SafetensorsFile::open(dir + "/reference/reference.safetensors");
  const auto ids = ints(ref->get("greedy_ids"));
  Checkpoint ckpt = Checkpoint::open(dir);
  CpuRuntimeOptions opts;
  opts.kv_dtype = KvDType::kF32;
  CpuRuntime rt(ckpt, opts);
  CaptureLayers all;
  all.kv_dim = ckpt.config().kv_dim();
  ForwardRequest req;
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size()) - 1;  // positions 0 .. T_total-2
  req.observer = &all;
  ForwardResult res;
  rt.forward(req, res);
  const int last = req.n_tokens - 1;
  const int kv = ckpt.config().kv_dim();
  for (int layer : {0, 5}) {
    const auto kref = ref->get(fmt::format("layer{}.k_pre_rope", layer)).to_float();
    const auto vref = ref->get(fmt::format("layer{}.v_pre_rope", layer)).to_float();
    REQUIRE(static_cast<int>(kref.size()) == kv);
    const double kerr = test::max_rel_error(all.k_pre[layer].data() + size_t(last) * kv, kref.data(), kv);
    const double verr = test::max_rel_error(all.v[layer].data() + size_t(last) * kv, vref.data(), kv);
    INFO("layer " << layer << " pre-RoPE k error " << kerr << ", v error " << verr);
    CHECK(kerr < 2e-6);  // measured 4.5e-7 / 3.0e-7 (layers 0 / 5)
    CHECK(verr < 2e-6);  // measured 4.4e-7 / 6.2e-7
  }
}

TEST_CASE("CPU runtime: greedy decoding equals the reference ids", "[runtime][shared]") {
  for (const char* name : {"antkv-ref-18m", "stories260K"}) {
    const std::string dir = test::model_dir(name);
    auto ref = SafetensorsFile::open(dir + "/reference/reference.safetensors");
    const auto want = ints(ref->get("greedy_ids"));
    std::vector<int32_t> prompt;
    if (ref->has("prompt_ids")) prompt = ints(ref->get("prompt_ids"));
    else prompt = {want[0]};  // stories260K: greedy from BOS
    Checkpoint ckpt = Checkpoint::open(dir);
    CpuRuntimeOptions opts;
    opts.kv_dtype = KvDType::kF32;
    CpuRuntime rt(ckpt, opts);
    const auto got = greedy(rt, prompt, static_cast<int>(want.size() - prompt.size()));
    INFO(name);
    CHECK(got == want);
  }
}

// The retrieval reference model (data/models/antkv-retrieval-2m, scripts/make_retrieval_model.sh): its
// reference/ holds the whole prompt's pre-RoPE K/V ([T, kv_dim]) of layers 0 and 3 beside the logits and post-RoPE keys.
TEST_CASE("CPU runtime: antkv-retrieval-2m logits, K/V and greedy ids match transformers", "[runtime][needle]") {
  const std::string dir = test::source_path("data/models/antkv-retrieval-2m");
  auto ref = SafetensorsFile::open(dir + "/reference/reference.safetensors");
  const auto prompt = ints(ref->get("prompt_ids"));
  const auto want = ints(ref->get("greedy_ids"));
  Checkpoint ckpt = Checkpoint::open(dir);
  const ModelConfig& cfg = ckpt.config();
  REQUIRE(cfg.num_layers == 4);
  CpuRuntimeOptions opts;
  opts.kv_dtype = KvDType::kF32;  // the reference is fp32 math on the bf16 weights
  CpuRuntime rt(ckpt, opts);
  ForwardResult res;
  const CaptureLayers cap = forward_captured(rt, cfg, prompt, res);
  const auto ref_logits = ref->get("logits").to_float();
  REQUIRE(res.logits.size() == ref_logits.size());
  // fp32 on both sides in different summation orders: ~1e-6 relative (antkv-ref-18m: 8.7e-7); a wrong
  // rope_theta, eps or tied head would be off by far more
  const double err = test::max_rel_error(res.logits.data(), ref_logits.data(), ref_logits.size());
  test::report_measured("antkv-retrieval-2m: max relative logits error", err, 3e-6);
  CHECK(err < 3e-6);
  const int T = static_cast<int>(prompt.size()), kvh = cfg.num_kv_heads, d = cfg.head_dim, kv = cfg.kv_dim();
  for (int layer : {0, 3}) {
    const auto kpre = ref->get(fmt::format("layer{}.k_pre_rope", layer)).to_float();
    const auto vpre = ref->get(fmt::format("layer{}.v_pre_rope", layer)).to_float();
    REQUIRE(static_cast<int64_t>(kpre.size()) == static_cast<int64_t>(T) * kv);
    REQUIRE(static_cast<int64_t>(vpre.size()) == static_cast<int64_t>(T) * kv);
    const auto kpost = ref->get(fmt::format("layer{}.k_post_rope", layer)).to_float();  // [kv_heads, T, head_dim]
    const auto ours = heads_major(cap.k_post[layer], T, kvh, d);
    const double ek = test::max_rel_error(cap.k_pre[layer].data(), kpre.data(), kpre.size());
    const double ev = test::max_rel_error(cap.v[layer].data(), vpre.data(), vpre.size());
    const double ep = test::max_rel_error(ours.data(), kpost.data(), kpost.size());
    test::report_measured(fmt::format("antkv-retrieval-2m: layer {} max relative error k_pre / v / k_post", layer),
                          std::max({ek, ev, ep}), 2e-6);
    CHECK(ek < 2e-6);
    CHECK(ev < 2e-6);
    CHECK(ep < 2e-6);
  }
  const auto got = greedy(rt, prompt, static_cast<int>(want.size() - prompt.size()));
  CHECK(got == want);
}

TEST_CASE("CPU runtime: prefill in chunks equals one prefill - fp16 cache stays close", "[runtime][shared]") {
  const std::string dir = test::model_dir("antkv-ref-18m");
  auto ref = SafetensorsFile::open(dir + "/reference/reference.safetensors");
  const auto ids = ints(ref->get("greedy_ids"));
  Checkpoint ckpt = Checkpoint::open(dir);
  CpuRuntimeOptions opts;
  opts.kv_dtype = KvDType::kF32;
  CpuRuntime rt(ckpt, opts);
  ForwardRequest req;
  ForwardResult whole, part;
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size());
  req.logits = LogitsMode::kAll;
  rt.forward(req, whole);
  rt.reset();
  std::vector<float> chunked;
  for (int t0 = 0; t0 < static_cast<int>(ids.size()); t0 += 17) {
    req.tokens = ids.data() + t0;
    req.n_tokens = std::min<int>(17, static_cast<int>(ids.size()) - t0);
    rt.forward(req, part);
    chunked.insert(chunked.end(), part.logits.begin(), part.logits.end());
  }
  CHECK(test::max_rel_error(chunked.data(), whole.logits.data(), whole.logits.size()) < 1e-5);

  opts.kv_dtype = KvDType::kF16;
  CpuRuntime rt16(ckpt, opts);
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size());
  rt16.forward(req, part);
  const double e16 = test::max_rel_error(part.logits.data(), whole.logits.data(), whole.logits.size());
  INFO("fp16 cache logits error " << e16);
  CHECK(e16 < 6e-4);  // fp16 K/V rounding (2^-11 relative): measured 1.5e-4 of the logits' scale
  CHECK(e16 > 0);     // the cache really rounds
}

TEST_CASE("attention_blocked equals the naive reference, with LSE, for odd sizes and GQA", "[runtime]") {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  struct Case { int n_q, past, heads, kv_heads, d; };
  for (auto c : {Case{1, 0, 4, 4, 8}, Case{67, 0, 4, 2, 16}, Case{130, 33, 8, 2, 64}, Case{1, 200, 4, 1, 32}}) {
    const int S = c.past + c.n_q;
    std::vector<float> q(size_t(c.n_q) * c.heads * c.d), k(size_t(S) * c.kv_heads * c.d), v(k.size());
    for (auto* a : {&q, &k, &v})
      for (auto& x : *a) x = nd(rng);
    std::vector<float> o1(q.size()), o2(q.size()), l1(size_t(c.heads) * c.n_q), l2(l1.size());
    const float scale = 1.0f / std::sqrt(float(c.d));
    cpu::attention(q.data(), k.data(), v.data(), o1.data(), l1.data(), c.n_q, S, c.heads, c.kv_heads, c.d, scale);
    attention_blocked(q.data(), k.data(), v.data(), o2.data(), l2.data(), c.n_q, S, c.heads, c.kv_heads, c.d, scale);
    // both fp32; the blocked path sums in a different order: errors of a few ulp of the output scale
    CHECK(test::max_rel_error(o2.data(), o1.data(), o1.size()) < 1e-5);
    CHECK(test::max_rel_error(l2.data(), l1.data(), l1.size()) < 1e-5);
    // the key-error score correction with all errors 0 changes nothing
    std::vector<float> err(size_t(S) * c.kv_heads, 0.0f);
    std::vector<float> o3(q.size());
    attention_blocked(q.data(), k.data(), v.data(), o3.data(), nullptr, c.n_q, S, c.heads, c.kv_heads, c.d, scale, err.data());
    CHECK(o3 == o2);
  }
  // With one query row, the correction s_j += scale^2 |q|^2 e_j / 2 equals moving key j by alpha_j q with
  // alpha_j = scale e_j / 2 (then q.k_j scale grows by exactly that): the reference runs on moved keys.
  const int S = 37, d = 16;
  std::vector<float> q(d), k(size_t(S) * d), v(k.size()), err(S), moved(k.size());
  for (auto* a : {&q, &k, &v})
    for (auto& x : *a) x = nd(rng);
  const float scale = 1.0f / std::sqrt(float(d));
  for (int j = 0; j < S; ++j) {
    err[j] = j % 3 == 0 ? 0.0f : 0.5f * (j % 5);
    for (int c = 0; c < d; ++c) moved[j * d + c] = k[j * d + c] + scale * err[j] / 2 * q[c];
  }
  std::vector<float> want(d), got(d);
  cpu::attention(q.data(), moved.data(), v.data(), want.data(), nullptr, 1, S, 1, 1, d, scale);
  attention_blocked(q.data(), k.data(), v.data(), got.data(), nullptr, 1, S, 1, 1, d, scale, err.data());
  CHECK(test::max_rel_error(got.data(), want.data(), d) < 1e-5);
}
