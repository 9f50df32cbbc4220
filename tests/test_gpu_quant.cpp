// GPU KV-cache quantizers (kernels/quant/simulated_quantizer.h) against the CPU reference cache QuantizedKvCache.
//
// 1. Same inputs on both sides (synthetic q/k/v fed chunk by chunk: a 300-token prefill at position 0, a
//    40-token chunk at 300, then 150 one-token decode steps): the GPU arena (bf16) against the CPU cache (fp32)
//    rounded to bf16. Both compute the same fp32 operations in the same order, so they agree exactly except
//    where a value lands on a rounding or nearest-centroid tie, where GPU and CPU anchor scores (equal to ~1e-6
//    relative) rank two tokens differently, or where RoPE of dequantized pre-RoPE keys differs by an fp32 ulp
//    (then the bf16 values differ by at most one bf16 ulp). Measured: see the WARN lines.
// 2. The whole model (antkv-ref-18m, a random 300-token prompt): GpuRuntime + quantizer against CpuRuntime +
//    QuantizedKvCache. The GPU model runs in bf16 (activations, weights, cache) and the CPU one in fp32, so K/V
//    differ by ~2^-9 relative before quantization; that flips nearest-centroid codes, uniform levels and a few
//    anchors. fp16 is held to the bf16 floor; the quantized methods to the CPU method's own response to its
//    inputs rounded to bf16 (see the test; the measured figures are there and in the WARN lines). Also decode
//    steps past the 128-token FP16 window, through the simulated quantizer and through the compressed cache.
// 3. antkv with ratio 1.0 (every token an anchor) gives exactly the GPU fp16 method's logits.
// 4. Codebooks that do not fit the method or the model: antkv::Error naming the problem.
#include "test_support.h"
#include "gpu_test_support.h"

#ifdef ANTKV_HAVE_CUDA

#include <cuda_fp16.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "eval/compare.h"
#include "io/codebooks.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"
#include "kernels/quant/compressed_cache.h"
#include "kernels/quant/simulated_quantizer.h"
#include "kernels/runtime/gpu_runtime.h"
#include "kernels/runtime/method_runtime_factory.h"
#include "kernels/runtime/ops.h"
#include "model/checkpoint.h"
#include "quant/method.h"
#include "quant/quantized_cache.h"
#include "quant/vq.h"
#include "recipe/recipe.h"
#include "runtime/cpu_ops.h"
#include "runtime/cpu_runtime.h"
#include "runtime/rope.h"

using namespace antkv;
using antkv::test::with_window;
using cuda::bf16;
using cuda::DeviceBuffer;
using test::f2bf;
using test::bf2f;
using test::round_bf;
using test::report_measured;

