// The packed-integer KIVI cache on the GPU (kernels/quant/uniform_cache.h): its group quantization (decode appends
// and a prefill) against the CPU reference's uniform_quantize on the same fp16 rows, perplexity through it in the
// runtime against the simulated path (antkv-ref-18m), and its decode attention against a CPU reference
// that dequantizes with the same fp16 scales and zeros (softmax in double). Fresh random inputs each run (the
// seed is printed on failure); odd lengths, partial key groups, windows, batch 3 with different lengths, GQA
// 1, 4, 7, 8 and 12 (12: two blocks of query heads, the second half empty), head_dim 64 and 128, bits 2 and 4; every slot poisoned (NaN scales/zeros and residual rows, 0xFF
// codes) before it is written, so a read past the counts shows as NaN.
//
// Tolerances (max |gpu - ref| / max |ref|):
//  - output 1e-2: it is bf16 (2^-9 relative rounding) of an fp32 softmax (flash_decode's and quant_decode's bound);
//  - LSE, tensor-core kernel 2e-3: its scores take fp16 operands: each q_c s_c (and, for the FP16 residual, each
//    q_c) is rounded to fp16 (2^-11 relative) before the exact code products are summed in fp32, so a score
//    carries up to ~2^-11 sum_c |q_c s_c code_c| of error (~1e-3 of scores up to ~10 when the terms align). The
//    output's p_t s_t operands are fp16 too, inside its bf16 bound. Measured on an H100 (2026-12-08): median 1.0e-4,
//    max 3.2e-4 over 100 cases.
//  - LSE, CUDA-core kernel 3e-4: fp32 scores, each a sum of head_dim products (sum_c (q_c s_c) code_c + q . z)
//    against the CPU's double dot products: a few ulp of |q| |k| summed, ~1e-5 of scores up to ~10.
#include "test_support.h"
#include "gpu_test_support.h"

#ifdef ANTKV_HAVE_CUDA
#include <cuda_fp16.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/error.h"
#include "kernels/bench/method_bench.h"
#include "kernels/common/device_buffer.h"
#include "kernels/quant/uniform_cache.h"
#include "core/text_file.h"
#include "eval/perplexity.h"
#include "kernels/runtime/gpu_runtime.h"
#include "kernels/runtime/method_runtime_factory.h"
#include "kernels/runtime/ops.h"
#include "model/checkpoint.h"
#include "quant/method.h"
#include "quant/method_support.h"
#include "quant/quantized_cache.h"
#include "recipe/recipe.h"
#include "tokenizer/tokenizer.h"

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

