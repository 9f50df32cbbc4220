// The packed-integer KIVI cache on the GPU (kernels/quant/uniform_cache.h): its group quantization against the
// CPU reference's uniform_quantize on the same fp16 rows, and its decode attention against a CPU reference
// that dequantizes with the same fp16 scales and zeros (softmax in double). Fresh random inputs each run (the
// seed is printed on failure); odd lengths, partial key groups, windows, batch 3 with different lengths, GQA
// 1 and 4, head_dim 64 and 128, bits 2 and 4; every slot poisoned (NaN scales/zeros and residual rows, 0xFF
// codes) before it is written, so a read past the counts shows as NaN.
//
// Tolerances (max |gpu - ref| / max |ref|):
//  - output 1e-2: it is bf16 (2^-9 relative rounding) of an fp32 softmax (flash_decode's and quant_decode's bound);
//  - LSE 3e-4: fp32 scores, each a sum of head_dim products (sum_c (q_c s_c) code_c + q . z) against the CPU's
//    double dot products: a few ulp of |q| |k| summed, ~1e-5 of scores up to ~10 (log2 and exp2 in fp32 add ~1e-7).
#include "test_support.h"
#include "gpu_test_support.h"

#ifdef ANTKV_HAVE_CUDA
#include <cuda_fp16.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/error.h"
#include "kernels/bench/method_bench.h"
#include "kernels/common/device_buffer.h"
#include "kernels/quant/uniform_cache.h"
#include "kernels/runtime/gpu_runtime.h"
#include "kernels/runtime/ops.h"
#include "quant/quantized_cache.h"

using namespace antkv;
using cuda::bf16;
using cuda::DeviceBuffer;
using test::download;
using test::download_bf;
using test::round_bf;
using test::upload;
using test::upload_bf;

namespace {

ModelConfig tiny_config(int layers, int heads, int kv_heads, int d) {
  ModelConfig c;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = d;
  c.hidden_size = heads * d;
  c.intermediate_size = 2 * c.hidden_size;
  c.vocab_size = 512;
  c.max_position_embeddings = 1 << 16;
  return c;
}

float round_h(float x) { return __half2float(__float2half_rn(x)); }

// The CPU reference's dequantized value against the GPU's code, scale and zero: the library computes
// q * scale + zero, which the compiler may contract into an FMA (-march=x86-64-v3): either rounding is the same code.
bool same_dequant(float cpu, int code, float scale, float zero) {
  const float q = static_cast<float>(code);
  volatile float prod = q * scale;  // volatile: the product rounded on its own
  return cpu == std::fma(q, scale, zero) || cpu == prod + zero;
}

// One decode step's K/V rows for B sequences, [B, KV, d], fp32 values that are fp16-representable (so the GPU's
// fp16 ring and the CPU's fp32 rows hold the same numbers). Channel 3 is constant (scale 0 path), channel 5 an
// outlier channel.
std::vector<float> make_rows(std::mt19937& rng, int B, int KV, int d) {
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(B) * KV * d);
  for (size_t i = 0; i < x.size(); ++i) {
    const int c = static_cast<int>(i % d);
    x[i] = round_h(c == 3 ? 0.375f : c == 5 ? 12.f + 4.f * n01(rng) : n01(rng));
  }
  return x;
}