namespace {


float round_fp16(float x) { return __half2float(__float2half_rn(x)); }

MethodSpec method(const std::string& text) {
  static const Recipe r = Recipe::defaults_with({});
  return parse_method(text, r);
}

// Activations of one layer over a sequence: q [N, H, d], k_pre/k_post/v [N, KV, d].
struct LayerActs {
  std::vector<float> q, k_pre, k_post, v;
};

// Codebooks for m with centroids drawn from sample vectors (a random token's group plus 10% of the channel's
// spread as noise); error_norm = the mean |x - vq(x)| over the samples per head (as the trainer reports it).
// rotate=pca: per head the samples' mean and the PCA basis of their covariance (quant/vq.h pca_rotation, as
// the trainer), and the samples are coded in it; gain: the samples are unit directions (gain_normalize), so
// that the centroids are too. key_rope=commute: the key samples are taken in RoPE pair order (quant/vq.h
// rope_pair_order), the order the trainer codes them in. metric=task: per (layer, head, group) a strongly anisotropic fp16 lower-triangular
// factor L (diagonal 4^(i mod 3), N(0, 1) below it), as test_quant.cpp's task-metric cache test builds them, and
// error_norm measured in that metric's assignment (vq_quantize_metric). Per-layer widths (lkbits / lvbits): each
// layer's arrays in its own configuration, the meta of layer 0's (as lib/eval/compare.cpp merges the files).
std::shared_ptr<CodebookSet> make_codebooks(const ModelConfig& cfg, const MethodSpec& m,
                                            const std::vector<LayerActs>& acts, uint64_t seed) {
  auto set = std::make_shared<CodebookSet>();
  CodebookMeta& meta = set->meta;
  meta.config_hash = cfg.config_hash;
  meta.key_rope = option_name(m.key_rope);
  meta.weighting = option_name(m.weighting);
  meta.key_c = m.key_config(0).c, meta.key_b = m.key_config(0).b;
  meta.value_c = m.value_config(0).c, meta.value_b = m.value_config(0).b;
  meta.num_layers = cfg.num_layers, meta.num_kv_heads = cfg.num_kv_heads, meta.head_dim = cfg.head_dim;
  meta.gain = option_name(m.gain);
  meta.rotate = option_name(m.rotate);
  meta.metric = option_name(m.metric);
  const bool task = m.metric == Metric::kTask;
  const int KV = cfg.num_kv_heads, d = cfg.head_dim;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  set->keys.resize(cfg.num_layers), set->values.resize(cfg.num_layers);
  for (int l = 0; l < cfg.num_layers; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      std::vector<float> src = kv ? acts[l].v : (m.pre_rope() ? acts[l].k_pre : acts[l].k_post);
      const VqConfig q = kv ? m.value_config(l) : m.key_config(l);
      LayerCodebooks& lc = kv ? set->values[l] : set->keys[l];
      const int N = static_cast<int>(src.size() / (static_cast<size_t>(KV) * d));
      const int64_t row = static_cast<int64_t>(KV) * d;
      if (kv == 0 && m.commute())  // key_rope=commute: codebooks of the keys in RoPE pair order, as the trainer makes
        for (int h = 0; h < KV; ++h) permute_channels(rope_pair_order(d, q.c), true, src.data() + static_cast<size_t>(h) * d, N, row);
      if (m.rotate == Rotate::kPca) {
        lc.rotation.resize(static_cast<size_t>(KV) * d * d);
        lc.mean.assign(static_cast<size_t>(KV) * d, 0.f);
        for (int h = 0; h < KV; ++h) {
          std::vector<double> mu(d, 0.0), cov(static_cast<size_t>(d) * d, 0.0);
          for (int t = 0; t < N; ++t)
            for (int c = 0; c < d; ++c) mu[c] += src[t * row + h * d + c] / N;
          for (int t = 0; t < N; ++t)
            for (int i = 0; i < d; ++i)
              for (int j = 0; j < d; ++j)
                cov[static_cast<size_t>(i) * d + j] +=
                    (src[t * row + h * d + i] - mu[i]) * (src[t * row + h * d + j] - mu[j]) / N;
          float* rot = lc.rotation.data() + static_cast<size_t>(h) * d * d;
          float* mean = lc.mean.data() + static_cast<size_t>(h) * d;
          pca_rotation(cov.data(), d, q.c, rot);
          for (int c = 0; c < d; ++c) mean[c] = static_cast<float>(mu[c]);
          rotate_forward(rot, mean, d, src.data() + static_cast<size_t>(h) * d, N, row);
        }
      }
      if (kv ? m.gain_values() : m.gain_keys()) {
        std::vector<float> norms(N);
        for (int h = 0; h < KV; ++h) gain_normalize(src.data() + static_cast<size_t>(h) * d, N, row, d, norms.data());
      }
      const int groups = d / q.c, k = 1 << q.b;
      std::vector<double> sd(static_cast<size_t>(KV) * d, 0.0), mean(sd.size(), 0.0);
      for (int t = 0; t < N; ++t)
        for (size_t i = 0; i < sd.size(); ++i) mean[i] += src[t * sd.size() + i] / N;
      for (int t = 0; t < N; ++t)
        for (size_t i = 0; i < sd.size(); ++i) sd[i] += std::pow(src[t * sd.size() + i] - mean[i], 2) / N;
      lc.centroids.resize(static_cast<size_t>(KV) * groups * k * q.c);
      for (int h = 0; h < KV; ++h)
        for (int g = 0; g < groups; ++g)
          for (int j = 0; j < k; ++j) {
            const int t = static_cast<int>(rng() % static_cast<uint64_t>(N));
            for (int c = 0; c < q.c; ++c) {
              const size_t ch = static_cast<size_t>(h) * d + g * q.c + c;
              lc.centroids[((static_cast<size_t>(h) * groups + g) * k + j) * q.c + c] =
                  src[t * sd.size() + ch] + 0.1f * static_cast<float>(std::sqrt(sd[ch])) * n01(rng);
            }
          }
      if (task) {  // [KV][groups][c][c]
        lc.metric.assign(static_cast<size_t>(KV) * groups * q.c * q.c, 0.f);
        for (int b = 0; b < KV * groups; ++b)
          for (int i = 0; i < q.c; ++i)
            for (int j = 0; j <= i; ++j)
              lc.metric[(static_cast<size_t>(b) * q.c + i) * q.c + j] =
                  round_fp16(i == j ? std::pow(4.0f, static_cast<float>(i % 3)) : n01(rng));
      }
      std::vector<float> rec(src.size());
      lc.error_norm.assign(KV, 0.f);
      for (int h = 0; h < KV; ++h) {
        VqHeadCodebooks hc{lc.centroids.data() + static_cast<size_t>(h) * groups * k * q.c, groups, k, q.c};
        if (task)
          vq_quantize_metric(hc, lc.metric.data() + static_cast<size_t>(h) * d * q.c, src.data() + static_cast<size_t>(h) * d,
                             N, static_cast<int64_t>(KV) * d, rec.data() + static_cast<size_t>(h) * d);
        else
          vq_quantize(hc, src.data() + static_cast<size_t>(h) * d, N, static_cast<int64_t>(KV) * d, rec.data() + static_cast<size_t>(h) * d);
        double s = 0;
        for (int t = 0; t < N; ++t) {
          double e = 0;
          for (int c = 0; c < d; ++c) {
            const size_t i = (static_cast<size_t>(t) * KV + h) * d + c;
            e += std::pow(src[i] - rec[i], 2);
          }
          s += std::sqrt(e);
        }
        lc.error_norm[h] = static_cast<float>(s / N);
      }
    }
  return set;
}

// ---- 1. same inputs ----

ModelConfig synthetic_config() {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 512;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 128;
  c.intermediate_size = 1024;
  c.vocab_size = 100;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 4096;
  c.config_hash = "synthetic-gpu-quant";
  return c;
}

// Keys with per-channel scales and offsets (so per-channel quantization matters), values with per-token
// offsets, queries N(0, 1.5^2); k_post = RoPE(k_pre).
std::vector<LayerActs> synthetic_acts(const ModelConfig& cfg, int N, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  const int H = cfg.num_heads, KV = cfg.num_kv_heads, d = cfg.head_dim;
  const auto inv = rope_inv_freq(cfg);
  std::vector<int32_t> pos(N);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<LayerActs> out(cfg.num_layers);
  for (auto& a : out) {
    std::vector<float> ch_scale(static_cast<size_t>(KV) * d), ch_off(ch_scale.size());
    for (size_t i = 0; i < ch_scale.size(); ++i) ch_scale[i] = std::exp(0.7f * n01(rng)), ch_off[i] = 0.5f * n01(rng);
    a.q.resize(static_cast<size_t>(N) * H * d);
    a.k_pre.resize(static_cast<size_t>(N) * KV * d);
    a.v.resize(a.k_pre.size());
    for (auto& x : a.q) x = 1.5f * n01(rng);
    for (size_t i = 0; i < a.k_pre.size(); ++i) a.k_pre[i] = ch_off[i % ch_scale.size()] + ch_scale[i % ch_scale.size()] * n01(rng);
    for (size_t t = 0; t < static_cast<size_t>(N) * KV; ++t) {
      const float off = 0.5f * n01(rng);
      for (int c = 0; c < d; ++c) a.v[t * d + c] = n01(rng) + off;
    }
    a.k_post = a.k_pre;
    rope_apply(a.k_post.data(), N, KV, d, pos.data(), inv.data());
  }
  return out;
}

struct SameInputResult {
  double exact_k = 0, exact_v = 0;      // share of elements equal to the bf16-rounded CPU value
  double row_mismatch = 0;              // share of (token, head) K or V rows off by more than one bf16 ulp
  double anchor_overlap = 1;            // |GPU anchors ∩ CPU anchors| / |CPU anchors|
  int64_t cpu_anchors = 0, gpu_anchors = 0;
};

SameInputResult run_same_inputs(const ModelConfig& cfg, const MethodSpec& m, std::shared_ptr<const CodebookSet> cb,
                                const std::vector<LayerActs>& acts, const std::vector<int>& chunks) {
  const int H = cfg.num_heads, KV = cfg.num_kv_heads, d = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
  const int N = std::accumulate(chunks.begin(), chunks.end(), 0);
  const int cap = N + 16;
  (void)H;
  QuantizedKvCache cpu(cfg, m, cb);
  auto gq = make_gpu_kv_quantizer(cfg, m, cb);
  cudaStream_t stream;
  ANTKV_CUDA_CHECK(cudaStreamCreate(&stream));
  const auto inv = rope_inv_freq(cfg);
  DeviceBuffer<float> d_inv(inv.size());
  ANTKV_CUDA_CHECK(cudaMemcpy(d_inv.get(), inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> pos(N);
  std::iota(pos.begin(), pos.end(), 0);
  DeviceBuffer<int32_t> d_pos(N);
  ANTKV_CUDA_CHECK(cudaMemcpy(d_pos.get(), pos.data(), N * 4, cudaMemcpyHostToDevice));
  struct Dev {
    DeviceBuffer<float> q, kp, kq, v;
    DeviceBuffer<bf16> kc, vc;
  };
  std::vector<Dev> dev(cfg.num_layers);
  auto up = [](DeviceBuffer<float>& b, const std::vector<float>& h) {
    b.resize(h.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(b.get(), h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  };
  for (int l = 0; l < cfg.num_layers; ++l) {
    up(dev[l].q, acts[l].q), up(dev[l].kp, acts[l].k_pre), up(dev[l].kq, acts[l].k_post), up(dev[l].v, acts[l].v);
    dev[l].kc.resize(static_cast<size_t>(KV) * cap * d);
    dev[l].vc.resize(dev[l].kc.size());
    // NaN everywhere: a slot the quantizer forgets to write shows up as a mismatch
    cuda::fill_bf16(dev[l].kc.get(), static_cast<int64_t>(dev[l].kc.size()), NAN, stream);
    cuda::fill_bf16(dev[l].vc.get(), static_cast<int64_t>(dev[l].vc.size()), NAN, stream);
  }
  int p0 = 0;
  for (int n : chunks) {
    for (int l = 0; l < cfg.num_layers; ++l) {
      KvAppend a;
      a.layer = l, a.n_tokens = n, a.position0 = p0;
      a.q = acts[l].q.data() + static_cast<size_t>(p0) * qd;
      a.k_pre_rope = acts[l].k_pre.data() + static_cast<size_t>(p0) * kvd;
      a.k_post_rope = acts[l].k_post.data() + static_cast<size_t>(p0) * kvd;
      a.v = acts[l].v.data() + static_cast<size_t>(p0) * kvd;
      cpu.append(a);
      GpuKvLayerChunk c;
      c.layer = l, c.n_tokens = n, c.position0 = p0;
      c.q = dev[l].q.get() + static_cast<size_t>(p0) * qd;
      c.k_pre = dev[l].kp.get() + static_cast<size_t>(p0) * kvd;
      c.k_post = dev[l].kq.get() + static_cast<size_t>(p0) * kvd;
      c.v = dev[l].v.get() + static_cast<size_t>(p0) * kvd;
      c.q_stride = qd, c.k_pre_stride = c.k_post_stride = c.v_stride = kvd;
      c.positions = d_pos.get() + p0;
      c.inv_freq = d_inv.get();
      c.k_cache = dev[l].kc.get(), c.v_cache = dev[l].vc.get(), c.capacity = cap;
      gq->on_layer(c, stream);
    }
    p0 += n;
  }
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  SameInputResult r;
  int64_t eq_k = 0, eq_v = 0, total = 0, bad_rows = 0, rows = 0, both = 0;
  for (int l = 0; l < cfg.num_layers; ++l) {
    std::vector<uint16_t> hk(dev[l].kc.size()), hv(dev[l].vc.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(hk.data(), dev[l].kc.get(), hk.size() * 2, cudaMemcpyDeviceToHost));
    ANTKV_CUDA_CHECK(cudaMemcpy(hv.data(), dev[l].vc.get(), hv.size() * 2, cudaMemcpyDeviceToHost));
    REQUIRE(cpu.length(l) == N);
    const float* ck = cpu.keys(l);
    const float* cv = cpu.values(l);
    for (int t = 0; t < N; ++t)
      for (int h = 0; h < KV; ++h) {
        bool bad = false;
        for (int c = 0; c < d; ++c) {
          const size_t gi = (static_cast<size_t>(h) * cap + t) * d + c, ci = (static_cast<size_t>(t) * KV + h) * d + c;
          const float gk = bf2f(hk[gi]), gv = bf2f(hv[gi]), rk = round_bf(ck[ci]), rv = round_bf(cv[ci]);
          eq_k += gk == rk;
          eq_v += gv == rv;
          // one bf16 ulp of the value (2^-7 relative at worst)
          bad |= !(std::fabs(gk - ck[ci]) <= std::fabs(ck[ci]) / 128.f + 1e-30f);
          bad |= !(std::fabs(gv - cv[ci]) <= std::fabs(cv[ci]) / 128.f + 1e-30f);
          ++total;
        }
        bad_rows += bad;
        ++rows;
      }
    const auto& fa = cpu.anchor_flags(l);
    const auto& ga = gq->anchor_flags(l);
    REQUIRE(ga.size() == fa.size());
    for (size_t i = 0; i < fa.size(); ++i) {
      r.cpu_anchors += fa[i];
      r.gpu_anchors += ga[i];
      both += fa[i] && ga[i];
    }
  }
  r.exact_k = static_cast<double>(eq_k) / total;
  r.exact_v = static_cast<double>(eq_v) / total;
  r.row_mismatch = static_cast<double>(bad_rows) / rows;
  r.anchor_overlap = r.cpu_anchors ? static_cast<double>(both) / r.cpu_anchors : 1.0;
  cudaStreamDestroy(stream);
  return r;
}

}  // namespace

TEST_CASE("GPU KV quantizers equal QuantizedKvCache on the same inputs (prefill, chunk, decode window)", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const ModelConfig cfg = synthetic_config();
  const std::vector<int> chunks = [] {
    std::vector<int> c = {300, 40};
    c.insert(c.end(), 150, 1);  // decode steps: tokens 340..361 leave the 128-token window
    return c;
  }();
  const int N = 490;
  const auto acts = synthetic_acts(cfg, N, 11);
  const auto calib = synthetic_acts(cfg, 400, 12);  // codebook samples (same distribution)
  struct Case {
    std::string text;
    double max_row_mismatch;  // share of (token, head) rows
    double min_exact = 0;     // share of K and of V elements equal to the bf16-rounded CPU value
  };
  const std::vector<Case> cases = {
      {"fp16", 0.0},
      {"uniform:bits=2,group=32", 1e-3},
      {"uniform:bits=2,group=128", 1e-3},
      {"uniform:bits=4,group=32,window=20", 1e-3},
      {"vq:bits=1", 5e-3},
      {"vq:bits=0.75", 5e-3},
      {"antkv:bits=1,ratio=0.05,promote=off", 1e-2},
      {"antkv:bits=1,ratio=0.05,key_rope=pre,promote=off", 1e-2},
      {"antkv:bits=1,ratio=0.05,key_rope=commute,promote=off", 1e-2},
      {"vq:bits=1,gain=kv,key_rope=commute", 5e-3},
      {"vq:bits=1,metric=task,key_rope=commute", 5e-3},
      {"antkv:bits=1,ratio=0.05,anchors=v,promote=off", 1e-2},  // anchor tokens: keys quantized, values exact
      {"antkv:bits=1,ratio=0.05,anchors=k,key_rope=pre,promote=off", 1e-2},
      // gain-shape VQ, rotated VQ, rsq: the GPU sums the fp64 norms and d x d products in the CPU's order (a
      // float product is exact in fp64, so every step rounds once, as on the CPU) and its Hadamard butterflies are
      // the CPU's, so the dequantized floats are the CPU's bit for bit and only the bf16 store differs: held to the
      // vq / antkv row bounds above, and at least 99.99% of the K and of the V elements equal to the bf16-rounded
      // CPU value (the pre-RoPE keys' RoPE may differ by an fp32 ulp). Measured on an H200: rows off 0 in every
      // case, exact shares 1.00000 (pre-RoPE K 0.99999).
      {"vq:bits=1,gain=k", 5e-3, 0.9999},
      {"vq:bits=1,gain=kv", 5e-3, 0.9999},
      {"vq:bits=1,rotate=pca", 5e-3, 0.9999},
      {"vq:bits=0.75,gain=kv,rotate=pca", 5e-3, 0.9999},
      {"vq:bits=1,gain=kv,rotate=pca,key_rope=pre", 5e-3, 0.9999},
      {"antkv:bits=1,ratio=0.05,gain=kv,rotate=pca,promote=off", 1e-2, 0.9999},
      {"antkv:bits=1,ratio=0.05,anchors=v,gain=k,rotate=pca,key_rope=pre,promote=off", 1e-2, 0.9999},
      // norm=fp8: the norm rounded to E4M3 from the same float (CUDA's saturating conversion against
      // quant/fp8.h round_fp8_e4m3: both round to nearest even and saturate at 448), held like gain/rotate above
      {"vq:bits=1,gain=kv,norm=fp8", 5e-3, 0.9999},
      {"vq:bits=1,gain=kv,rotate=pca,norm=fp8", 5e-3, 0.9999},
      {"antkv:bits=1,ratio=0.05,gain=k,rotate=pca,norm=fp8,key_rope=pre,promote=off", 1e-2, 0.9999},
      // the best 1-bit method of the quality table (recipes/options-results.md): all four options with per-layer
      // key widths (kbits != vbits in a layer)
      {"vq:bits=1,gain=kv,rotate=pca,norm=fp8,metric=task,lkbits=1/2", 5e-3, 0.9999},
      // metric=task: L^T x in fp64 in the CPU's order (bit for bit), searched against the CPU's L^T c, the
      // original-space centroid stored; alone, with gain/rotate, pre-RoPE keys and anchors. Per-layer widths
      // (lkbits / lvbits: each layer's own c/b per tensor) and anchor ratios (lratio). Held like gain/rotate above.
      // Measured on an H200: rows off 0 in every case, exact shares 1.00000 (K 0.99998 for the pre-RoPE lkbits/lratio
      // case), GPU anchors = CPU anchors (68; 82 with lratio), overlap 1.0000.
      {"vq:bits=1,metric=task", 5e-3, 0.9999},
      {"vq:bits=1,metric=task,key_rope=pre", 5e-3, 0.9999},
      {"vq:bits=1,gain=kv,rotate=pca,metric=task", 5e-3, 0.9999},
      {"vq:bits=1,gain=kv,rotate=pca,metric=task,key_rope=pre", 5e-3, 0.9999},
      {"antkv:bits=1,ratio=0.05,metric=task,promote=off", 1e-2, 0.9999},
      {"antkv:bits=1,ratio=0.05,anchors=v,gain=k,rotate=pca,metric=task,key_rope=pre,promote=off", 1e-2, 0.9999},
      {"vq:bits=1,lvbits=1/2", 5e-3, 0.9999},
      {"vq:bits=1,lkbits=0.5/2,lvbits=2/0.75,metric=task", 5e-3, 0.9999},
      {"antkv:bits=1,lratio=0.1/0.02,promote=off", 1e-2, 0.9999},
      {"antkv:bits=1,lkbits=2/1,lratio=0.02/0.1,key_rope=pre,promote=off", 1e-2, 0.9999},
      // decode-time anchors (promote on, the antkv default): 22 tokens leave the window per layer; the budget grows
      // from 17 to 25 per head and the rest are swaps decided on running scores (GPU: fp32 attention rows over the
      // bf16 arena; CPU: double over its fp32 cache), so a near-tie may go the other way: held to the antkv row
      // bound, the same anchor count and >= 97% overlap
      {"antkv:bits=1,ratio=0.05", 1e-2},
      {"antkv:bits=1,ratio=0.05,key_rope=pre", 1e-2},
      {"antkv:bits=1,ratio=0.05,anchors=v,gain=k,rotate=pca,metric=task,key_rope=pre", 1e-2},
      {"antkv:bits=1,lratio=0.1/0.02", 1e-2},
      {"rsq:bits=1", 5e-3, 0.9999},
      {"rsq:bits=2,key_rope=pre", 5e-3, 0.9999},
      {"rsq:bits=3", 5e-3, 0.9999},
      {"rsq:bits=4", 5e-3, 0.9999},
  };
  for (const auto& cs : cases) {
    SECTION(cs.text) {
      const MethodSpec m = method(cs.text);
      std::shared_ptr<const CodebookSet> cb = m.needs_codebooks() ? make_codebooks(cfg, m, calib, 99) : nullptr;
      const SameInputResult r = run_same_inputs(cfg, m, cb, acts, chunks);
      WARN(fmt::format("{}: same inputs: exact K {:.5f}, exact V {:.5f}, rows off by > 1 bf16 ulp {:.5f}, anchors "
                       "cpu {} gpu {} overlap {:.4f}",
                       cs.text, r.exact_k, r.exact_v, r.row_mismatch, r.cpu_anchors, r.gpu_anchors, r.anchor_overlap));
      const std::string label = "test_gpu_quant: same inputs " + cs.text;
      report_measured(label + " rows off by > 1 bf16 ulp (share)", r.row_mismatch, cs.max_row_mismatch);
      report_measured(label + " exact K share (at least)", r.exact_k, cs.min_exact);
      report_measured(label + " exact V share (at least)", r.exact_v, cs.min_exact);
      report_measured(label + " anchor overlap (at least)", r.anchor_overlap, 0.97);
      CHECK(r.row_mismatch <= cs.max_row_mismatch);
      CHECK(r.exact_k >= cs.min_exact);
      CHECK(r.exact_v >= cs.min_exact);
      CHECK(r.gpu_anchors == r.cpu_anchors);
      CHECK(r.anchor_overlap >= 0.97);
      if (cs.text == "fp16") {
        CHECK(r.exact_k == 1.0);
        CHECK(r.exact_v == 1.0);
      }
    }
  }
}

// The same-input cases of metric=task above can fail: with these test codebooks the CPU cache's metric codes
// differ from the plain (Euclidean) ones on most rows, so a GPU quantizer that ignored the factors would be off
// there. Runs on the CPU only (no GPU needed).
TEST_CASE("GPU quantizer test codebooks: the metric=task factors change most CPU rows", "[quant]") {
  const ModelConfig cfg = synthetic_config();
  const auto acts = synthetic_acts(cfg, 120, 11);
  const auto calib = synthetic_acts(cfg, 400, 12);
  for (const std::string text : {"vq:bits=1,metric=task", "vq:bits=1,gain=kv,rotate=pca,metric=task,key_rope=pre"}) {
    const MethodSpec m = method(text);
    auto cb = make_codebooks(cfg, m, calib, 99);
    MethodSpec plain_m = m;
    plain_m.metric = Metric::kPlain;
    auto plain_cb = std::make_shared<CodebookSet>(*cb);
    plain_cb->meta.metric = "plain";
    for (auto* side : {&plain_cb->keys, &plain_cb->values})
      for (auto& lc : *side) lc.metric.clear();
    QuantizedKvCache task_cache(cfg, m, cb), plain_cache(cfg, plain_m, plain_cb);
    const int N = 120, KV = cfg.num_kv_heads, d = cfg.head_dim, kvd = cfg.kv_dim();
    int64_t rows = 0, changed_k = 0, changed_v = 0;
    for (int l = 0; l < cfg.num_layers; ++l) {
      for (QuantizedKvCache* c : {&task_cache, &plain_cache})
        c->append(KvAppend{l, N, 0, acts[l].k_pre.data(), acts[l].k_post.data(), acts[l].v.data(), acts[l].q.data()});
      for (int t = 0; t < N; ++t)
        for (int h = 0; h < KV; ++h) {
          const size_t o = static_cast<size_t>(t) * kvd + static_cast<size_t>(h) * d;
          changed_k += !std::equal(task_cache.keys(l) + o, task_cache.keys(l) + o + d, plain_cache.keys(l) + o);
          changed_v += !std::equal(task_cache.values(l) + o, task_cache.values(l) + o + d, plain_cache.values(l) + o);
          ++rows;
        }
    }
    const double share_k = static_cast<double>(changed_k) / rows, share_v = static_cast<double>(changed_v) / rows;
    WARN(fmt::format("{}: rows whose codes the metric changes: K {:.3f}, V {:.3f}", text, share_k, share_v));
    CHECK(share_k >= 0.5);
    CHECK(share_v >= 0.5);
  }
}

namespace {

// ---- 2./3. the model ----

struct Collect : ForwardObserver {
  std::vector<LayerActs> acts;
  int qd = 0, kvd = 0;
  void on_layer(const LayerActivations& a) override {
    if (static_cast<int>(acts.size()) <= a.layer) acts.resize(a.layer + 1);
    auto add = [&](std::vector<float>& dst, const float* src, int w) {
      dst.insert(dst.end(), src, src + static_cast<size_t>(a.n_tokens) * w);
    };
    add(acts[a.layer].q, a.q, qd);
    add(acts[a.layer].k_pre, a.k_pre_rope, kvd);
    add(acts[a.layer].k_post, a.k_post_rope, kvd);
    add(acts[a.layer].v, a.v, kvd);
  }
};

std::vector<int32_t> random_prompt(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(n);
  ids[0] = 0;  // BOS of antkv-ref-18m
  for (int i = 1; i < n; ++i) ids[i] = 2 + static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab - 2));
  return ids;
}

// QuantizedKvCache fed q/k/v rounded to bf16 first: the CPU method's own sensitivity to bf16-sized changes
// of its inputs (the GPU's K/V carry errors of that size, and more: every GEMM input is bf16 there). Used to
// put the GPU-vs-CPU differences of the quantized methods in scale.
class Bf16InputCache : public KvCache {
 public:
  Bf16InputCache(const ModelConfig& cfg, std::unique_ptr<QuantizedKvCache> inner)
      : in_(std::move(inner)), qd_(cfg.q_dim()), kvd_(cfg.kv_dim()) {}
  std::string name() const override { return in_->name() + " (bf16 inputs)"; }
  void reset() override { in_->reset(); }
  int length(int layer) const override { return in_->length(layer); }
  void append(const KvAppend& a) override {
    auto round = [](std::vector<float>& dst, const float* src, size_t n) -> const float* {
      if (!src) return nullptr;
      dst.assign(src, src + n);
      for (auto& x : dst) x = round_bf(x);
      return dst.data();
    };
    const size_t n = static_cast<size_t>(a.n_tokens);
    KvAppend b = a;
    b.q = round(q_, a.q, n * qd_);
    b.k_pre_rope = round(kp_, a.k_pre_rope, n * kvd_);
    b.k_post_rope = round(kq_, a.k_post_rope, n * kvd_);
    b.v = round(v_, a.v, n * kvd_);
    in_->append(b);
  }
  const float* keys(int layer) const override { return in_->keys(layer); }
  const float* values(int layer) const override { return in_->values(layer); }
  size_t stored_bytes() const override { return in_->stored_bytes(); }
  const float* key_error(int layer) const override { return in_->key_error(layer); }

 private:
  std::unique_ptr<QuantizedKvCache> in_;
  size_t qd_, kvd_;
  std::vector<float> q_, kp_, kq_, v_;
};

ForwardResult run_prompt(Runtime& rt, const std::vector<int32_t>& ids) {
  std::vector<int32_t> targets(ids.begin() + 1, ids.end());
  targets.push_back(-1);
  ForwardRequest req;
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size());
  req.logits = LogitsMode::kAll;
  req.targets = targets.data();
  ForwardResult res;
  rt.reset();
  rt.forward(req, res);
  return res;
}

struct Models {
  Checkpoint ckpt;
  std::vector<LayerActs> calib;  // CPU activations of another random prompt (codebook samples)
};

Models& ref_model() {
  static Models* m = [] {
    auto* p = new Models{Checkpoint::open(test::model_dir("antkv-ref-18m")), {}};
    CpuRuntime rt(p->ckpt);
    Collect col;
    col.qd = p->ckpt.config().q_dim();
    col.kvd = p->ckpt.config().kv_dim();
    const auto ids = random_prompt(400, p->ckpt.config().vocab_size, 777);
    ForwardRequest req;
    req.tokens = ids.data();
    req.n_tokens = static_cast<int>(ids.size());
    req.observer = &col;
    ForwardResult res;
    rt.forward(req, res);
    p->calib = std::move(col.acts);
    return p;
  }();
  return *m;
}

}  // namespace

TEST_CASE("GPU runtime + quantizer vs CPU runtime + QuantizedKvCache on antkv-ref-18m (NLL, logits, anchors)",
          "[gpu][quant][shared]") {
  SKIP_WITHOUT_GPU();
  Models& mod = ref_model();
  const ModelConfig& cfg = mod.ckpt.config();
  const auto ids = random_prompt(300, cfg.vocab_size, 4242);
  const int T = static_cast<int>(ids.size());
  auto cpu_factory = cpu_method_runtime_factory(mod.ckpt);
  auto gpu_factory = gpu_method_runtime_factory(mod.ckpt);

  // |dNLL| mean and max over the T-1 predicted positions, and exp(mean NLL) of a and b
  struct Diff {
    double mean = 0, max = 0, ppl_a = 0, ppl_b = 0;
    double ppl_rel() const { return std::fabs(ppl_a / ppl_b - 1); }
  };
  auto diff = [T](const ForwardResult& a, const ForwardResult& b) {
    Diff r;
    double sa = 0, sb = 0;
    for (int t = 0; t + 1 < T; ++t) {
      const double dlt = std::fabs(static_cast<double>(a.nll[t]) - b.nll[t]);
      r.mean += dlt / (T - 1);
      r.max = std::max(r.max, dlt);
      sa += a.nll[t], sb += b.nll[t];
    }
    r.ppl_a = std::exp(sa / (T - 1)), r.ppl_b = std::exp(sb / (T - 1));
    return r;
  };

  SECTION("the bf16-vs-fp32 floor: plain runtimes (CPU fp16 cache, GPU bf16 cache)") {
    CpuRuntime c(mod.ckpt);
    GpuRuntime g(mod.ckpt);
    const auto rc = run_prompt(c, ids), rg = run_prompt(g, ids);
    const Diff d = diff(rg, rc);
    WARN(fmt::format("plain runtimes: ppl cpu {:.4f} gpu {:.4f}, |dNLL| mean {:.4f} max {:.4f}, logits rel err {:.2e}",
                     d.ppl_b, d.ppl_a, d.mean, d.max,
                     test::max_rel_error(rg.logits.data(), rc.logits.data(), rc.logits.size())));
  }

  // fp16 is held to the bf16 floor. For the quantized methods a bf16-sized change of a K/V value can move it
  // to another centroid or integer level, i.e. by a whole quantization step, so GPU and CPU differ by what the
  // method itself does with such a change. The CPU run with q/k/v rounded to bf16 before quantization
  // (Bf16InputCache, "pert") measures that, and the GPU must stay within it: mean |dNLL| <= 1.5 pert + 0.02,
  // |ln(ppl_gpu / ppl_cpu)| <= 0.5 pert + 0.01 (on random tokens the ppl is ~1e6 and a 2-bit cache moves it by
  // up to 18% from the bf16 rounding alone), logits within each case's bound of max |logit| (~1.2-1.5x its
  // measured value: the same to two digits on an H200 and an H100, 2026-12-07).
  // Measured on an H200 (this prompt; GPU / pert mean |dNLL|, ppl rel, logits rel err):
  //   fp16 0.012 / 0.005, 1.5e-3, 5.9e-3;  uniform g32 0.44 / 0.40, 4.4e-2, 0.23;  uniform g128 0.53 / 0.56,
  //   8.7e-2, 0.25;  vq c8b8 0.28 / 0.27, 1.6e-2, 0.14;  vq c16b12 0.21 / 0.21, 1.5e-2, 0.18;
  //   antkv post 0.20 / 0.20, 4.3e-2, 0.13;  antkv pre 0.19 / 0.19, 7.8e-3, 0.10;  anchors overlap 0.989 / 0.978;
  //   vq gain=kv,rotate=pca,pre 0.31 / 0.34, 3.2e-2, 0.18;  antkv gain=kv,rotate=pca 0.29 / 0.28, 2.2e-2, 0.24
  //   (anchors overlap 0.967);  rsq 2 bits 0.36 / 0.34, 4.8e-2, 0.15.
  // (method, bound on the logits' max |gpu - cpu| / max |cpu|; fp16 has its own bounds below)
  const std::vector<std::pair<std::string, double>> cases = {
      {"fp16", 0.0},
      {"uniform:bits=2,group=32", 0.30},                    // measured 0.233
      {"uniform:bits=2,group=128", 0.30},                   // 0.246
      {"vq:bits=1", 0.20},                                  // 0.136
      {"vq:bits=0.75", 0.25},                               // 0.181
      {"antkv:bits=1,ratio=0.05", 0.20},                    // 0.130
      {"antkv:bits=1,ratio=0.05,key_rope=pre", 0.15},       // 0.101
      {"vq:bits=1,gain=kv,rotate=pca,key_rope=pre", 0.25},  // 0.183
      {"antkv:bits=1,ratio=0.05,gain=kv,rotate=pca", 0.30}, // 0.239
      {"rsq:bits=2", 0.20},                                 // 0.145
  };
  for (const auto& [text, logits_bound] : cases) {
    SECTION(text) {
      const MethodSpec m = method(text);
      std::shared_ptr<const CodebookSet> cb = m.needs_codebooks() ? make_codebooks(cfg, m, mod.calib, 5) : nullptr;
      auto crt = cpu_factory(m, cb);
      auto grt = gpu_factory(m, cb);
      const auto rc = run_prompt(*crt, ids), rg = run_prompt(*grt, ids);
      REQUIRE(rg.nll.size() == size_t(T));
      const Diff d = diff(rg, rc);
      const double lerr = test::max_rel_error(rg.logits.data(), rc.logits.data(), rc.logits.size());
      CpuRuntime prt(mod.ckpt);
      prt.set_kv_cache(std::make_unique<Bf16InputCache>(cfg, std::make_unique<QuantizedKvCache>(cfg, m, cb)));
      const Diff p = diff(run_prompt(prt, ids), rc);
      std::string anchors;
      if (m.kind == MethodKind::kAntkv) {
        auto& qc = dynamic_cast<QuantizedKvCache&>(dynamic_cast<CpuRuntime&>(*crt).kv_cache());
        auto* gq = dynamic_cast<GpuRuntime&>(*grt).kv_quantizer();
        REQUIRE(gq);
        int64_t nc = 0, ng = 0, both = 0;
        for (int l = 0; l < cfg.num_layers; ++l) {
          const auto& fa = qc.anchor_flags(l);
          const auto& ga = gq->anchor_flags(l);
          REQUIRE(fa.size() == ga.size());
          for (size_t i = 0; i < fa.size(); ++i) nc += fa[i], ng += ga[i], both += fa[i] && ga[i];
        }
        const double overlap = static_cast<double>(both) / nc;
        anchors = fmt::format(", anchors cpu {} gpu {} overlap {:.4f}", nc, ng, overlap);
        report_measured("test_gpu_quant: 18m " + text + " anchor overlap (at least)", overlap, 0.9);
        CHECK(nc == ng);
        CHECK(overlap >= 0.9);
      }
      WARN(fmt::format("{}: ppl cpu {:.4f} gpu {:.4f} (rel {:.2e}), |dNLL| mean {:.4f} max {:.4f}, logits rel err "
                       "{:.2e}; pert: ppl {:.4f}, |dNLL| mean {:.4f} max {:.4f}{}",
                       text, d.ppl_b, d.ppl_a, d.ppl_rel(), d.mean, d.max, lerr, p.ppl_a, p.mean, p.max, anchors));
      if (m.kind == MethodKind::kFp16) {
        CHECK(lerr <= 2e-2);
        report_measured("test_gpu_quant: 18m fp16 logits rel err", lerr, 2e-2);  // measured 5.9e-3 on an H200
        report_measured("test_gpu_quant: 18m fp16 mean |dNLL|", d.mean, 0.03);   // measured 0.012
        report_measured("test_gpu_quant: 18m fp16 max |dNLL|", d.max, 0.15);
        report_measured("test_gpu_quant: 18m fp16 ppl rel", d.ppl_rel(), 1e-2);  // measured 1.5e-3
        CHECK(d.mean <= 0.03);
        CHECK(d.max <= 0.15);
        CHECK(d.ppl_rel() <= 1e-2);
      } else {
        const std::string label = "test_gpu_quant: 18m " + text;
        report_measured(label + " mean |dNLL|", d.mean, 1.5 * p.mean + 0.02);
        report_measured(label + " |ln(ppl_gpu / ppl_cpu)|", std::fabs(std::log(d.ppl_a / d.ppl_b)), 0.5 * p.mean + 0.01);
        report_measured(label + " logits rel err", lerr, logits_bound);
        CHECK(d.mean <= 1.5 * p.mean + 0.02);
        CHECK(std::fabs(std::log(d.ppl_a / d.ppl_b)) <= 0.5 * p.mean + 0.01);
        CHECK(lerr <= logits_bound);
      }
    }
  }

  SECTION("decode: 100-token prefill + 140 one-token steps (tokens 100..111 leave the window)") {
    // the simulated GPU cache without decode-time anchors (it does not run them), against the CPU cache likewise;
    // then the compressed cache with them (promote=on, the default) against the CPU cache with them
    const MethodSpec m_off = method("antkv:bits=1,ratio=0.05,promote=off");
    const MethodSpec m = method("antkv:bits=1,ratio=0.05");
    auto cb = make_codebooks(cfg, m, mod.calib, 5);
    auto crt = cpu_factory(m_off, cb);
    auto grt = gpu_factory(m_off, cb);
    const auto seq = random_prompt(240, cfg.vocab_size, 99);
    double worst = 0;
    for (Runtime* rt : {crt.get(), grt.get()}) rt->reset();
    ForwardRequest req;
    ForwardResult rc, rg;
    req.logits = LogitsMode::kLast;
    for (int p = 0; p < 240;) {
      const int n = p == 0 ? 100 : 1;
      req.tokens = seq.data() + p;
      req.n_tokens = n;
      crt->forward(req, rc);
      grt->forward(req, rg);
      worst = std::max(worst, test::max_rel_error(rg.logits.data(), rc.logits.data(), rc.logits.size()));
      p += n;
    }
    WARN(fmt::format("decode with antkv: worst last-token logits rel err over 141 forwards {:.2e}", worst));
    // measured 7.05e-2 (H100, 2026-12-07), the compressed cache's below the same
    report_measured("test_gpu_quant: 18m decode antkv simulated worst last-token logits rel err", worst, 0.1);
    CHECK(worst <= 0.1);
    // the compressed cache (real) against the same CPU reference, token by token, held to the same bound
    GpuRuntimeOptions ro;
    ro.compressed_kv = true;
    GpuRuntime real(mod.ckpt, ro);
    real.set_compressed_cache(std::make_unique<GpuCompressedKvCache>(cfg, m, *cb, 1, real.capacity(), 128));
    real.set_kv_quantizer(make_gpu_kv_quantizer(cfg, m, cb));
    crt = cpu_factory(m, cb);
    crt->reset();
    double worst_real = 0;
    ForwardResult rr;
    for (int p = 0; p < 240;) {
      const int n = p == 0 ? 100 : 1;
      req.tokens = seq.data() + p;
      req.n_tokens = n;
      crt->forward(req, rc);
      real.forward(req, rr);
      worst_real = std::max(worst_real, test::max_rel_error(rr.logits.data(), rc.logits.data(), rc.logits.size()));
      p += n;
    }
    WARN(fmt::format("decode with antkv through the compressed cache: worst last-token logits rel err vs the CPU "
                     "reference over 141 forwards {:.2e}",
                     worst_real));
    report_measured("test_gpu_quant: 18m decode antkv compressed worst last-token logits rel err", worst_real, 0.1);
    CHECK(worst_real <= 0.1);
    // the anchors: ceil(0.05 * 240) = 12 per head after the last step (5 from the prefill, 7 promoted as the
    // budget grew, others by displacement), the same tokens as the CPU cache's up to near-ties of the running
    // scores (fp32 on the GPU from bf16 q and output, double on the CPU)
    auto* cpu_cache = dynamic_cast<QuantizedKvCache*>(&dynamic_cast<CpuRuntime&>(*crt).kv_cache());
    REQUIRE(cpu_cache);
    int same = 0, total = 0, decoded = 0;
    for (int l = 0; l < cfg.num_layers; ++l) {
      const auto pos = real.compressed_cache()->anchor_positions(l, 0);
      REQUIRE(pos.size() == static_cast<size_t>(cfg.num_kv_heads) * 12);
      for (int h = 0; h < cfg.num_kv_heads; ++h)
        for (int a = 0; a < 12; ++a) {
          const int t = pos[static_cast<size_t>(h) * 12 + a];
          REQUIRE(t >= 0);
          REQUIRE(t < 240 - 128);
          same += cpu_cache->anchor_flags(l)[static_cast<size_t>(t) * cfg.num_kv_heads + h];
          decoded += t >= 100;
          ++total;
        }
    }
    WARN(fmt::format("decode-time anchors: {} of {} GPU anchors are CPU anchors, {} are decoded tokens", same, total,
                     decoded));
    report_measured("test_gpu_quant: 18m decode-time anchors same share (at least)", double(same) / total, 0.9);
    CHECK(same >= 0.9 * total);
    CHECK(decoded >= cfg.num_layers * cfg.num_kv_heads * 7);
  }
}

TEST_CASE("GPU antkv with ratio 1.0 reproduces the GPU fp16 method exactly", "[gpu][quant][shared]") {
  SKIP_WITHOUT_GPU();
  Models& mod = ref_model();
  const ModelConfig& cfg = mod.ckpt.config();
  const auto ids = random_prompt(300, cfg.vocab_size, 4243);
  GpuRuntime rt(mod.ckpt);
  rt.set_kv_quantizer(make_gpu_kv_quantizer(cfg, method("fp16"), nullptr));
  const auto ref = run_prompt(rt, ids);
  CHECK_THROWS_WITH(rt.decode_batch({5}, nullptr, nullptr), Catch::Contains("not supported with a KV-cache quantizer"));
  for (const std::string text : {"antkv:bits=1,ratio=1.0", "antkv:bits=1,ratio=1.0,key_rope=pre",
                                 "antkv:bits=1,ratio=1.0,gain=kv,rotate=pca,key_rope=pre"}) {
    INFO(text);
    const MethodSpec m = method(text);
    rt.set_kv_quantizer(make_gpu_kv_quantizer(cfg, m, make_codebooks(cfg, m, mod.calib, 6)));
    const auto got = run_prompt(rt, ids);
    REQUIRE(got.logits.size() == ref.logits.size());
    CHECK(std::memcmp(got.logits.data(), ref.logits.data(), ref.logits.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(got.nll.data(), ref.nll.data(), ref.nll.size() * sizeof(float)) == 0);
    for (int l = 0; l < cfg.num_layers; ++l) {
      const auto& f = rt.kv_quantizer()->anchor_flags(l);
      CHECK(std::count(f.begin(), f.end(), 1) == static_cast<long>(f.size()));
    }
  }
  // and the plain runtime (bf16 of the fp32 K/V, no fp16 step) is within bf16 noise of it
  rt.set_kv_quantizer(nullptr);
  const auto plain = run_prompt(rt, ids);
  CHECK_MEASURED("test_gpu_quant: 18m plain runtime vs fp16 method logits rel err",
                 test::max_rel_error(plain.logits.data(), ref.logits.data(), ref.logits.size()), 1e-2);
}

TEST_CASE("GPU KV quantizer: codebooks that do not fit are errors naming the problem", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const ModelConfig cfg = synthetic_config();
  const auto calib = synthetic_acts(cfg, 64, 3);
  const MethodSpec m = method("antkv:bits=1");  // c8b8 keys and values
  auto good = make_codebooks(cfg, m, calib, 1);
  CHECK_NOTHROW(make_gpu_kv_quantizer(cfg, m, good));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, nullptr), Catch::Contains("needs codebooks"));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=0.75"), good),
                    Catch::Contains("codebooks are keys c8b8 / values c8b8, the method needs c16b12 / c16b12"));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,key_rope=pre"), good),
                    Catch::Contains("codebooks are for post-RoPE keys"));
  auto bad = std::make_shared<CodebookSet>(*good);
  bad->meta.config_hash = "another";
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, bad), Catch::Contains("trained for another model"));
  bad = std::make_shared<CodebookSet>(*good);
  bad->meta.num_kv_heads = 4;
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, bad), Catch::Contains("codebook shapes do not match the model"));
  bad = std::make_shared<CodebookSet>(*good);
  bad->values[1].centroids.resize(bad->values[1].centroids.size() - 8);
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, bad), Catch::Contains("layer 1 value centroids hold"));
  bad = std::make_shared<CodebookSet>(*good);
  bad->keys.pop_back();
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, bad), Catch::Contains("layers of key / value centroids"));
  bad = std::make_shared<CodebookSet>(*good);
  bad->keys[0].error_norm.push_back(1.f);
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, bad), Catch::Contains("layer 0 key error_norm holds 3 values"));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,correct=on"), good),
                    Catch::Contains("correct=on (the attention-score correction) is not implemented on the GPU"));
  // metric=task needs codebooks trained in the metric, with a factor per layer, head and group; per-layer lists
  // must have the model's layer count and each layer's codebooks its own configuration's shape
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,metric=task"), good),
                    Catch::Contains("codebooks are for metric=plain, the method needs metric=task"));
  const MethodSpec mt = method("antkv:bits=1,metric=task");
  auto task = make_codebooks(cfg, mt, calib, 1);
  CHECK_NOTHROW(make_gpu_kv_quantizer(cfg, mt, task));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, m, task), Catch::Contains("codebooks are for metric=task, the method needs metric=plain"));
  bad = std::make_shared<CodebookSet>(*task);
  bad->keys[1].metric.pop_back();
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, mt, bad), Catch::Contains("layer 1 key metric=task factors hold 2047 floats, expected 2048"));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,lkbits=1/1/1"), good),
                    Catch::Contains("lkbits/lvbits/lratio list 3 layers, the model has 2"));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,lratio=0.1/0.1/0.1"), good),
                    Catch::Contains("lkbits/lvbits/lratio list 3 layers, the model has 2"));
  CHECK_NOTHROW(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,lratio=0.1/0"), good));
  CHECK_NOTHROW(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,lvbits=1/1"), good));
  // (c4b8 for c8b8 would not show: [KV, d / c, 2^b, c] holds KV d 2^b floats for every c)
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,lvbits=1/0.75"), good),
                    Catch::Contains("layer 1 value centroids hold 65536 floats, expected 1048576"));
  // gain= and rotate= need codebooks trained for them, with a rotation and mean per layer, head and tensor
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,gain=k"), good),
                    Catch::Contains("codebooks are for gain=off (unit-vector training), the method needs gain=k"));
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("antkv:bits=1,rotate=pca"), good),
                    Catch::Contains("codebooks are for rotate=off, the method needs rotate=pca"));
  const MethodSpec mr = method("antkv:bits=1,gain=kv,rotate=pca");
  auto rotated = make_codebooks(cfg, mr, calib, 1);
  CHECK_NOTHROW(make_gpu_kv_quantizer(cfg, mr, rotated));
  bad = std::make_shared<CodebookSet>(*rotated);
  bad->values[1].rotation.resize(bad->values[1].rotation.size() - 1);
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, mr, bad), Catch::Contains("layer 1 value rotation / mean hold"));
  bad = std::make_shared<CodebookSet>(*rotated);
  bad->keys[0].mean.clear();
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, mr, bad), Catch::Contains("layer 0 key rotation / mean hold"));
  CHECK_NOTHROW(make_gpu_kv_quantizer(cfg, method("rsq:bits=3"), nullptr));  // training-free: no codebooks
  CHECK_THROWS_WITH(make_gpu_kv_quantizer(cfg, method("uniform:bits=2,group=96"), nullptr),
                    Catch::Contains("must divide head_dim"));
}