// One (sequence, KV head)'s downloaded state against the CPU reference: keys per channel over each block of
// `group` tokens and values per token over groups of min(group, d) channels through uniform_quantize on the fp16
// rows K, V ([len, KV, d], fp16-representable), the residual equal to the rows themselves (keys from k_end,
// values from v_end). Returns the number of entries that differ.
int cpu_mismatches(const GpuUniformKvCache::HostView& h, const std::vector<float>& K, const std::vector<float>& V,
                   int KV, int kh, int d, int group, int bits) {
  auto at = [&](const std::vector<float>& X, int t, int c) { return X[(static_cast<size_t>(t) * KV + kh) * d + c]; };
  int bad = 0;
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
  const int vgs = std::min(group, d);
  for (int t = 0; t < h.v_end; ++t)
    for (int c0 = 0; c0 < d; c0 += vgs) {
      std::vector<float> row(vgs);
      for (int j = 0; j < vgs; ++j) row[j] = at(V, t, c0 + j);
      uniform_quantize(row.data(), vgs, 1, bits);
      const size_t sz = static_cast<size_t>(t) * (d / vgs) + c0 / vgs;
      for (int j = 0; j < vgs; ++j)
        bad += !same_dequant(row[j], h.v_code[static_cast<size_t>(t) * d + c0 + j], h.v_scale[sz], h.v_zero[sz]);
    }
  for (int t = h.k_end; t < h.len; ++t)
    for (int c = 0; c < d; ++c) {
      bad += h.res_k[static_cast<size_t>(t - h.k_end) * d + c] != at(K, t, c);
      if (t >= h.v_end) bad += h.res_v[static_cast<size_t>(t - h.k_end) * d + c] != at(V, t, c);
    }
  return bad;
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

// attend() for sequences 0..B-1 under `plan` against ref_decode on every head, with each split kernel (the
// tensor-core one and the CUDA-core one); returns nothing, CHECKs. The cache is left on the default kernel.
void check_decode(GpuUniformKvCache& cache, const ModelConfig& cfg, int B, std::mt19937& rng,
                  const cuda::UniformDecodePlan& plan, const std::string& what) {
  const int H = cfg.num_heads, KV = cfg.num_kv_heads, d = cfg.head_dim, G = H / KV;
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<float> q(static_cast<size_t>(B) * H * d);
  for (auto& x : q) x = round_bf(n01(rng));
  auto dq = upload_bf(q);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> want(q.size()), want_lse(static_cast<size_t>(B) * H);
  for (int b = 0; b < B; ++b)
    for (int kh = 0; kh < KV; ++kh) {
      const auto hv = cache.download(0, b, kh);
      const size_t row0 = static_cast<size_t>(b) * H + static_cast<size_t>(kh) * G;
      ref_decode(hv, cache.group(), d, q.data() + row0 * d, G, scale, want.data() + row0 * d, want_lse.data() + row0);
    }
  cache.upload_counts(B, nullptr);
  for (const auto kernel : {cuda::UniformDecodeKernel::kCudaCore, cuda::UniformDecodeKernel::kTensorCore}) {
    DeviceBuffer<bf16> out(q.size());
    DeviceBuffer<float> lse(static_cast<size_t>(B) * H);
    cuda::fill_bf16(out.get(), static_cast<int64_t>(out.size()), NAN, nullptr);
    cuda::fill_f32(lse.get(), static_cast<int64_t>(lse.size()), NAN, nullptr);
    cache.set_decode_kernel(kernel);
    cache.attend(0, B, H, dq.get(), out.get(), plan, scale, nullptr, lse.get());
    const auto go = download_bf(out.get(), out.size());
    const auto gl = download(lse);
    const double eo = test::max_rel_error(go.data(), want.data(), want.size());
    const double el = test::max_rel_error(gl.data(), want_lse.data(), want_lse.size());
    const bool tc = kernel == cuda::UniformDecodeKernel::kTensorCore;
    INFO(fmt::format("{} ({} kernel): {} splits of {}: output error {:.3g}, LSE error {:.3g}", what,
                     cuda::uniform_decode_kernel_name(kernel), plan.n_splits, plan.split_len, eo, el));
    CHECK_MEASURED(tc ? "test_uniform_cache_gpu: decode output rel err (tensor cores)"
                      : "test_uniform_cache_gpu: decode output rel err (CUDA cores)",
                   eo, 1e-2);
    // see the header: fp16 operands on the tensor cores, fp32 products on the CUDA cores
    CHECK_MEASURED(tc ? "test_uniform_cache_gpu: decode LSE rel err (tensor cores)"
                      : "test_uniform_cache_gpu: decode LSE rel err (CUDA cores)",
                   el, tc ? 2e-3 : 3e-4);
  }
  cache.set_decode_kernel(cuda::kDefaultUniformDecodeKernel);
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
          for (int b = 0; b < B; ++b)
            for (int kh = 0; kh < KV; ++kh) {
              const auto h = cache.download(0, b, kh);
              REQUIRE(h.len == steps);
              REQUIRE(h.v_end == steps - window);
              REQUIRE(h.k_end == 2 * group);
              CHECK(cpu_mismatches(h, ap.k_hist[b], ap.v_hist[b], KV, kh, d, group, bits) == 0);
              // the constant channel 3 took the scale-0 path: its keys come back exactly
              CHECK(h.k_scale[3] == 0.f);
              CHECK(h.k_zero[3] == 0.375f);
            }
        }
}