struct Appender {
  GpuUniformKvCache& cache;
  int KV, d;
  std::vector<std::vector<float>> k_hist, v_hist;  // per sequence: [t, KV, d] every appended row
  void step(int B, std::mt19937& rng) {
    const auto k = make_rows(rng, B, KV, d), v = make_rows(rng, B, KV, d);
    if (static_cast<int>(k_hist.size()) < B) k_hist.resize(B), v_hist.resize(B);
    for (int b = 0; b < B; ++b) {
      const size_t row = static_cast<size_t>(KV) * d;
      k_hist[b].insert(k_hist[b].end(), k.begin() + b * row, k.begin() + (b + 1) * row);
      v_hist[b].insert(v_hist[b].end(), v.begin() + b * row, v.begin() + (b + 1) * row);
    }
    auto dk = upload(k), dv = upload(v);
    cache.plan_step(B, nullptr);
    cache.append(0, B, dk.get(), dv.get(), static_cast<int64_t>(KV) * d, nullptr);
    ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

// CPU decode over one (sequence, KV head)'s downloaded state: G query heads (bf16-rounded q, [G, d]) ->
// out [G, d], lse [G] (natural log, scaled scores), softmax in double.
void ref_decode(const GpuUniformKvCache::HostView& h, int group, int d, const float* q, int G, double scale, float* out,
                float* lse) {
  const int vgs = std::min(group, d), nvg = d / vgs;
  std::vector<double> key(static_cast<size_t>(h.len) * d), val(key.size());
  for (int t = 0; t < h.len; ++t)
    for (int c = 0; c < d; ++c) {
      const size_t i = static_cast<size_t>(t) * d + c;
      if (t < h.k_end) {
        const size_t sz = static_cast<size_t>(t / group) * d + c;
        key[i] = static_cast<double>(h.k_code[i]) * h.k_scale[sz] + h.k_zero[sz];
      } else {
        key[i] = h.res_k[static_cast<size_t>(t - h.k_end) * d + c];
      }
      if (t < h.v_end) {
        const size_t sz = static_cast<size_t>(t) * nvg + c / vgs;
        val[i] = static_cast<double>(h.v_code[i]) * h.v_scale[sz] + h.v_zero[sz];
      } else {
        val[i] = h.res_v[static_cast<size_t>(t - h.k_end) * d + c];
      }
    }
  std::vector<double> s(h.len);
  for (int g = 0; g < G; ++g) {
    double mx = -INFINITY;
    for (int t = 0; t < h.len; ++t) {
      double acc = 0;
      for (int c = 0; c < d; ++c) acc += static_cast<double>(q[g * d + c]) * key[static_cast<size_t>(t) * d + c];
      s[t] = acc * scale;
      mx = std::max(mx, s[t]);
    }
    double l = 0;
    for (int t = 0; t < h.len; ++t) l += (s[t] = std::exp(s[t] - mx));
    for (int c = 0; c < d; ++c) {
      double o = 0;
      for (int t = 0; t < h.len; ++t) o += s[t] * val[static_cast<size_t>(t) * d + c];
      out[g * d + c] = static_cast<float>(o / l);
    }
    lse[g] = static_cast<float>(mx + std::log(l));
  }
}

// attend() for sequences 0..B-1 under `plan` against ref_decode on every head; returns nothing, CHECKs.
void check_decode(GpuUniformKvCache& cache, const ModelConfig& cfg, int B, std::mt19937& rng,
                  const cuda::UniformDecodePlan& plan, const std::string& what) {
  const int H = cfg.num_heads, KV = cfg.num_kv_heads, d = cfg.head_dim, G = H / KV;
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<float> q(static_cast<size_t>(B) * H * d);
  for (auto& x : q) x = round_bf(n01(rng));
  auto dq = upload_bf(q);
  DeviceBuffer<bf16> out(q.size());
  DeviceBuffer<float> lse(static_cast<size_t>(B) * H);
  cuda::fill_bf16(out.get(), static_cast<int64_t>(out.size()), NAN, nullptr);
  cuda::fill_f32(lse.get(), static_cast<int64_t>(lse.size()), NAN, nullptr);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  cache.upload_counts(B, nullptr);
  cache.attend(0, B, H, dq.get(), out.get(), plan, scale, nullptr, lse.get());
  const auto go = download_bf(out.get(), out.size());
  const auto gl = download(lse);
  std::vector<float> want(q.size()), want_lse(lse.size());
  for (int b = 0; b < B; ++b)
    for (int kh = 0; kh < KV; ++kh) {
      const auto hv = cache.download(0, b, kh);
      const size_t row0 = static_cast<size_t>(b) * H + static_cast<size_t>(kh) * G;
      ref_decode(hv, cache.group(), d, q.data() + row0 * d, G, scale, want.data() + row0 * d, want_lse.data() + row0);
    }
  const double eo = test::max_rel_error(go.data(), want.data(), want.size());
  const double el = test::max_rel_error(gl.data(), want_lse.data(), want_lse.size());
  INFO(fmt::format("{}: {} splits of {}: output error {:.3g}, LSE error {:.3g}", what, plan.n_splits, plan.split_len, eo,
                   el));
  CHECK_MEASURED("test_uniform_cache_gpu: decode output rel err", eo, 1e-2);
  CHECK_MEASURED("test_uniform_cache_gpu: decode LSE rel err", el, 3e-4);
}

}  // namespace

TEST_CASE("GPU uniform cache: group quantization equals uniform_quantize on the same rows", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  for (int bits : {2, 4})
    for (int d : {64, 128})
      for (int group : {32, 128})
        for (int window : {0, 5}) {
          INFO(fmt::format("bits {} head_dim {} group {} window {}", bits, d, group, window));
          const int KV = 2, B = 2;
          const ModelConfig cfg = tiny_config(1, KV, KV, d);
          const int steps = 2 * group + window + 7;  // two full key blocks and a partial one
          GpuUniformKvCache cache(cfg, bits, group, window, B, steps + 3);
          cache.poison();
          Appender ap{cache, KV, d, {}, {}};
          for (int s = 0; s < steps; ++s) ap.step(B, rng);
          const int vgs = std::min(group, d);
          for (int b = 0; b < B; ++b)
            for (int kh = 0; kh < KV; ++kh) {
              const auto h = cache.download(0, b, kh);
              REQUIRE(h.len == steps);
              REQUIRE(h.v_end == steps - window);
              REQUIRE(h.k_end == 2 * group);
              const auto& K = ap.k_hist[b];
              const auto& V = ap.v_hist[b];
              auto at = [&](const std::vector<float>& X, int t, int c) {
                return X[(static_cast<size_t>(t) * KV + kh) * d + c];
              };
              int bad = 0;
              // keys: per channel over each block of `group` tokens
              for (int kb = 0; kb < h.k_end / group; ++kb)
                for (int c = 0; c < d; ++c) {
                  std::vector<float> col(group);
                  for (int r = 0; r < group; ++r) col[r] = at(K, kb * group + r, c);
                  uniform_quantize(col.data(), group, 1, bits);
                  const float s = h.k_scale[static_cast<size_t>(kb) * d + c], z = h.k_zero[static_cast<size_t>(kb) * d + c];
                  for (int r = 0; r < group; ++r) {
                    const int t = kb * group + r;
                    bad += !same_dequant(col[r], h.k_code[static_cast<size_t>(t) * d + c], s, z);
                  }
                }
              // values: per token over groups of vgs channels
              for (int t = 0; t < h.v_end; ++t)
                for (int c0 = 0; c0 < d; c0 += vgs) {
                  std::vector<float> row(vgs);
                  for (int j = 0; j < vgs; ++j) row[j] = at(V, t, c0 + j);
                  uniform_quantize(row.data(), vgs, 1, bits);
                  const size_t sz = static_cast<size_t>(t) * (d / vgs) + c0 / vgs;
                  for (int j = 0; j < vgs; ++j)
                    bad += !same_dequant(row[j], h.v_code[static_cast<size_t>(t) * d + c0 + j], h.v_scale[sz], h.v_zero[sz]);
                }
              // the residual holds the fp16 rows themselves (keys from k_end, values from v_end)
              for (int t = h.k_end; t < h.len; ++t)
                for (int c = 0; c < d; ++c) {
                  bad += h.res_k[static_cast<size_t>(t - h.k_end) * d + c] != at(K, t, c);
                  if (t >= h.v_end) bad += h.res_v[static_cast<size_t>(t - h.k_end) * d + c] != at(V, t, c);
                }
              CHECK(bad == 0);
              // the constant channel 3 took the scale-0 path: its keys come back exactly
              CHECK(h.k_scale[3] == 0.f);
              CHECK(h.k_zero[3] == 0.375f);
            }
        }
}

TEST_CASE("GPU uniform decode: appended caches of odd lengths equal the dequantized CPU reference", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (int bits : {2, 4})
    for (int d : {128, 64})
      for (int G : {1, 4}) {
        const int group = (n % 2) ? 32 : 128, window = (n % 3 == 1) ? 3 : 0;
        ++n;
        const std::string what = fmt::format("bits {} head_dim {} G {} group {} window {}", bits, d, G, group, window);
        INFO(what);
        const int KV = 2;
        const ModelConfig cfg = tiny_config(1, KV * G, KV, d);
        // sequence 0 longest: steps with B = 3, then 2, then 1 (lengths all odd, partial groups)
        const int l2 = 1, l1 = group + window + 36, l0 = 3 * group + window + 11;
        GpuUniformKvCache cache(cfg, bits, group, window, 3, l0 + 5);
        cache.poison();
        Appender ap{cache, KV, d, {}, {}};
        int s = 0;
        for (; s < l2; ++s) ap.step(3, rng);
        check_decode(cache, cfg, 3, rng, cache.plan(3, cfg.num_heads), what + ", lengths 1/1/1");
        for (; s < l1; ++s) ap.step(2, rng);
        check_decode(cache, cfg, 3, rng, cache.plan(3, cfg.num_heads), what + ", two sequences past a key block");
        for (; s < l0; ++s) ap.step(1, rng);
        REQUIRE(cache.length(0) == l0);
        REQUIRE(cache.length(1) == l1);
        REQUIRE(cache.length(2) == l2);
        // the planner's split, one split for everything, one split per 128 tokens
        const auto ap_plan = cache.plan(3, cfg.num_heads);
        check_decode(cache, cfg, 3, rng, ap_plan, what);
        cuda::UniformDecodePlan one = ap_plan, many = ap_plan;
        one.n_splits = 1;
        one.split_len = (l0 + 127) / 128 * 128;
        many.split_len = 128;
        many.n_splits = std::max(1, (cache.length(0) - window) / group * group / 128 + 1);
        check_decode(cache, cfg, 3, rng, one, what + ", one split");
        check_decode(cache, cfg, 3, rng, many, what + ", 128-token splits");
        // batch 1 alone (sequence 0)
        check_decode(cache, cfg, 1, rng, cache.plan(1, cfg.num_heads), what + ", batch 1");
      }
}

TEST_CASE("GPU uniform decode: synthetic long caches (many splits) equal the dequantized CPU reference", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  for (int bits : {2, 4})
    for (int d : {128, 64}) {
      const int G = bits == 2 ? 4 : 1, group = d == 128 ? 128 : 64, KV = 2;
      const std::string what = fmt::format("bits {} head_dim {} G {} group {}", bits, d, G, group);
      INFO(what);
      const ModelConfig cfg = tiny_config(1, KV * G, KV, d);
      GpuUniformKvCache cache(cfg, bits, group, 0, 3, 20011);
      cache.fill_random(seed + bits * 7 + d, nullptr);
      cache.set_synthetic_lengths({20001, 7, 4097 + 2 * group});
      check_decode(cache, cfg, 3, rng, cache.plan(3, cfg.num_heads), what);
    }
}

TEST_CASE("GPU uniform cache: closed set and bad plans refused and the runtime decodes over it", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const ModelConfig cfg = tiny_config(2, 8, 2, 64);
  CHECK_THROWS_WITH(GpuUniformKvCache(cfg, 3, 128, 0, 1, 64), Catch::Contains("takes bits 2 or 4, not 3"));
  CHECK_THROWS_WITH(GpuUniformKvCache(cfg, 2, 48, 0, 1, 64), Catch::Contains("takes group 32, 64 or 128, not 48"));
  CHECK_THROWS_WITH(GpuUniformKvCache(tiny_config(1, 2, 2, 96), 2, 128, 0, 1, 64),
                    Catch::Contains("takes head_dim 64 or 128, not 96"));
  CHECK_THROWS_WITH(GpuUniformKvCache(cfg, 8, 128, 0, 1, 64), Catch::Contains("uniform:bits=8,group=128"));
  // a plan made for shorter sequences gives NaN, not a silent partial answer
  {
    GpuUniformKvCache cache(cfg, 2, 32, 0, 1, 1000);
    cache.fill_random(3, nullptr);
    cache.set_synthetic_lengths({999});
    cuda::UniformDecodePlan short_plan = cache.plan(1, cfg.num_heads);
    short_plan.n_splits = 1;
    short_plan.split_len = 128;
    cache.upload_counts(1, nullptr);
    std::vector<float> q(static_cast<size_t>(cfg.num_heads) * 64, 0.5f);
    auto dq = upload_bf(q);
    DeviceBuffer<bf16> out(q.size());
    cache.attend(0, 1, cfg.num_heads, dq.get(), out.get(), short_plan, 0.125f, nullptr);
    const auto o = download_bf(out.get(), out.size());
    CHECK(std::isnan(o[0]));
  }
  // the runtime: random weights, synthetic uniform cache, decode steps (eager, then graph replay) over it
  GpuRuntimeOptions ro;
  ro.max_batch = 2;
  ro.max_context = 300;
  ro.uniform_kv = true;
  auto run = [&](bool graphs) {
    GpuRuntime rt(cfg, 5, ro);
    rt.set_uniform_cache(std::make_unique<GpuUniformKvCache>(cfg, 4, 32, 0, 2, 300));
    rt.fill_kv_random(9);
    rt.set_use_graphs(graphs);
    rt.set_batch_lengths({62, 95});  // sequence 0 completes a key block at step 2 (64 tokens)
    std::vector<int32_t> tok = {3, 4}, next;
    std::vector<float> logits;
    for (int i = 0; i < 4; ++i) {
      rt.decode_batch(tok, &logits, &next);
      tok = next;
    }
    CHECK(rt.uniform_cache()->length(0) == 66);
    CHECK(rt.uniform_cache()->download(0, 0, 1).k_end == 64);
    CHECK(rt.uniform_cache()->download(1, 1, 0).k_end == 96);
    ForwardRequest req;
    ForwardResult res;
    req.tokens = tok.data();
    req.n_tokens = 1;
    CHECK_THROWS_WITH(rt.forward(req, res), Catch::Contains("ppl for uniform runs on the simulated cache"));
    return logits;
  };
  const auto eager = run(false), graph = run(true);
  REQUIRE(eager.size() == graph.size());
  bool finite = true;
  for (float x : eager) finite &= std::isfinite(x);
  CHECK(finite);
  CHECK_MEASURED("test_uniform_cache_gpu: runtime graph vs eager logits rel err",
                 test::max_rel_error(graph.data(), eager.data(), eager.size()), 1e-6);  // same kernels, same inputs
}

TEST_CASE("bench methods: uniform parses with its closed set and simulated-only methods are refused by name", "[quant]") {
  const auto u = cuda::parse_bench_method("uniform:bits=2,group=128");
  CHECK(u.uniform);
  CHECK(u.uniform_bits == 2);
  CHECK(u.uniform_group == 128);
  CHECK(cuda::parse_bench_method("uniform:bits=4,group=32,window=16").uniform_window == 16);
  CHECK_THROWS_WITH(cuda::parse_bench_method("uniform:bits=3,group=128"),
                    Catch::Contains("--method uniform:bits=3,group=128: the GPU uniform cache takes bits 2 or 4, not 3"));
  CHECK_THROWS_WITH(cuda::parse_bench_method("uniform:bits=2,group=100"), Catch::Contains("group 32, 64 or 128, not 100"));
  CHECK_THROWS_WITH(cuda::parse_bench_method("rsq:bits=1"),
                    Catch::Contains("--method rsq:bits=1: rsq has no real GPU cache"));
  // a row times the method it names: options the compressed cache does not run are refused, not timed as plain vq
  for (const char* m : {"antkv:bits=1,anchors=v", "antkv:bits=1,correct=on", "vq:bits=1,lkbits=1/2"}) {
    INFO(m);
    CHECK_THROWS_WITH(cuda::parse_bench_method(m), Catch::Contains("do not run on the compressed cache"));
  }
  for (const char* m : {"vq:bits=2,gain=k", "vq:bits=1,rotate=pca,key_rope=pre"}) {
    INFO(m);
    CHECK_THROWS_WITH(cuda::parse_bench_method(m), Catch::Contains("gain= and rotate=pca run on the compressed cache with "
                                                                   "post-RoPE keys at bits 1, 0.75, 0.5 or 0.375"));
  }
  CHECK(cuda::parse_bench_method("antkv:bits=1,anchors=kv").compressed);
  // gain and rotate run through the compressed cache's coded transform; metric=task decodes as plain vq (it changes
  // only which codes are written); the per-token fp16 scales count in the bytes
  const auto best = cuda::parse_bench_method("vq:bits=1,gain=kv,rotate=pca");
  CHECK((best.compressed && best.gain_keys && best.gain_values && best.rotate));
  const auto gk = cuda::parse_bench_method("antkv:bits=1,gain=k");
  CHECK((gk.gain_keys && !gk.gain_values && !gk.rotate));
  const auto task = cuda::parse_bench_method("vq:bits=1,metric=task");
  CHECK((task.compressed && !task.gain_keys && !task.rotate));
  {
    ModelConfig c8 = tiny_config(32, 32, 8, 128);
    const double plain = cuda::sequence_cache_bytes(c8, cuda::parse_bench_method("vq:bits=1"), 131072);
    CHECK(cuda::sequence_cache_bytes(c8, best, 131072) == Approx(plain + 2.0 * 2 * 131072 * 8 * 32).epsilon(1e-12));
    CHECK(cuda::sequence_cache_bytes(c8, gk, 131072) ==
          Approx(cuda::sequence_cache_bytes(c8, cuda::parse_bench_method("antkv:bits=1"), 131072) + 2.0 * 131072 * 8 * 32)
              .epsilon(1e-12));
  }
  // bytes: 2-bit codes of K and V, (scale, zero) per key block and channel and per value token, the FP16 ring
  ModelConfig cfg = tiny_config(32, 32, 8, 128);
  const double per = GpuUniformKvCache::sequence_bytes(cfg, 2, 128, 0, 131072);
  const double want = (131072.0 * 32 * 2 + 1024.0 * 128 * 4 + 131072.0 * 4 + 2.0 * 128 * 128 * 2) * 8 * 32;
  CHECK(per == Approx(want).epsilon(1e-12));
}
#endif  // ANTKV_HAVE_CUDA