// ---- 5. the compressed cache (real) against the simulated quantizer ----
// The same method, codebooks and prompt through GpuRuntime with the simulated quantizer (bf16 arena holding
// dequantized values) and with the compressed cache (compressed_kv: codes, anchors, FP16 window; decode by
// quant_decode). Prefill: the compressed runtime's prefill attention is the simulated one by construction
// (the quantizer rewrites the chunk's own K/V), so its NLL is bit-identical. Decode (150 steps, so 22 tokens
// leave the 128-token window and are quantized on the GPU): the two differ only in rounding: the arena holds
// bf16 (2^-9 relative) of values the compressed cache keeps in fp16 (2^-12), and quant_decode sums
// lookup-table scores in fp32 and value weights in dithered 16-bit fixed point (relative error ~2^-14 per
// weight, unbiased). So they are held to the bf16 floor of test 2 (fp16 there: logits within 2e-2 of max
// |logit|, |dNLL| mean <= 0.03 and max <= 0.15 nats; on random tokens the predictions are flat and a
// bf16-sized change moves single NLLs by ~0.1). Measured on an H200: logits 9.6e-3 / 2.0e-2 / 1.2e-2, |dNLL|
// mean 0.013 / 0.016 / 0.015, max 0.049 / 0.096 / 0.076 (vq 1 bit / antkv 1 bit / vq 0.5 bit). Every cache slot is poisoned first
// (fp16 NaN, codes 0xFF) so that a read past the counts shows as NaN. decode_batch (a captured CUDA graph
// after the first steps) must give bit-identical logits to forward() of one token, step by step. Pre-RoPE
// keys (antkv key_rope=pre) go through the dequantize-rotate-dot kernel: the same bounds hold.
TEST_CASE("GPU compressed KV cache: prefill + decode equal the simulated quantizer, decode_batch equals forward", "[gpu][quant][shared]") {
  SKIP_WITHOUT_GPU();
  Models& mod = ref_model();
  const ModelConfig& cfg = mod.ckpt.config();
  const auto seq = random_prompt(250, cfg.vocab_size, 777);
  const int P = 100;
  // Both caches run decode-time anchors where the method does (the two promote-on cases): the simulated cache's
  // running scores come from fp32 attention rows over its bf16 arena, the compressed cache's from quant_decode's
  // own scores, so the anchors they keep are compared too. 2 and 4 bits (c4b8, c2b8) decode through the
  // dequantize-dot kernel.
  for (const std::string text : {"vq:bits=1", "antkv:bits=1,ratio=0.05,promote=off", "vq:bits=0.5",
                                 "antkv:bits=1,ratio=0.05,key_rope=pre,promote=off", "antkv:bits=1,ratio=0.05",
                                 "antkv:bits=1,ratio=0.05,key_rope=pre", "vq:bits=2",
                                 "antkv:bits=4,ratio=0.05,key_rope=pre,promote=off",
                                 // the coded transform (gain, rotate) and metric=task
                                 "vq:bits=1,gain=kv,rotate=pca", "antkv:bits=1,ratio=0.05,gain=kv,rotate=pca",
                                 "vq:bits=1,metric=task", "antkv:bits=0.5,ratio=0.05,gain=k,metric=task,promote=off",
                                 // per-layer widths (antkv-ref-18m has 6 layers)
                                 "vq:lkbits=1/0.5/1/0.75/1/1,lvbits=1/0.5/1/0.75/1/1,gain=kv,rotate=pca",
                                 "antkv:bits=1,ratio=0.05,anchors=v,promote=off,gain=kv,rotate=pca",
                                 // one tensor's anchors with decode-time anchors
                                 "antkv:bits=1,ratio=0.05,anchors=k", "antkv:bits=1,ratio=0.05,anchors=v,gain=kv,rotate=pca",
                                 // per-layer ratios (antkv-ref-18m has 6 layers)
                                 "antkv:bits=1,lratio=0.1/0.05/0.02/0.05/0.1/0.05",
                                 // RoPE-commuting key codebooks (commute_decode)
                                 "vq:bits=1,key_rope=commute", "antkv:bits=1,ratio=0.05,key_rope=commute", "vq:bits=2,key_rope=commute"}) {
    SECTION(text) {
      const MethodSpec m = method(text);
      auto cb = make_codebooks(cfg, m, mod.calib, 7);
      GpuRuntimeOptions so;
      so.max_context = 512;
      GpuRuntime sim(mod.ckpt, so);
      sim.set_kv_quantizer(make_gpu_kv_quantizer(cfg, m, cb));
      auto make_real = [&] {
        GpuRuntimeOptions ro = so;
        ro.compressed_kv = true;
        auto rt = std::make_unique<GpuRuntime>(mod.ckpt, ro);
        auto cache = std::make_unique<GpuCompressedKvCache>(cfg, m, *cb, 1, rt->capacity(), 128);
        cache->poison();
        rt->set_compressed_cache(std::move(cache));
        rt->set_kv_quantizer(make_gpu_kv_quantizer(cfg, m, cb));
        return rt;
      };
      auto real = make_real();
      auto batched = make_real();
      std::vector<int32_t> targets(seq.begin() + 1, seq.end());
      targets.push_back(-1);
      ForwardRequest req;
      req.logits = LogitsMode::kLast;
      ForwardResult rs, rr, rb;
      double worst_logit = 0, worst_nll = 0, sum_nll = 0, nll_real = 0, nll_sim = 0;
      int steps = 0;
      for (int p = 0; p < static_cast<int>(seq.size());) {
        const int n = p == 0 ? P : 1;
        req.tokens = seq.data() + p;
        req.targets = targets.data() + p;
        req.n_tokens = n;
        sim.forward(req, rs);
        real->forward(req, rr);
        if (p == 0) {
          batched->forward(req, rb);
          REQUIRE(rr.nll.size() == static_cast<size_t>(P));
          CHECK(std::memcmp(rr.nll.data(), rs.nll.data(), P * sizeof(float)) == 0);
          CHECK(std::memcmp(rr.logits.data(), rs.logits.data(), rs.logits.size() * sizeof(float)) == 0);
          for (int l = 0; l < cfg.num_layers; ++l) {  // lratio: each layer its own anchors
            const auto& st = real->compressed_cache()->state(0, l);
            CHECK(st.n_anchor == (m.kind == MethodKind::kAntkv ? static_cast<int>(std::ceil(m.ratio_of(l) * P)) : 0));
            CHECK(st.n_quant == P - st.n_anchor);
          }
        } else {
          std::vector<float> lb;
          batched->decode_batch({seq[p]}, &lb, nullptr);
          REQUIRE(lb.size() == rr.logits.size());
          CHECK(std::memcmp(lb.data(), rr.logits.data(), lb.size() * sizeof(float)) == 0);
          REQUIRE(std::isfinite(rr.nll[0]));
          const double e = test::max_rel_error(rr.logits.data(), rs.logits.data(), rs.logits.size());
          REQUIRE(std::isfinite(rr.nll[0]));
          worst_logit = std::max(worst_logit, e);
          if (p + 1 < static_cast<int>(seq.size())) {
            const double dn = std::fabs(static_cast<double>(rr.nll[0]) - rs.nll[0]);
            worst_nll = std::max(worst_nll, dn);
            sum_nll += dn;
            nll_real += rr.nll[0];
            nll_sim += rs.nll[0];
            ++steps;
          }
        }
        p += n;
      }
      const int len = static_cast<int>(seq.size());
      int64_t same = 0, total = 0;  // anchors of the compressed cache that the simulated one keeps too
      for (int l = 0; l < cfg.num_layers; ++l) {
        const auto& st = real->compressed_cache()->state(0, l);  // lratio: each layer its own counts
        CHECK(st.n_window == 128);
        CHECK(st.n_anchor == (m.kind != MethodKind::kAntkv ? 0
                              : static_cast<int>(std::ceil(m.ratio_of(l) * (m.promotes() ? len : P)))));
        CHECK(st.n_quant == len - 128 - st.n_anchor);
        CHECK(st.length() == len);
        const auto pos = real->compressed_cache()->anchor_positions(l, 0);  // [KV][n_anchor]
        const auto& flags = sim.kv_quantizer()->anchor_flags(l);            // [len, KV]
        for (int h = 0; h < cfg.num_kv_heads; ++h)
          for (int i = 0; i < st.n_anchor; ++i) {
            const int t = pos[static_cast<size_t>(h) * st.n_anchor + i];
            same += flags[static_cast<size_t>(t) * cfg.num_kv_heads + h];
            ++total;
          }
      }
      WARN(fmt::format("{}: compressed vs simulated over {} decode steps: logits rel err max {:.2e}, |dNLL| mean {:.2e} "
                       "max {:.2e}; anchors the same {} of {}",
                       text, steps, worst_logit, sum_nll / steps, worst_nll, same, total));
      const std::string label = "test_gpu_quant: compressed vs simulated " + text;
      if (total > 0) report_measured(label + " anchors same share (at least)", double(same) / total, 0.95);
      // Logits within the bf16 floor (2e-2) while both caches keep the same anchors. With decode-time anchors their
      // running scores come from two different attentions, so a near-tie may keep another token (up to 5% above):
      // that token is FP16 in one cache and 1-bit in the other, a larger change than bf16 rounding; 2.5e-2 then.
      // Measured on an H100 (2026-12-07): antkv anchors=k 2.0006e-2 with 155 of 156 anchors the same (its ppl
      // 3.3e-3); every run whose anchors all agree at most 1.8e-2.
      const double logit_bound = same == total ? 2e-2 : 2.5e-2;
      report_measured(label + " worst logits rel err", worst_logit, logit_bound);
      report_measured(label + " mean |dNLL|", sum_nll / steps, 0.03);
      report_measured(label + " max |dNLL|", worst_nll, 0.15);
      // the decode steps' perplexity (what eval.decode_from measures) through the real cache against the simulated,
      // within 0.5%; measured on an H100 (2026-12-07): 6.9e-4 .. 4.7e-3 over this list (vq:bits=1,gain=kv,rotate=pca
      // 1.1e-3, antkv gain=kv,rotate=pca 1.8e-3, metric=task 3.6e-3, per-layer widths 1.5e-3, anchors=v 2.1e-3;
      // decode-time anchors with anchors=k 3.3e-3, anchors=v,gain=kv,rotate=pca 2.1e-3, lratio 3.5e-3; vq:bits=2,
      // key_rope=commute 4.7e-3)
      const double ppl_rel = std::fabs(std::expm1((nll_real - nll_sim) / steps));
      report_measured(label + " decode ppl rel diff", ppl_rel, 5e-3);
      CHECK(ppl_rel <= 5e-3);
      CHECK(same >= 0.95 * total);
      CHECK(worst_logit <= logit_bound);
      CHECK(sum_nll / steps <= 0.03);
      CHECK(worst_nll <= 0.15);
    }
  }
}