// A prefill (write_prefill of every layer, commit_prefill) is quantized as the CPU reference quantizes the fp16
// rounding of its fp32 rows: every code, scale and zero and the FP16 residual exactly (cpu_mismatches == 0), for
// bits 2 and 4, groups 32, 64 and 128, head_dim 64 and 128, windows 0 and 6; sequence 0 odd (two complete key
// blocks, a partial one and the window), sequence 1 three tokens (no key block; inside the window of 6); input
// rows strided as the runtime's qkv rows (the gap NaN). The same prefill captured in a CUDA graph gives the same
// bytes; decode appends continue from it (one more key block: again equal to the CPU on the whole history), and
// attention over the prefilled and the appended cache equals the dequantized CPU reference (check_decode's
// tolerances) for GQA 1, 4 and 8.
TEST_CASE("GPU uniform cache: a prefill equals uniform_quantize on its fp16 rows, graph equals eager, decode continues", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  int n = 0;
  for (int bits : {2, 4})
    for (int d : {64, 128})
      for (int group : {32, 64, 128}) {
        const int G = n % 3 == 0 ? 1 : n % 3 == 1 ? 4 : 8, window = (n % 2) ? 6 : 0;
        ++n;
        const std::string what = fmt::format("bits {} head_dim {} group {} window {} G {}", bits, d, group, window, G);
        INFO(what);
        const int KV = 2, L = 2;
        const ModelConfig cfg = tiny_config(L, KV * G, KV, d);
        const std::vector<int> T = {2 * group + window + 13, 3};
        const int capacity = T[0] + group + 9;
        const int64_t stride = static_cast<int64_t>(KV) * d + 3;  // strided rows, as the runtime's qkv
        // raw fp32 rows (not fp16-representable) per (layer, sequence), and their fp16 rounding [t, KV, d]
        std::vector<std::vector<float>> k_in(L * 2), v_in(L * 2), k_ref(L * 2), v_ref(L * 2);
        for (int l = 0; l < L; ++l)
          for (int b = 0; b < 2; ++b) {
            const int i = l * 2 + b;
            k_in[i].assign(static_cast<size_t>(T[b]) * stride, NAN);  // the stride's gap stays NaN
            v_in[i].assign(k_in[i].size(), NAN);
            for (int t = 0; t < T[b]; ++t)
              for (int c = 0; c < KV * d; ++c) {
                const int ch = c % d;
                auto draw = [&] { return ch == 3 ? 0.375f : ch == 5 ? 12.f + 4.f * n01(rng) : n01(rng); };
                k_in[i][t * stride + c] = draw();
                v_in[i][t * stride + c] = draw();
                k_ref[i].push_back(round_h(k_in[i][t * stride + c]));
                v_ref[i].push_back(round_h(v_in[i][t * stride + c]));
              }
          }
        std::vector<DeviceBuffer<float>> dk, dv;
        for (int i = 0; i < 2 * L; ++i) dk.push_back(upload(k_in[i])), dv.push_back(upload(v_in[i]));
        GpuUniformKvCache cache(cfg, bits, group, window, 2, capacity), graphed(cfg, bits, group, window, 2, capacity);
        cache.poison();
        graphed.poison();
        for (int b = 0; b < 2; ++b) {
          for (int l = 0; l < L; ++l)
            cache.write_prefill(l, b, T[b], dk[l * 2 + b].get(), stride, dv[l * 2 + b].get(), stride, nullptr);
          cache.commit_prefill(b, T[b]);
        }
        if (!cuda::sync_mode()) {  // ANTKV_CUDA_SYNC=1 synchronizes after each launch: no capture
          cudaStream_t st = nullptr;
          ANTKV_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
          for (int b = 0; b < 2; ++b) {
            cudaGraph_t graph = nullptr;
            cudaGraphExec_t exec = nullptr;
            ANTKV_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
            for (int l = 0; l < L; ++l)
              graphed.write_prefill(l, b, T[b], dk[l * 2 + b].get(), stride, dv[l * 2 + b].get(), stride, st);
            ANTKV_CUDA_CHECK(cudaStreamEndCapture(st, &graph));
            ANTKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
            ANTKV_CUDA_CHECK(cudaGraphLaunch(exec, st));
            ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
            ANTKV_CUDA_CHECK(cudaGraphExecDestroy(exec));
            ANTKV_CUDA_CHECK(cudaGraphDestroy(graph));
            graphed.commit_prefill(b, T[b]);
          }
          ANTKV_CUDA_CHECK(cudaStreamDestroy(st));
        }
        for (int l = 0; l < L; ++l)
          for (int b = 0; b < 2; ++b)
            for (int kh = 0; kh < KV; ++kh) {
              const auto h = cache.download(l, b, kh);
              const int qlen = std::max(0, T[b] - window);
              REQUIRE(h.len == T[b]);
              REQUIRE(h.v_end == qlen);
              REQUIRE(h.k_end == qlen / group * group);
              CHECK(cpu_mismatches(h, k_ref[l * 2 + b], v_ref[l * 2 + b], KV, kh, d, group, bits) == 0);
              if (b == 0) {  // the constant channel 3 took the scale-0 path
                CHECK(h.k_scale[3] == 0.f);
                CHECK(h.k_zero[3] == 0.375f);
              }
              if (cuda::sync_mode()) continue;
              const auto g = graphed.download(l, b, kh);
              CHECK(g.k_code == h.k_code);
              CHECK(g.v_code == h.v_code);
              CHECK((g.k_scale == h.k_scale && g.k_zero == h.k_zero && g.v_scale == h.v_scale && g.v_zero == h.v_zero));
              CHECK(g.res_k == h.res_k);
              int res_v_diff = 0;  // res_v holds values from v_end on
              for (int t = h.v_end; t < h.len; ++t)
                for (int c = 0; c < d; ++c) {
                  const size_t i = static_cast<size_t>(t - h.k_end) * d + c;
                  res_v_diff += g.res_v[i] != h.res_v[i];
                }
              CHECK(res_v_diff == 0);
            }
        check_decode(cache, cfg, 2, rng, cache.plan(2, cfg.num_heads), what + ", after the prefill");
        // decode appends (layer 0) continue from the prefill: one more key block for both sequences
        Appender ap{cache, KV, d, {k_ref[0], k_ref[1]}, {v_ref[0], v_ref[1]}};
        for (int s = 0; s < group + 2; ++s) ap.step(2, rng);
        for (int b = 0; b < 2; ++b)
          for (int kh = 0; kh < KV; ++kh) {
            const auto h = cache.download(0, b, kh);
            const int qlen = std::max(0, T[b] + group + 2 - window);
            REQUIRE(h.len == T[b] + group + 2);
            REQUIRE(h.k_end == qlen / group * group);
            CHECK(cpu_mismatches(h, ap.k_hist[b], ap.v_hist[b], KV, kh, d, group, bits) == 0);
          }
        check_decode(cache, cfg, 2, rng, cache.plan(2, cfg.num_heads), what + ", after decode appends");
      }
  // refusals: a commit before every layer is written; a prefill into a sequence that holds tokens; 0 tokens
  const ModelConfig cfg = tiny_config(2, 4, 2, 64);
  GpuUniformKvCache cache(cfg, 2, 32, 0, 1, 100);
  DeviceBuffer<float> rows(static_cast<size_t>(40) * 2 * 64);
  cuda::fill_f32(rows.get(), static_cast<int64_t>(rows.size()), 0.5f, nullptr);
  cache.write_prefill(0, 0, 40, rows.get(), 128, rows.get(), 128, nullptr);
  CHECK_THROWS_WITH(cache.commit_prefill(0, 40), Catch::Contains("without write_prefill of every layer"));
  cache.write_prefill(1, 0, 40, rows.get(), 128, rows.get(), 128, nullptr);
  cache.commit_prefill(0, 40);
  CHECK(cache.length(0) == 40);
  CHECK_THROWS_WITH(cache.write_prefill(0, 0, 10, rows.get(), 128, rows.get(), 128, nullptr),
                    Catch::Contains("chunked prefill over the uniform cache is not implemented"));
  cache.reset();
  CHECK_THROWS_WITH(cache.write_prefill(0, 0, 0, rows.get(), 128, rows.get(), 128, nullptr),
                    Catch::Contains("prefill of 0 tokens"));
}