// Decode-time anchors (design note §2) on random inputs, against the CPU reference cache step by step: head_dim
// 64 and 128 (the running-score kernel's closed set, quant_decode's), post- and pre-RoPE keys, 3 query heads per KV head, window 16, ratio 0.05, a
// 37-token prefill and 110 decode steps (the budget grows from 2 to 8 per head; the rest are swaps). Both caches
// see the same fp32 K/V and the same bf16-representable queries; the GPU's running scores come from its own
// attention (lookup-table scores, bf16 output, fp32 sums) and the CPU's from double sums over its dequantized
// cache, so near-ties may decide differently: anchors must agree on >= 90% of (layer, head, token) entries and
// the scores of common anchors within 2% (measured: see the WARN line; on an H100, 2026-12-07, every anchor the
// same in all 10 runs, scores within 3.3e-3, but anchors=v at head_dim 128 1.4e-2: its anchor keys are fp16
// decoded centroids against the CPU's fp32 ones, and the running score of a weak anchor sums small differences).
TEST_CASE("GPU compressed KV cache: decode-time anchors and running scores follow QuantizedKvCache (head_dim 64 and 128, post- and pre-RoPE)", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  // pre: displaced anchors are quantized from their pre-RoPE copy; anchors=k|v: from the exact copy of the tensor
  // whose anchor slots hold dequantized rows (the promoted token's other tensor is coded at promotion)
  // lratio: layer 0 keeps ratio 0.1, layer 1 none (synthetic_config has 2 layers)
  for (const std::string rope : {"post", "pre", "post,anchors=k", "post,anchors=v", "post,lratio=0.1/0"})
  for (const int d : {64, 128}) {
    INFO("head_dim " << d << ", " << rope << "-RoPE keys");
    ModelConfig cfg = synthetic_config();
    cfg.head_dim = d, cfg.num_heads = 6, cfg.num_kv_heads = 2;
    const int H = cfg.num_heads, KV = cfg.num_kv_heads, kvd = cfg.kv_dim(), P = 37, steps = 110, W = 16;
    const int T = P + steps;
    const MethodSpec m = method("antkv:bits=1,ratio=0.05,key_rope=" + rope);
    auto cb = make_codebooks(cfg, m, synthetic_acts(cfg, 400, 21), 5);
    auto acts = synthetic_acts(cfg, T, 22);
    for (auto& a : acts)
      for (auto& x : a.q) x = __bfloat162float(__float2bfloat16_rn(x));  // the GPU reads bf16 queries
    QuantizedKvCache cpu(cfg, with_window(m, W), cb);
    GpuCompressedKvCache gpu(cfg, m, *cb, 1, T, W);
    gpu.poison();
    cudaStream_t stream;
    ANTKV_CUDA_CHECK(cudaStreamCreate(&stream));
    struct Dev {
      DeviceBuffer<float> k, v, kpre;
      DeviceBuffer<bf16> q;
    };
    std::vector<Dev> dev(cfg.num_layers);
    for (int l = 0; l < cfg.num_layers; ++l) {
      dev[l].k.resize(acts[l].k_post.size()), dev[l].v.resize(acts[l].v.size()), dev[l].kpre.resize(acts[l].k_pre.size());
      ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].k.get(), acts[l].k_post.data(), acts[l].k_post.size() * 4, cudaMemcpyHostToDevice));
      ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].v.get(), acts[l].v.data(), acts[l].v.size() * 4, cudaMemcpyHostToDevice));
      ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].kpre.get(), acts[l].k_pre.data(), acts[l].k_pre.size() * 4, cudaMemcpyHostToDevice));
      std::vector<bf16> qb(acts[l].q.size());
      for (size_t i = 0; i < qb.size(); ++i) qb[i] = __float2bfloat16_rn(acts[l].q[i]);
      dev[l].q.resize(qb.size());
      ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].q.get(), qb.data(), qb.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    }
    DeviceBuffer<bf16> out(static_cast<size_t>(H) * d);
    // prefill: the CPU cache picks the anchors; the GPU takes its flags and scores
    for (int l = 0; l < cfg.num_layers; ++l) {
      cpu.append(KvAppend{l, P, 0, acts[l].k_pre.data(), acts[l].k_post.data(), acts[l].v.data(), acts[l].q.data()});
      const std::vector<float> score(cpu.running_scores(l).begin(), cpu.running_scores(l).end());
      gpu.write_prefill(l, 0, P, dev[l].k.get(), kvd, dev[l].v.get(), kvd, dev[l].kpre.get(), kvd, cpu.anchor_flags(l).data(),
                        score.data(), stream);
    }
    gpu.commit_prefill(0, P);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int t = P; t < T; ++t) {
      gpu.plan_step(1, stream);
      const cuda::QuantDecodePlan plan = gpu.plan(1, H);
      for (int l = 0; l < cfg.num_layers; ++l) {
        const size_t r = static_cast<size_t>(t) * kvd;
        cpu.append(KvAppend{l, 1, t, acts[l].k_pre.data() + r, acts[l].k_post.data() + r, acts[l].v.data() + r,
                            acts[l].q.data() + static_cast<size_t>(t) * H * d});
        gpu.append(l, 1, dev[l].k.get() + r, dev[l].v.get() + r, kvd, dev[l].kpre.get() + r, stream);
        gpu.attend(l, 1, H, dev[l].q.get() + static_cast<size_t>(t) * H * d, out.get(), plan, scale, stream);
      }
      ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    int same = 0, total = 0, scored = 0;
    double worst_score = 0;
    for (int l = 0; l < cfg.num_layers; ++l) {
      const int A = gpu.state(0, l).n_anchor;
      REQUIRE(A == static_cast<int>(std::ceil(m.ratio_of(l) * T)));  // lratio: the layer's own budget
      if (A == 0) {  // a layer without anchors: the CPU keeps none either
        for (const uint8_t f : cpu.anchor_flags(l)) CHECK(f == 0);
        continue;
      }
      const auto pos = gpu.anchor_positions(l, 0);
      const auto sc = gpu.anchor_running_scores(l, 0);
      REQUIRE(pos.size() == static_cast<size_t>(KV) * A);
      for (int h = 0; h < KV; ++h) {
        int cpu_count = 0;
        for (int x = 0; x < T; ++x) cpu_count += cpu.anchor_flags(l)[static_cast<size_t>(x) * KV + h];
        CHECK(cpu_count == A);
        for (int a = 0; a < A; ++a) {
          const int x = pos[static_cast<size_t>(h) * A + a];
          REQUIRE(x >= 0);
          REQUIRE(x < T - W);
          ++total;
          if (!cpu.anchor_flags(l)[static_cast<size_t>(x) * KV + h]) continue;
          ++same;
          const double want = cpu.running_scores(l)[static_cast<size_t>(x) * KV + h];
          const double got = sc[static_cast<size_t>(h) * A + a];
          REQUIRE(std::isfinite(got));
          worst_score = std::max(worst_score, std::fabs(got - want) / std::max(1e-6, std::fabs(want)));
          ++scored;
        }
      }
    }
    ANTKV_CUDA_CHECK(cudaStreamDestroy(stream));
    WARN(fmt::format("head_dim {}, {}-RoPE: {} of {} GPU anchors are CPU anchors; running scores of those within {:.2e} "
                     "relative", d, rope, same, total, worst_score));
    const std::string label = fmt::format("test_gpu_quant: decode-time anchors head_dim {} {}-RoPE", d, rope);
    report_measured(label + " same share (at least)", double(same) / total, 0.9);
    report_measured(label + " worst running score rel err", worst_score, 2e-2);
    CHECK(same >= 0.9 * total);
    CHECK(worst_score <= 2e-2);
  }
}

// gain=, rotate=pca, metric=task, per-layer widths and anchors=k|v on the compressed cache, post- and pre-RoPE keys
// (key_rope=pre: each coded key mapped back through the basis, then rotated to its position; key_rope=commute with
// gain: the key's scale after the codeword lookups), against the CPU
// reference cache step by step: the CPU
// cache (QuantizedKvCache, decode window W) codes each token as quantize_head does, and attention over its
// dequantized rows (cpu::attention) is the reference; the GPU cache codes at prefill and at append
// (encode_rows_kernel, quantize_kv) and decodes through quant_decode's coded transform (query rotated once per
// step and head, per-token scales, values rotated back in the reduction). head_dim 64 and 128, GQA 1/4/8, an odd
// 77-token prefill (antkv: the CPU's anchors) and 23 decode steps with a 16-token window (7 tokens leave it and are
// coded at append); every cache slot poisoned first; each step's attention replayed from a captured CUDA graph
// equals the eager one bit for bit. The test rounds the centroids to fp16, so both sides decode the same vectors
// from the same fp16 K/V. What differs: the bf16 output (2^-9 relative), the fp16 per-token scale against the
// CPU's float norm / |u| (2^-12 relative per vector), the fp32 query rotation (the CPU's attention sums in
// double), the dithered fixed-point weights (unbiased, ~2^-14 of a tile's largest), and a near-tie code where the
// GPU's tree-summed norm or fp32 sums round differently. Held to 2e-2 of max |out|; measured on an H100
// (2026-12-07): at most 5.5e-3 over the 78 (method, head_dim, GQA) runs.
TEST_CASE("GPU compressed KV cache: gain=, rotate=pca, metric=task, per-layer widths and anchors=k|v follow QuantizedKvCache (head_dim 64/128, GQA 1/4/8, eager = graph)",
          "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  // (synthetic_config has 2 layers: the per-layer widths give each its own configuration)
  const std::vector<std::string> methods = {"vq:bits=1,gain=kv,rotate=pca", "antkv:bits=1,ratio=0.05,gain=k,promote=off",
                                            "vq:bits=1,metric=task", "vq:bits=0.75,rotate=pca",
                                            "antkv:bits=0.5,ratio=0.05,gain=kv,rotate=pca,metric=task,promote=off",
                                            "vq:lkbits=1/0.5,lvbits=1/0.5",
                                            "antkv:ratio=0.05,lkbits=0.75/1,lvbits=0.75/1,gain=kv,rotate=pca,promote=off",
                                            // one tensor's anchors: the other's quantized at the prefill
                                            "antkv:bits=1,ratio=0.05,anchors=k,promote=off,gain=kv,rotate=pca",
                                            "antkv:bits=1,ratio=0.05,anchors=v,promote=off,metric=task",
                                            // and at decode-time promotions (the budget grows from 4 to 5 when the
                                            // first token leaves the window, the other 6 leaving tokens may swap
                                            // with the weakest anchor, which is then coded from its exact copy)
                                            "antkv:bits=1,ratio=0.05,anchors=k,gain=kv,rotate=pca",
                                            "antkv:bits=1,ratio=0.05,anchors=v,metric=task",
                                            // per-layer ratios: 8 and 2 anchors at the prefill, budgets 10 and 2
                                            "antkv:bits=1,lratio=0.1/0.02,gain=kv,rotate=pca",
                                            "antkv:bits=1,lratio=0.1/0.02,promote=off",
                                            // pre-RoPE keys with scales and bases: the best method's pre-RoPE form
                                            "vq:bits=1,gain=kv,rotate=pca,key_rope=pre",
                                            "antkv:bits=0.5,ratio=0.05,gain=k,key_rope=pre,promote=off",
                                            // RoPE-commuting keys with scales (the key's after the lookups)
                                            "vq:bits=1,gain=kv,key_rope=commute",
                                            "antkv:bits=1,ratio=0.05,gain=k,key_rope=commute,promote=off",
                                            // keys and values of different configurations (dequantize-dot with
                                            // run-time widths), the coded transform at c4b8, 8-bit norms: the
                                            // best 1-bit method's form (layer 0 c8b8 / c16b8, layer 1 c4b8 / c4b8)
                                            "vq:kbits=1,vbits=0.5",
                                            "vq:gain=kv,rotate=pca,norm=fp8,metric=task,lkbits=1/2,lvbits=0.5/2",
                                            "vq:bits=1,gain=kv,rotate=pca,norm=fp8",
                                            // 12- and 6-bit codes read at run time; decode-time anchors
                                            "antkv:ratio=0.05,lkbits=2/0.75,lvbits=1/0.375,gain=k,promote=off",
                                            "antkv:kbits=0.5,vbits=1,ratio=0.05,gain=kv,rotate=pca",
                                            // pre-RoPE keys of another width than the values'
                                            "vq:kbits=1,vbits=2,gain=kv,rotate=pca,key_rope=pre",
                                            "antkv:ratio=0.05,lkbits=2/1,lvbits=0.5/1,key_rope=pre,promote=off"};
  for (const int d : {64, 128})
    for (const std::string& text : methods) {
      ModelConfig base = synthetic_config();
      base.head_dim = d, base.num_kv_heads = 2, base.num_heads = 2;
      const MethodSpec m = method(text);
      auto cb = make_codebooks(base, m, synthetic_acts(base, 400, 31), 9);
      for (auto* side : {&cb->keys, &cb->values})  // fp16 centroids on both sides (the GPU cache keeps fp16)
        for (auto& lc : *side)
          for (auto& x : lc.centroids) x = round_fp16(x);
      for (const int G : {1, 4, 8}) {
        INFO(fmt::format("{}, head_dim {}, {} query heads per KV head", text, d, G));
        ModelConfig cfg = base;
        cfg.num_heads = 2 * G;
        const int H = cfg.num_heads, KV = cfg.num_kv_heads, kvd = cfg.kv_dim(), P = 77, steps = 23, W = 16;
        const int T = P + steps;
        auto acts = synthetic_acts(cfg, T, 32 + G);
        for (auto& a : acts)
          for (auto& x : a.q) x = __bfloat162float(__float2bfloat16_rn(x));  // the GPU reads bf16 queries
        QuantizedKvCache cpu(cfg, with_window(m, W), cb);
        GpuCompressedKvCache gpu(cfg, m, *cb, 1, T, W);
        REQUIRE(gpu.coded_transform() == (m.gain != Gain::kOff || m.rotate != Rotate::kOff));
        gpu.poison();
        cudaStream_t stream;
        ANTKV_CUDA_CHECK(cudaStreamCreate(&stream));
        struct Dev {
          DeviceBuffer<float> k, v, kpre;
          DeviceBuffer<bf16> q;
        };
        std::vector<Dev> dev(cfg.num_layers);
        for (int l = 0; l < cfg.num_layers; ++l) {
          dev[l].k.resize(acts[l].k_post.size()), dev[l].v.resize(acts[l].v.size()), dev[l].kpre.resize(acts[l].k_pre.size());
          ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].k.get(), acts[l].k_post.data(), acts[l].k_post.size() * 4, cudaMemcpyHostToDevice));
          ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].v.get(), acts[l].v.data(), acts[l].v.size() * 4, cudaMemcpyHostToDevice));
          ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].kpre.get(), acts[l].k_pre.data(), acts[l].k_pre.size() * 4, cudaMemcpyHostToDevice));
          std::vector<bf16> qb(acts[l].q.size());
          for (size_t i = 0; i < qb.size(); ++i) qb[i] = __float2bfloat16_rn(acts[l].q[i]);
          dev[l].q.resize(qb.size());
          ANTKV_CUDA_CHECK(cudaMemcpy(dev[l].q.get(), qb.data(), qb.size() * sizeof(bf16), cudaMemcpyHostToDevice));
        }
        DeviceBuffer<bf16> out(static_cast<size_t>(H) * d), replay(out.size());
        for (int l = 0; l < cfg.num_layers; ++l) {
          cpu.append(KvAppend{l, P, 0, acts[l].k_pre.data(), acts[l].k_post.data(), acts[l].v.data(), acts[l].q.data()});
          // decode-time anchors: the running scores start from the CPU's
          const std::vector<float> score(cpu.running_scores(l).begin(), cpu.running_scores(l).end());
          gpu.write_prefill(l, 0, P, dev[l].k.get(), kvd, dev[l].v.get(), kvd, dev[l].kpre.get(), kvd,
                            m.has_anchors() ? cpu.anchor_flags(l).data() : nullptr,
                            m.promotes() ? score.data() : nullptr, stream);
        }
        gpu.commit_prefill(0, P);
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));
        double worst = 0;
        int graph_diff = 0;
        for (int t = P; t < T; ++t) {
          gpu.plan_step(1, stream);
          const cuda::QuantDecodePlan plan = gpu.plan(1, H);
          for (int l = 0; l < cfg.num_layers; ++l) {
            const size_t r = static_cast<size_t>(t) * kvd;
            const float* q = acts[l].q.data() + static_cast<size_t>(t) * H * d;
            cpu.append(KvAppend{l, 1, t, acts[l].k_pre.data() + r, acts[l].k_post.data() + r, acts[l].v.data() + r, q});
            gpu.append(l, 1, dev[l].k.get() + r, dev[l].v.get() + r, kvd, dev[l].kpre.get() + r, stream);
            const bf16* dq = dev[l].q.get() + static_cast<size_t>(t) * H * d;
            gpu.attend(l, 1, H, dq, out.get(), plan, scale, stream);
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            ANTKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            gpu.attend(l, 1, H, dq, replay.get(), plan, scale, stream);
            ANTKV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
            ANTKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
            ANTKV_CUDA_CHECK(cudaGraphLaunch(exec, stream));
            ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
            ANTKV_CUDA_CHECK(cudaGraphExecDestroy(exec));
            ANTKV_CUDA_CHECK(cudaGraphDestroy(graph));
            const auto got = test::download_bf(out.get(), out.size());
            const auto again = test::download_bf(replay.get(), replay.size());
            graph_diff += std::memcmp(got.data(), again.data(), got.size() * sizeof(float)) != 0;
            std::vector<float> want(static_cast<size_t>(H) * d);
            cpu::attention(q, cpu.keys(l), cpu.values(l), want.data(), nullptr, 1, t + 1, H, KV, d, scale);
            for (float x : got) REQUIRE(std::isfinite(x));
            worst = std::max(worst, test::max_rel_error(got.data(), want.data(), want.size()));
          }
        }
        ANTKV_CUDA_CHECK(cudaStreamDestroy(stream));
        for (int l = 0; l < cfg.num_layers; ++l) {  // each layer's counts (lratio: its own budget)
          const auto& st = gpu.state(0, l);
          CHECK(st.n_window == W);
          CHECK(st.n_quant == T - W - st.n_anchor);
          CHECK(st.n_anchor ==
                (!m.has_anchors() ? 0 : static_cast<int>(std::ceil(m.ratio_of(l) * (m.promotes() ? T : P)))));
          if (!m.promotes()) continue;
          // the GPU keeps the CPU's anchors (their rows are what the outputs are compared over)
          const auto pos = gpu.anchor_positions(l, 0);
          for (int h = 0; h < KV; ++h)
            for (int a = 0; a < st.n_anchor; ++a)
              CHECK(cpu.anchor_flags(l)[static_cast<size_t>(pos[static_cast<size_t>(h) * st.n_anchor + a]) * KV + h] == 1);
        }
        CHECK(graph_diff == 0);
        CHECK_MEASURED(fmt::format("test_gpu_quant: compressed {} d {} G {} vs CPU reference cache worst output rel err",
                                   text, d, G),
                       worst, 2e-2);
      }
    }
}