TEST_CASE("GPU uniform decode: appended caches of odd lengths equal the dequantized CPU reference", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (int bits : {2, 4})
    for (int d : {128, 64})
      for (int G : {1, 4, 12}) {
        const int group = (n % 3 == 0) ? 128 : (n % 3 == 1) ? 32 : 64, window = (n % 4 == 1) ? 3 : 0;
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
      const int G = bits == 2 ? 4 : 7, group = d == 128 ? 128 : 64, KV = 2;
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
    req.n_tokens = 2;  // a prefill chunk after cached tokens
    CHECK_THROWS_WITH(rt.forward(req, res), Catch::Contains("prefill over the packed uniform cache is one chunk"));
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

namespace {

struct RefModel {
  Checkpoint ckpt;
};
RefModel& ref_model() {
  static RefModel* m = new RefModel{Checkpoint::open(test::model_dir("antkv-ref-18m"))};
  return *m;
}

MethodSpec uniform_method(const std::string& text) {
  static const Recipe r = Recipe::defaults_with({});
  return parse_method(text, r);
}

}  // namespace

// The runtime over the real uniform cache (gpu_method_runtime_factory with real_cache) against the simulated
// path (the same factory without), antkv-ref-18m (head_dim 128, 2 query heads per KV head), a random 250-token
// prompt: a 100-token prefill, then one token per forward. The prefill's NLL and logits are the simulated path's
// bit for bit (its attention reads the quantizer's simulated K/V in both); its packed cache then holds P tokens.
// Decode steps read the packed cache: the simulated path holds the same dequantized values rounded to bf16 in its
// arena (and its FP16 rows as bf16), so logits differ by bf16-sized changes of K/V, the compressed cache's bounds
// (test_gpu_quant.cpp): logits 2e-2 of max |logit|, |dNLL| mean 0.03, max 0.15. A third runtime decodes the
// same tokens with decode_batch (a CUDA graph replayed from its third step on): logits equal forward()'s (eager)
// bit for bit. Every cache is NaN-poisoned before the prefill.
TEST_CASE("GPU uniform cache through the runtime: prefill equals the simulated path, decode follows it, decode_batch (graph) equals forward", "[gpu][quant][shared]") {
  SKIP_WITHOUT_GPU();
  const Checkpoint& ckpt = ref_model().ckpt;
  const ModelConfig& cfg = ckpt.config();
  std::mt19937_64 prng(777);
  std::vector<int32_t> seq(250);
  seq[0] = 0;  // BOS of antkv-ref-18m
  for (size_t i = 1; i < seq.size(); ++i) seq[i] = 2 + static_cast<int32_t>(prng() % static_cast<uint64_t>(cfg.vocab_size - 2));
  const int P = 100;
  GpuRuntimeOptions so;
  so.max_context = 512;
  auto sim_factory = gpu_method_runtime_factory(ckpt, so, false);
  auto real_factory = gpu_method_runtime_factory(ckpt, so, true);
  for (const std::string text : {"uniform:bits=2,group=32", "uniform:bits=4,group=64,window=16",
                                 "uniform:bits=2,group=128,window=5", "uniform:bits=4,group=128"}) {
    SECTION(text) {
      const MethodSpec m = uniform_method(text);
      auto sim = sim_factory(m, nullptr);
      auto make_real = [&] {
        auto rt = real_factory(m, nullptr);
        auto* g = dynamic_cast<GpuRuntime*>(rt.get());
        REQUIRE(g);
        REQUIRE(g->uniform_cache());
        g->uniform_cache()->poison();
        return rt;
      };
      auto real = make_real();
      auto batched = make_real();
      GpuUniformKvCache& cache = *dynamic_cast<GpuRuntime&>(*real).uniform_cache();
      auto& bat = dynamic_cast<GpuRuntime&>(*batched);
      std::vector<int32_t> targets(seq.begin() + 1, seq.end());
      targets.push_back(-1);
      ForwardRequest req;
      req.logits = LogitsMode::kLast;
      ForwardResult rs, rr, rb;
      double worst_logit = 0, worst_nll = 0, sum_nll = 0;
      int steps = 0;
      for (int p = 0; p < static_cast<int>(seq.size());) {
        const int n = p == 0 ? P : 1;
        req.tokens = seq.data() + p;
        req.targets = targets.data() + p;
        req.n_tokens = n;
        sim->forward(req, rs);
        real->forward(req, rr);
        if (p == 0) {
          batched->forward(req, rb);
          REQUIRE(rr.nll.size() == static_cast<size_t>(P));
          CHECK(std::memcmp(rr.nll.data(), rs.nll.data(), P * sizeof(float)) == 0);
          CHECK(std::memcmp(rr.logits.data(), rs.logits.data(), rs.logits.size() * sizeof(float)) == 0);
          CHECK(cache.length(0) == P);
        } else {
          std::vector<float> lb;
          bat.decode_batch({seq[p]}, &lb, nullptr);
          REQUIRE(lb.size() == rr.logits.size());
          CHECK(std::memcmp(lb.data(), rr.logits.data(), lb.size() * sizeof(float)) == 0);
          const double e = test::max_rel_error(rr.logits.data(), rs.logits.data(), rs.logits.size());
          REQUIRE(std::isfinite(e));
          worst_logit = std::max(worst_logit, e);
          if (p + 1 < static_cast<int>(seq.size())) {
            REQUIRE(std::isfinite(rr.nll[0]));
            const double dn = std::fabs(static_cast<double>(rr.nll[0]) - rs.nll[0]);
            worst_nll = std::max(worst_nll, dn);
            sum_nll += dn;
            ++steps;
          }
        }
        p += n;
      }
      const int len = static_cast<int>(seq.size()), qlen = std::max(0, len - m.window);
      CHECK(cache.length(0) == len);
      CHECK(bat.uniform_cache()->length(0) == len);
      const auto h = cache.download(cfg.num_layers - 1, 0, cfg.num_kv_heads - 1);
      CHECK(h.k_end == qlen / m.group * m.group);
      CHECK(h.v_end == qlen);
      WARN(fmt::format("{}: real vs simulated over {} decode steps: logits rel err max {:.2e}, |dNLL| mean {:.2e} "
                       "max {:.2e}",
                       text, steps, worst_logit, sum_nll / steps, worst_nll));
      // Bounds: the two paths quantize the same tokens into the same groups, but the simulated arena holds the
      // dequantized K/V in bf16 while the packed cache dequantizes in fp32; the next layers' K/V then differ by
      // bf16-sized amounts, and a per-group min/max quantizer moves a value by a whole step wherever such a change
      // crosses a rounding boundary (at 2 bits a step is a third of the group's range), so the two paths drift
      // apart step by step. With no FP16 window every new token is quantized at once and the drift is largest:
      // measured on an H100 (2026-12-07) bits=2,group=32: logits 0.27, |dNLL| mean 0.22 / max 1.77; bits=2,
      // group=128,window=5: 0.096 / 0.052 / 0.29; bits=4,group=128: 0.052 / 0.063 / 0.30; bits=4,group=64,
      // window=16: 0.019 / 0.019 / 0.10. The simulated path itself is as far from the CPU cache (test_gpu_quant.cpp:
      // uniform:bits=2,group=32 logits 0.23). What this test guards is the layout and the handoff from prefill to
      // decode (a wrong slot, group or ring row gives errors of order 1 at every step and NaN from poisoned slots).
      const bool drift = m.bits == 2 && m.window == 0;
      const std::string label = "test_uniform_cache_gpu: real vs simulated " + text;
      CHECK_MEASURED(label + " worst logits rel err", worst_logit, drift ? 0.5 : 0.15);
      CHECK_MEASURED(label + " mean |dNLL|", sum_nll / steps, drift ? 0.4 : 0.12);
      CHECK_MEASURED(label + " max |dNLL|", worst_nll, drift ? 3.0 : 0.6);
      // a second prefill chunk after cached tokens is refused (one chunk into an empty sequence, then decode)
      req.n_tokens = 2;
      req.tokens = seq.data();
      req.targets = targets.data();
      real->reset();
      real->forward(req, rr);
      CHECK_THROWS_WITH(real->forward(req, rr), Catch::Contains("prefill over the packed uniform cache is one chunk"));
    }
  }
}

// Perplexity (evaluate_perplexity, eval.decode_from: a 64-token prefill, then one token per forward) through the
// real uniform cache within 0.5% of the simulated path's (bits 2, group 32: 5%, see below), antkv-ref-18m on the start of books-test.txt, 3
// windows of 256, bits 2 and 4 with every group the packed cache takes, one method with a window. Both paths
// quantize the same tokens into the same groups; they differ by bf16-sized changes of the dequantized K/V (the
// simulated arena is bf16), which move each decode step's NLL by ~1e-2 at most and the mean far less.
TEST_CASE("GPU uniform cache: perplexity through the real cache within 0.5% of the simulated path (antkv-ref-18m, decode_from)", "[gpu][quant][shared]") {
  SKIP_WITHOUT_GPU();
  const Checkpoint& ckpt = ref_model().ckpt;
  const Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const auto ids = tok.encode(read_text_file(test::shared_path("data/books-test.txt")).substr(0, 40000), true);
  PerplexityOptions po;
  po.seq_len = 256;
  po.max_windows = 3;
  po.decode_from = 64;
  po.prefill_chunk = 0;  // the real cache takes one prefill chunk (compare.cpp under eval.kv_cache: real)
  po.progress = false;
  GpuRuntimeOptions go;
  go.max_context = po.seq_len;  // the KV cache holds one window (antkv-eval's method_factory)
  auto sim_factory = gpu_method_runtime_factory(ckpt, go, false);
  auto real_factory = gpu_method_runtime_factory(ckpt, go, true);
  for (const std::string text : {"uniform:bits=2,group=32", "uniform:bits=2,group=64", "uniform:bits=2,group=128",
                                 "uniform:bits=4,group=32", "uniform:bits=4,group=64", "uniform:bits=4,group=128",
                                 "uniform:bits=2,group=128,window=32"}) {
    const MethodSpec m = uniform_method(text);
    auto sim = sim_factory(m, nullptr);
    auto real = real_factory(m, nullptr);
    REQUIRE(dynamic_cast<GpuRuntime&>(*real).uniform_cache());
    const auto rs = evaluate_perplexity(*sim, ids, tok.bos_id(), po);
    // the split kernel that is not the default, reported (not checked): the figure that decides the default
    const auto other = cuda::kDefaultUniformDecodeKernel == cuda::UniformDecodeKernel::kCudaCore
                           ? cuda::UniformDecodeKernel::kTensorCore
                           : cuda::UniformDecodeKernel::kCudaCore;
    auto real_other = real_factory(m, nullptr);  // its own runtime: nothing captured with the default kernel
    dynamic_cast<GpuRuntime&>(*real_other).uniform_cache()->set_decode_kernel(other);
    const auto ro = evaluate_perplexity(*real_other, ids, tok.bos_id(), po);
    real_other.reset();
    test::report_measured(fmt::format("test_uniform_cache_gpu: 18m ppl real ({} kernel, not the default) vs simulated rel {}",
                                      cuda::uniform_decode_kernel_name(other), text),
                          std::fabs(ro.ppl / rs.ppl - 1), 5e-3);
    const auto rr = evaluate_perplexity(*real, ids, tok.bos_id(), po);
    REQUIRE(rr.windows == 3);
    REQUIRE(std::isfinite(rr.ppl));
    const double rel = std::fabs(rr.ppl / rs.ppl - 1);
    WARN(fmt::format("{}: ppl simulated {:.4f} real {:.4f} (rel {:.2e}; {} kernel {:.4f})", text, rs.ppl, rr.ppl, rel,
                     cuda::uniform_decode_kernel_name(other), ro.ppl));
    // 0.5% (the bar) for every configuration but 2 bits, group 32, no window, whose drift between two
    // numerically valid paths (see the test above) is larger than that on 576 decoded tokens: measured 2.3e-2 on an
    // H100 (2026-12-07); its bound is 5%. The two paths quantize the same fp16 rows with the same fp16 scales and
    // zeros; what differs is that the simulated arena stores the dequantized K/V and the FP16 rows in bf16 (the
    // packed cache dequantizes in fp32 and keeps fp16 rows, as the CPU reference does). That change alone, made to
    // the CPU reference on this protocol, moves its 2-bit no-window perplexities by 0.06% (group 32) to 0.83%
    // (group 64) (test_quant.cpp, "uniform on the CPU: a bf16 store of the cache"): at 2 bits without a window
    // the bar is below what bf16 storage alone moves, so only a simulated arena in fp32 (or a packed cache that
    // rounds every dequantized element to bf16, which its per-group decode never forms) could meet it.
    const bool drift = m.bits == 2 && m.window == 0 && m.group == 32;
    CHECK_MEASURED("test_uniform_cache_gpu: 18m ppl real vs simulated rel " + text, rel, drift ? 5e-2 : 5e-3);
  }
}

// Under eval.kv_cache: real, uniform shapes outside the packed cache's closed set are refused by the factory,
// naming the method, before any GPU work (so this runs without a device too).
TEST_CASE("GPU method factory: uniform outside the packed cache's closed set is refused under eval.kv_cache: real", "[quant][shared]") {
  const Checkpoint& ckpt = ref_model().ckpt;
  auto real_factory = gpu_method_runtime_factory(ckpt, {}, true);
  CHECK_THROWS_WITH(real_factory(uniform_method("uniform:bits=3,group=128"), nullptr),
                    Catch::Contains("method uniform:bits=3,group=128 under eval.kv_cache: real") &&
                        Catch::Contains("takes bits 2 or 4, not 3"));
  CHECK_THROWS_WITH(real_factory(uniform_method("uniform:bits=2,group=16"), nullptr),
                    Catch::Contains("takes group 32, 64 or 128, not 16"));
}

// method_support (CPU code) declares the compressed cache's closed set of widths; quant_decode builds it.
TEST_CASE("method_support: the compressed cache's widths are quant_decode's kVqKernelConfigs", "[support]") {
  for (const double bits : {4.0, 2.0, 1.0, 0.75, 0.5, 0.375, 1.5, 1.25, 0.25}) {
    const VqConfig q = vq_config_for_bits(bits);
    bool built = false;
    for (const cuda::VqKernelConfig c : cuda::kVqKernelConfigs)
      built |= cuda::vq_kernel_config_info(c).c == q.c && cuda::vq_kernel_config_info(c).b == q.b;
    const MethodSpec m = parse_method(fmt::format("vq:bits={}", bits), Recipe::defaults_with({}));
    INFO(m.text);
    CHECK(method_support(m, MethodPath::kGpuReal).runs == built);
    CHECK(method_support(m, MethodPath::kBench).runs == built);
  }
}

TEST_CASE("bench methods: a row whose whole-model step was not timed (--no-e2e) shows - there, not 0", "[quant]") {
  cuda::MethodBenchResult r;
  r.device = "test";
  cuda::MethodDecodePoint timed, attention_only;
  timed.method = "fp16";
  timed.batch = attention_only.batch = 1;
  timed.context = attention_only.context = 4096;
  timed.ran = attention_only.ran = true;
  timed.ms_per_step = 12.5;
  timed.tokens_per_s = 80;
  timed.attn_ms_per_step = attention_only.attn_ms_per_step = 1.25;
  attention_only.method = "vq:bits=1";
  attention_only.attn_frac_of_copy = 0.2;
  attention_only.seq_cache_bytes = 1.09e9;
  r.points = {timed, attention_only};
  const std::string table = cuda::format_method_bench(r);
  INFO(table);
  CHECK(table.find("12.50") != std::string::npos);
  const size_t row = table.find("vq:bits=1");
  REQUIRE(row != std::string::npos);
  const std::string line = table.substr(row, table.find('\n', row) - row);
  CHECK(line.find(" - ") != std::string::npos);
  CHECK(line.find("0.00 ") == std::string::npos);  // no whole-model figure of 0
  CHECK(line.find("1.25") != std::string::npos);   // the attention time is there
}

TEST_CASE("bench methods: uniform parses with its closed set and simulated-only methods are refused by name", "[quant]") {
  const auto u = cuda::parse_bench_method("uniform:bits=2,group=128");
  CHECK(u.uniform);
  CHECK(u.uniform_bits == 2);
  CHECK(u.uniform_group == 128);
  CHECK(cuda::parse_bench_method("uniform:bits=4,group=32,window=16").uniform_window == 16);
  CHECK_THROWS_WITH(cuda::parse_bench_method("uniform:bits=3,group=128"),
                    Catch::Contains("method \"uniform:bits=3,group=128\" does not run on bench") &&
                        Catch::Contains("the packed uniform cache takes bits 2 or 4, not 3"));
  CHECK_THROWS_WITH(cuda::parse_bench_method("uniform:bits=2,group=100"), Catch::Contains("group 32, 64 or 128, not 100"));
  CHECK_THROWS_WITH(cuda::parse_bench_method("rsq:bits=1"),
                    Catch::Contains("method \"rsq:bits=1\" does not run on bench") &&
                        Catch::Contains("rsq has no real GPU cache"));
  // a row times the method it names: options the compressed cache does not run are refused, not timed as plain vq
  CHECK_THROWS_WITH(cuda::parse_bench_method("antkv:bits=1,anchors=v,promote=off"),
                    Catch::Contains("anchors=v (one tensor only) is not implemented in the synthetic cache bench fills"));
  CHECK_THROWS_WITH(cuda::parse_bench_method("antkv:bits=1,correct=on"),
                    Catch::Contains("correct=on is not implemented in the compressed cache"));
  // per-layer widths and keys and values of different widths: each layer's configurations, the list checked
  // against the model's layers
  const auto layered = cuda::parse_bench_method("vq:gain=kv,rotate=pca,norm=fp8,metric=task,lkbits=1/2,lvbits=0.5/2");
  CHECK(layered.key_configs == std::vector<cuda::VqKernelConfig>{cuda::VqKernelConfig::kC8B8, cuda::VqKernelConfig::kC4B8});
  CHECK(layered.value_configs == std::vector<cuda::VqKernelConfig>{cuda::VqKernelConfig::kC16B8, cuda::VqKernelConfig::kC4B8});
  const ModelShapeFacts shape8b{128, 32, 8, 32};
  CHECK_THROWS_WITH(cuda::parse_bench_method("vq:lkbits=1/2", MethodPath::kBench, &shape8b),
                    Catch::Contains("lkbits/lvbits list 2 layers, the model has 32"));
  const auto two = cuda::parse_bench_method("vq:kbits=1,vbits=2");
  CHECK((two.key_configs.size() == 1 && two.value_configs.at(0) == cuda::VqKernelConfig::kC4B8));
  // the coded transform at c4b8 (dequantize-dot with run-time widths)
  const auto two_gain = cuda::parse_bench_method("vq:bits=2,gain=k");
  CHECK((two_gain.compressed && two_gain.gain_keys && !two_gain.gain_values &&
         two_gain.config == cuda::VqKernelConfig::kC4B8));
  const auto commute_gain = cuda::parse_bench_method("vq:bits=1,gain=k,key_rope=commute");
  CHECK((commute_gain.compressed && commute_gain.commute && commute_gain.gain_keys && !commute_gain.rotate));
  // the best method's pre-RoPE form: pre-RoPE keys with the coded transform (each key mapped back per token)
  const auto best_pre = cuda::parse_bench_method("vq:bits=1,gain=kv,rotate=pca,key_rope=pre");
  CHECK((best_pre.compressed && best_pre.pre_rope && !best_pre.commute && best_pre.gain_keys && best_pre.gain_values &&
         best_pre.rotate));
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
    // keys and values of different widths: each tensor its own record bytes (16 at 1 bit, 8 at 0.5, head_dim 128),
    // the rest as with one width; per-layer widths: each layer its own (half the layers at 1 bit, half at 0.5)
    const double half = cuda::sequence_cache_bytes(c8, cuda::parse_bench_method("vq:bits=0.5"), 131072);
    CHECK(cuda::sequence_cache_bytes(c8, cuda::parse_bench_method("vq:kbits=1,vbits=0.5"), 131072) ==
          Approx((plain + half) / 2).epsilon(1e-12));
    CHECK(plain - half == Approx(2.0 * 8 * 131072 * 8 * 32).epsilon(1e-12));
    std::string lk;
    for (int l = 0; l < 32; ++l) lk += (l ? "/" : "") + std::string(l % 2 ? "0.5" : "1");
    const auto layered = cuda::parse_bench_method("vq:lkbits=" + lk + ",lvbits=" + lk);
    CHECK(cuda::sequence_cache_bytes(c8, layered, 131072) == Approx((plain + half) / 2).epsilon(1e-12));
    CHECK_THROWS_WITH(cuda::sequence_cache_bytes(tiny_config(16, 32, 8, 128), layered, 1024),
                      Catch::Contains("lkbits/lvbits list 32 layers, the model has 16"));
  }
  // bytes: 2-bit codes of K and V, (scale, zero) per key block and channel and per value token, the FP16 ring
  ModelConfig cfg = tiny_config(32, 32, 8, 128);
  const double per = GpuUniformKvCache::sequence_bytes(cfg, 2, 128, 0, 131072);
  const double want = (131072.0 * 32 * 2 + 1024.0 * 128 * 4 + 131072.0 * 4 + 2.0 * 128 * 128 * 2) * 8 * 32;
  CHECK(per == Approx(want).epsilon(1e-12));
}
#endif  // ANTKV_HAVE_CUDA