TEST_CASE("GPU compressed KV cache: unsupported methods and chunked prefill are errors naming the problem", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const ModelConfig cfg = synthetic_config();
  std::vector<LayerActs> acts(cfg.num_layers);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> n01(0.f, 1.f);
  for (auto& a : acts) {
    a.k_pre.resize(64 * cfg.kv_dim()), a.k_post.resize(64 * cfg.kv_dim()), a.v.resize(64 * cfg.kv_dim());
    for (auto* v : {&a.k_pre, &a.k_post, &a.v})
      for (auto& x : *v) x = n01(rng);
  }
  const MethodSpec m = method("antkv:bits=1");
  auto cb = make_codebooks(cfg, m, acts, 1);
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:bits=1,anchors=v,key_rope=pre"), *cb, 1, 64, 8),
                    Catch::Contains("anchors=v (one tensor only) runs on the compressed cache with post-RoPE keys"));
  CHECK_NOTHROW(GpuCompressedKvCache(cfg, method("antkv:bits=1,anchors=k,promote=off"), *cb, 1, 64, 8));
  CHECK_NOTHROW(GpuCompressedKvCache(cfg, method("antkv:bits=1,anchors=k"), *cb, 1, 64, 8));
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:bits=1,key_rope=pre"), *cb, 1, 64, 8),
                    Catch::Contains("codebooks are for post-RoPE keys, the method needs pre-RoPE"));
  // gain= and rotate=pca run with post- and pre-RoPE keys on the lookup-table configurations; codebooks must be
  // trained for the options (check_codebooks_fit)
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:bits=1,rotate=pca"), *cb, 1, 64, 8),
                    Catch::Contains("codebooks are for rotate=off, the method needs rotate=pca"));
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("vq:bits=1,metric=task"), *cb, 1, 64, 8),
                    Catch::Contains("codebooks are for metric=plain, the method needs metric=task"));
  const MethodSpec pre_gain = method("antkv:bits=1,gain=kv,rotate=pca,key_rope=pre");
  CHECK_NOTHROW(GpuCompressedKvCache(cfg, pre_gain, *make_codebooks(cfg, pre_gain, acts, 1), 1, 64, 8));
  const MethodSpec commute_gain = method("antkv:bits=1,gain=k,key_rope=commute");
  CHECK_NOTHROW(GpuCompressedKvCache(cfg, commute_gain, *make_codebooks(cfg, commute_gain, acts, 1), 1, 64, 8));
  const MethodSpec two_bit = method("vq:bits=2,gain=k");  // dequantize-dot with run-time widths
  CHECK_NOTHROW(GpuCompressedKvCache(cfg, two_bit, *make_codebooks(cfg, two_bit, acts, 1), 1, 64, 8));
  const MethodSpec two_commute = method("vq:bits=2,gain=k,key_rope=commute");
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, two_commute, *make_codebooks(cfg, two_commute, acts, 1), 1, 64, 8),
                    Catch::Contains("key_rope=commute with gain= runs on the compressed cache's lookup-table widths (bits "
                                    "1, 0.75, 0.5, 0.375), not c4b8"));
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:bits=1,correct=on"), *cb, 1, 64, 8),
                    Catch::Contains("correct=on is not implemented in the compressed cache"));
  // keys and values of different widths run (each tensor its own codebooks, which must be the method's)
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:kbits=1,vbits=0.5"), *cb, 1, 64, 8),
                    Catch::Contains("codebooks are keys c8b8 / values c8b8, the method needs c8b8 / c16b8"));
  const MethodSpec two_widths = method("antkv:kbits=1,vbits=0.5");
  {
    const GpuCompressedKvCache tw(cfg, two_widths, *make_codebooks(cfg, two_widths, acts, 1), 1, 64, 8);
    CHECK(tw.widths(0).keys == cuda::VqKernelConfig::kC8B8);
    CHECK(tw.widths(0).values == cuda::VqKernelConfig::kC16B8);
  }
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("vq:kbits=1,vbits=0.5,key_rope=commute"), *cb, 1, 64, 8),
                    Catch::Contains("key_rope=commute with kbits != vbits (c8b8 / c16b8) is not implemented"));
  // per-layer ratios give each layer its own anchor capacity; a list of the wrong length is an error before any
  // configuration is read
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:lkbits=1/1/1,lvbits=1/1/1"), *cb, 1, 64, 8),
                    Catch::Contains("lkbits/lvbits/lratio list 3 layers, the model has 2"));
  CHECK_NOTHROW(GpuCompressedKvCache(cfg, method("antkv:bits=1,lvbits=1/1"), *cb, 1, 64, 8));
  {
    const GpuCompressedKvCache lr(cfg, method("antkv:bits=1,lratio=0.1/0"), *cb, 1, 64, 8);
    CHECK(lr.anchor_capacity(0) == 8);  // ceil(0.1 * 64) + 1
    CHECK(lr.anchor_capacity(1) == 0);
    CHECK(lr.anchor_capacity() == 8);
  }
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:bits=1.5"), *make_codebooks(cfg, method("antkv:bits=1.5"), acts, 1), 1, 64, 8),
                    Catch::Contains("c8b12 is not one of the compressed cache's configurations"));
  CHECK_THROWS_WITH(GpuCompressedKvCache(cfg, method("antkv:bits=0.5"), *cb, 1, 64, 8),
                    Catch::Contains("codebooks are keys c8b8 / values c8b8, the method needs c16b8 / c16b8"));
  // a second prefill chunk into a sequence that holds tokens
  GpuRuntimeOptions ro;
  ro.max_context = 64;
  ro.compressed_kv = true;
  GpuRuntime rt(cfg, 5, ro);
  rt.set_compressed_cache(std::make_unique<GpuCompressedKvCache>(cfg, m, *cb, 1, 64, 8));
  rt.set_kv_quantizer(make_gpu_kv_quantizer(cfg, m, cb));
  std::vector<int32_t> ids = {1, 5, 7, 9, 11, 13};
  ForwardRequest req;
  ForwardResult res;
  req.tokens = ids.data();
  req.n_tokens = 4;
  req.logits = LogitsMode::kLast;
  rt.forward(req, res);
  req.tokens = ids.data() + 4;
  req.n_tokens = 2;
  CHECK_THROWS_WITH(rt.forward(req, res), Catch::Contains("prefill over the compressed cache is one chunk into an empty sequence"));
  req.n_tokens = 1;  // a decode step works
  rt.forward(req, res);
  CHECK(rt.compressed_cache()->state(0).length() == 5);
  CHECK(std::isfinite(res.logits.at(0)));
  // the simulated cache runs decode-time anchors too (window 2 here)
  GpuRuntimeOptions so;
  so.max_context = 64;
  GpuRuntime sim(cfg, 5, so);
  sim.set_kv_quantizer(make_gpu_kv_quantizer(cfg, m, cb, /*decode_window=*/2));
  const std::vector<int32_t> more = {1, 5, 7, 9, 11, 13, 15};
  req.tokens = more.data();
  req.n_tokens = 4;
  sim.forward(req, res);
  req.n_tokens = 1;
  for (int p = 4; p < 6; ++p) {  // tokens 4 and 5 wait in the window
    req.tokens = more.data() + p;
    sim.forward(req, res);
  }
  // token 4 leaves: the budget ceil(0.01 x 7) = 1 per head is token 0's and no other anchor can be displaced,
  // so it is quantized
  req.tokens = more.data() + 6;
  sim.forward(req, res);
  CHECK(std::isfinite(res.logits.at(0)));
  for (int l = 0; l < cfg.num_layers; ++l) {
    const auto& f = sim.kv_quantizer()->anchor_flags(l);  // [7, KV]
    REQUIRE(f.size() == static_cast<size_t>(7) * cfg.num_kv_heads);
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      int n = 0;
      for (int t = 0; t < 7; ++t) n += f[static_cast<size_t>(t) * cfg.num_kv_heads + h];
      CHECK(f[static_cast<size_t>(h)] == 1);
      CHECK(n == 1);
    }
  }
}

#endif
