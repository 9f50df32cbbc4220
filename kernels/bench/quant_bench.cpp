#include "kernels/bench/quant_bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "kernels/bench/bench.h"
#include "kernels/common/random_fill.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/cuda_timing.h"
#include "kernels/common/device_buffer.h"
#include "kernels/attention/flash_attention.h"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {

namespace {

struct Split {
  int64_t n_quant = 0, n_anchor = 0, n_window = 0;
};
Split split_context(int64_t T, double rho, int window) {
  Split s;
  s.n_window = std::min<int64_t>(window, T);
  s.n_anchor = std::min<int64_t>(static_cast<int64_t>(std::ceil(rho * static_cast<double>(T))), T - s.n_window);
  s.n_quant = T - s.n_window - s.n_anchor;
  return s;
}

// One copy of one layer's quantized cache for B sequences (each with the same counts).
struct QuantCache {
  DeviceBuffer<uint8_t> kc, vc;
  DeviceBuffer<__half> kcent, vcent, ak, av, wk, wv;
};

struct Shape {
  int B, H, Hkv, d;
  VqKernelConfig cfg;
  Split s;
  int64_t rec() const { return vq_record_bytes(d, cfg); }
  int64_t codebook_elems() const {
    return static_cast<int64_t>(Hkv) * vq_groups(d, cfg) * vq_centroid_count(cfg) * vq_kernel_config_info(cfg).c;
  }
  double code_bytes() const { return 2.0 * B * Hkv * static_cast<double>(s.n_quant) * rec(); }
  double fp16_bytes() const { return 2.0 * B * Hkv * static_cast<double>(s.n_anchor + s.n_window) * d * 2; }
  double codebook_bytes() const { return 2.0 * codebook_elems() * 2; }
  double bytes() const { return code_bytes() + fp16_bytes() + codebook_bytes() + 2.0 * B * H * d * 2; }
};

void make_cache(QuantCache& c, const Shape& sh, uint64_t seed, cudaStream_t st) {
  const size_t codes = static_cast<size_t>(sh.B) * sh.Hkv * std::max<int64_t>(sh.s.n_quant, 1) * sh.rec();
  const size_t an = static_cast<size_t>(sh.B) * sh.Hkv * std::max<int64_t>(sh.s.n_anchor, 1) * sh.d;
  const size_t wn = static_cast<size_t>(sh.B) * sh.Hkv * std::max<int64_t>(sh.s.n_window, 1) * sh.d;
  c.kc.resize(codes);
  c.vc.resize(codes);
  c.kcent.resize(sh.codebook_elems());
  c.vcent.resize(sh.codebook_elems());
  c.ak.resize(an);
  c.av.resize(an);
  c.wk.resize(wn);
  c.wv.resize(wn);
  fill_random_bytes(c.kc.get(), static_cast<int64_t>(codes), seed, st);
  fill_random_bytes(c.vc.get(), static_cast<int64_t>(codes), seed + 1, st);
  // scores ~ N(0, 1)-ish in natural units: q ~ U(-1, 1), centroids/keys ~ U(-0.5, 0.5) per channel
  fill_random_f16(c.kcent.get(), static_cast<int64_t>(c.kcent.size()), seed + 2, 0.5f, st);
  fill_random_f16(c.vcent.get(), static_cast<int64_t>(c.vcent.size()), seed + 3, 1.0f, st);
  fill_random_f16(c.ak.get(), static_cast<int64_t>(an), seed + 4, 0.5f, st);
  fill_random_f16(c.av.get(), static_cast<int64_t>(an), seed + 5, 1.0f, st);
  fill_random_f16(c.wk.get(), static_cast<int64_t>(wn), seed + 6, 0.5f, st);
  fill_random_f16(c.wv.get(), static_cast<int64_t>(wn), seed + 7, 1.0f, st);
}

struct QuantRun {
  double ms = 0;
  int n_splits = 0, split_len = 0;
  bool finite = false;
};

// Times quant_decode over `copies` rotated caches; at least min_iters steps and ~100 ms of work.
QuantRun time_quant(const Shape& sh, bool lut_half, int copies, int min_iters, double copy_gbps, uint64_t seed,
                    cudaStream_t st, bool check_finite) {
  std::vector<QuantCache> caches(copies);
  for (int c = 0; c < copies; ++c) make_cache(caches[c], sh, seed + 100 * c, st);
  DeviceBuffer<bf16> q(static_cast<size_t>(sh.B) * sh.H * sh.d), out(q.size());
  fill_random_bf16(q.get(), static_cast<int64_t>(q.size()), seed + 7777, 1.0f, st);
  DeviceBuffer<int32_t> counts(3 * static_cast<size_t>(sh.B));
  std::vector<int32_t> hc(3 * static_cast<size_t>(sh.B));
  for (int b = 0; b < sh.B; ++b) {
    hc[b] = static_cast<int32_t>(sh.s.n_quant);
    hc[sh.B + b] = static_cast<int32_t>(sh.s.n_anchor);
    hc[2 * sh.B + b] = static_cast<int32_t>(sh.s.n_window);
  }
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(counts.get(), hc.data(), hc.size() * sizeof(int32_t), cudaMemcpyHostToDevice, st));
  const QuantDecodePlan plan = plan_quant_decode(sh.B, sh.H, sh.Hkv, sh.d, sh.cfg, sh.s.n_quant, lut_half);
  DeviceBuffer<float> ws(quant_decode_workspace_floats(sh.B, sh.H, sh.d, plan.n_splits));
  QuantDecodeParams p;
  p.config = sh.cfg;
  p.batch = sh.B;
  p.n_heads = sh.H;
  p.n_kv_heads = sh.Hkv;
  p.head_dim = sh.d;
  p.q = q.get();
  p.n_quant = counts.get();
  p.n_anchor = counts.get() + sh.B;
  p.n_window = counts.get() + 2 * sh.B;
  p.quant_capacity = static_cast<int>(std::max<int64_t>(sh.s.n_quant, 1));
  p.anchor_capacity = static_cast<int>(std::max<int64_t>(sh.s.n_anchor, 1));
  p.window_capacity = static_cast<int>(std::max<int64_t>(sh.s.n_window, 1));
  p.out = out.get();
  p.workspace = ws.get();
  p.workspace_floats = static_cast<int64_t>(ws.size());
  p.n_splits = plan.n_splits;
  p.split_len = plan.split_len;
  p.scale = 1.0f / std::sqrt(static_cast<float>(sh.d));
  p.lut_half = lut_half;
  auto step = [&](int i) {
    const QuantCache& c = caches[i % copies];
    p.k_codes = c.kc.get();
    p.v_codes = c.vc.get();
    p.k_centroids = c.kcent.get();
    p.v_centroids = c.vcent.get();
    p.anchor_k = c.ak.get();
    p.anchor_v = c.av.get();
    p.window_k = c.wk.get();
    p.window_v = c.wv.get();
    quant_decode(p, st);
  };
  for (int i = 0; i < 3; ++i) step(i);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
  const int iters = std::max(min_iters, static_cast<int>(0.1 / (sh.bytes() / (copy_gbps * 1e9)) + 1));
  Events ev;
  ev.start(st);
  for (int i = 0; i < iters; ++i) step(i);
  QuantRun r;
  r.ms = ev.stop_ms(st) / iters;
  r.n_splits = plan.n_splits;
  r.split_len = plan.split_len;
  if (check_finite) {
    std::vector<uint16_t> h(out.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(h.data(), out.get(), h.size() * 2, cudaMemcpyDeviceToHost));
    r.finite = std::all_of(h.begin(), h.end(), [](uint16_t x) { return (x & 0x7f80u) != 0x7f80u; });
  }
  return r;
}

// flash_decode over a bf16 cache [B, Hkv, T, d]: bench.cpp's decode benchmark, one-wave plan (the runtime's).
double time_fp16(int B, int H, int Hkv, int d, int64_t T, int min_iters, double copy_gbps, cudaStream_t st,
                 int* n_splits = nullptr, int* split_len = nullptr) {
  ANTKV_CHECK(T <= (int64_t{1} << 30), "fp16 decode baseline: context {} is too long", T);
  const DecodeAttnPoint r = bench_flash_decode(B, static_cast<int>(T), H, Hkv, d, 1, min_iters, copy_gbps, st);
  if (n_splits) *n_splits = r.n_splits;
  if (split_len) *split_len = r.split_len;
  return r.ms_per_step;
}

double llama3_8b_weight_bytes() {
  const ModelConfig c = llama3_8b_shape_config();
  return 2.0 * (static_cast<double>(c.num_layers) *
                    (static_cast<double>(c.hidden_size) * (c.q_dim() + 2 * c.kv_dim()) +
                     static_cast<double>(c.hidden_size) * c.q_dim() + 3.0 * c.hidden_size * c.intermediate_size) +
                2.0 * c.vocab_size * c.hidden_size);
}

}  // namespace

QuantBenchResult run_quant_decode_bench(const QuantBenchOptions& o, const std::function<void(const std::string&)>& log) {
  auto say = [&](const std::string& s) {
    if (log) log(s);
  };
  QuantBenchResult r;
  int dev = 0;
  ANTKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  ANTKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  r.device = fmt::format("{} ({} SMs, {:.0f} GiB)", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);
  {
    size_t free_b = 0, total_b = 0;
    ANTKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    r.memory.free_bytes = static_cast<double>(free_b);
    r.memory.total_bytes = static_cast<double>(total_b);
  }
  r.copy_gbps = measure_copy_bandwidth_gbps();
  say(fmt::format("device {}: copy bandwidth {:.0f} GB/s", r.device, r.copy_gbps));
  Stream st;
  const int H = o.n_heads, Hkv = o.n_kv_heads, d = o.head_dim;

  // ---- decode points ----
  for (int B : o.batches) {
    std::vector<int64_t> ctxs = o.contexts;
    if (B == 1) ctxs.insert(ctxs.end(), o.batch1_contexts.begin(), o.batch1_contexts.end());
    for (int64_t T : ctxs) {
      if (T <= 0) continue;
      int fs = 0, fl = 0;
      const double fp16_ms = time_fp16(B, H, Hkv, d, T, o.iters, r.copy_gbps, st.get(), &fs, &fl);
      const double fp16_bytes = 2.0 * B * Hkv * static_cast<double>(T) * d * 2 + 2.0 * B * H * d * 2;
      say(fmt::format("fp16 flash-decoding B={} T={}: {:.4f} ms ({} splits x {}), {:.1f}% of copy bw", B, T, fp16_ms, fs,
                      fl, 100 * fp16_bytes / (fp16_ms * 1e-3) / 1e9 / r.copy_gbps));
      struct Variant {
        VqKernelConfig cfg;
        bool lut_half;
      };
      std::vector<Variant> vars;
      for (VqKernelConfig c : o.configs) vars.push_back({c, false});
      if (o.lut_half_too) vars.push_back({VqKernelConfig::kC8B8, true});
      for (const auto& v : vars) {
        Shape sh{B, H, Hkv, d, v.cfg, split_context(T, o.anchor_ratio, o.window)};
        const int copies = static_cast<int>(std::clamp(std::ceil((1.0 * (size_t{1} << 30)) / sh.bytes()), 1.0, 32.0));
        const QuantRun qr = time_quant(sh, v.lut_half, copies, o.iters, r.copy_gbps, o.seed, st.get(), false);
        QuantBenchPoint pt;
        pt.batch = B;
        pt.context = T;
        pt.config = std::string(vq_kernel_config_info(v.cfg).name) + (v.lut_half ? "/lut16" : "");
        pt.n_quant = sh.s.n_quant;
        pt.n_anchor = sh.s.n_anchor;
        pt.n_window = sh.s.n_window;
        pt.n_splits = qr.n_splits;
        pt.split_len = qr.split_len;
        pt.ms_per_step = qr.ms;
        pt.bytes = sh.bytes();
        pt.gbps = pt.bytes / (qr.ms * 1e-3) / 1e9;
        pt.frac_of_copy = pt.gbps / r.copy_gbps;
        pt.fp16_ms_per_step = fp16_ms;
        pt.fp16_bytes = fp16_bytes;
        pt.fp16_gbps = fp16_bytes / (fp16_ms * 1e-3) / 1e9;
        pt.fp16_frac_of_copy = pt.fp16_gbps / r.copy_gbps;
        pt.speedup = fp16_ms / qr.ms;
        r.points.push_back(pt);
        say(fmt::format("{} B={} T={}: {:.4f} ms ({} splits x {}), {:.0f} GB/s = {:.1f}% of copy bw; fp16 {:.4f} ms; "
                        "speedup {:.2f}x",
                        pt.config, B, T, pt.ms_per_step, pt.n_splits, pt.split_len, pt.gbps, 100 * pt.frac_of_copy,
                        fp16_ms, pt.speedup));
      }
    }
  }

  // ---- memory: the largest context of the whole model (first configuration, 1 bit by default) ----
  const VqKernelConfig mcfg = o.configs.empty() ? VqKernelConfig::kC8B8 : o.configs.front();
  {
    auto& m = r.memory;
    m.config = vq_kernel_config_info(mcfg).name;
    const double L = o.n_layers, rec = vq_record_bytes(d, mcfg);
    m.bytes_per_token = L * Hkv * (2.0 * rec + o.anchor_ratio * (2.0 * d * 2 + 4));
    m.codebook_bytes = L * Hkv * 2.0 * vq_groups(d, mcfg) * vq_centroid_count(mcfg) * vq_kernel_config_info(mcfg).c * 2;
    m.window_bytes = L * Hkv * static_cast<double>(o.window) * 2 * d * 2;
    m.weights_bytes = llama3_8b_weight_bytes();
    m.reserve_bytes = 2.0 * (1ull << 30);
    const double fixed = m.codebook_bytes + m.window_bytes + m.reserve_bytes;
    m.max_context_cache_only = static_cast<int64_t>(std::floor((m.free_bytes - fixed) / m.bytes_per_token));
    m.max_context_with_weights =
        static_cast<int64_t>(std::floor((m.free_bytes - fixed - m.weights_bytes) / m.bytes_per_token));
    say(fmt::format("memory ({}): {:.1f} bytes/token (all layers), codebooks {:.1f} MB, window {:.1f} MB, weights {:.2f} GB, "
                    "free {:.1f} GB: max context {} (cache only), {} (with weights)",
                    m.config, m.bytes_per_token, m.codebook_bytes / 1e6, m.window_bytes / 1e6, m.weights_bytes / 1e9,
                    m.free_bytes / 1e9, m.max_context_cache_only, m.max_context_with_weights));
  }

  // ---- long contexts: one decode step of one layer, batch 1 ----
  std::vector<int64_t> longs = o.long_contexts;
  if (o.long_at_max && r.memory.max_context_with_weights > 0) longs.push_back(r.memory.max_context_with_weights);
  const int64_t plan_limit = static_cast<int64_t>(kMaxQuantSplits) * 32768;
  for (int64_t T : longs) {
    if (T <= 0) continue;
    QuantLongRun lr;
    lr.context = T;
    Shape sh{1, H, Hkv, d, mcfg, split_context(T, o.anchor_ratio, o.window)};
    lr.layer_cache_bytes = sh.bytes();
    size_t free_b = 0, total_b = 0;
    ANTKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (sh.s.n_quant > plan_limit || T > std::numeric_limits<int32_t>::max()) {
      lr.note = fmt::format("{} quantized tokens exceed the split plan's limit {}", sh.s.n_quant, plan_limit);
    } else if (sh.bytes() + (1ull << 30) > static_cast<double>(free_b)) {
      lr.note = fmt::format("one layer needs {:.1f} GB, {:.1f} GB free", sh.bytes() / 1e9, free_b / 1e9);
    } else {
      const QuantRun qr = time_quant(sh, false, 1, 5, r.copy_gbps, o.seed + 31, st.get(), true);
      lr.ran = true;
      lr.ms_per_step = qr.ms;
      lr.n_splits = qr.n_splits;
      lr.split_len = qr.split_len;
      lr.finite = qr.finite;
      lr.gbps = sh.bytes() / (qr.ms * 1e-3) / 1e9;
      lr.frac_of_copy = lr.gbps / r.copy_gbps;
      const double fp16_need = 2.0 * Hkv * static_cast<double>(T) * d * 2;
      ANTKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      if (fp16_need + (2ull << 30) < static_cast<double>(free_b) && T <= std::numeric_limits<int32_t>::max())
        lr.fp16_ms_per_step = time_fp16(1, H, Hkv, d, T, 3, r.copy_gbps, st.get());
    }
    r.long_runs.push_back(lr);
    if (lr.ran)
      say(fmt::format("long context T={} ({}): {:.3f} ms per layer step ({} splits x {}), {:.1f}% of copy bw, outputs {}; "
                      "fp16 {:.3f} ms",
                      T, vq_kernel_config_info(mcfg).name, lr.ms_per_step, lr.n_splits, lr.split_len, 100 * lr.frac_of_copy,
                      lr.finite ? "finite" : "NOT FINITE", lr.fp16_ms_per_step));
    else
      say(fmt::format("long context T={}: skipped: {}", T, lr.note));
  }
  return r;
}

std::string format_quant_bench(const QuantBenchResult& r) {
  std::string s = fmt::format("device: {}\ncopy bandwidth (D2D, read+write): {:.0f} GB/s\n\n", r.device, r.copy_gbps);
  s += "decode attention, one layer (32 q / 8 kv heads, d 128); quantized = codes + 1% FP16 anchors + 128 FP16 window\n"
       "  batch  context  config       splits x len   quant ms   GB/s  %copy  |  fp16 ms    GB/s  %copy  |  speedup\n";
  for (const auto& p : r.points)
    s += fmt::format("  {:5d}  {:7d}  {:<11s}  {:5d} x {:<6d}  {:8.4f}  {:5.0f}  {:5.1f}  |  {:7.4f}  {:5.0f}  {:5.1f}  |  {:6.2f}x\n",
                     p.batch, p.context, p.config, p.n_splits, p.split_len, p.ms_per_step, p.gbps, 100 * p.frac_of_copy,
                     p.fp16_ms_per_step, p.fp16_gbps, 100 * p.fp16_frac_of_copy, p.speedup);
  const auto& m = r.memory;
  s += fmt::format(
      "\nmemory, LLaMA-3-8B shape (32 layers, 8 KV heads, d 128), {}: {:.1f} bytes/token (K+V codes + 1% anchors with "
      "positions), codebooks {:.1f} MB, window {:.1f} MB, weights {:.2f} GB, reserve {:.1f} GB; free {:.1f} of {:.1f} GB\n"
      "  max context: {} tokens (cache only), {} tokens (with the bf16 weights resident)\n",
      m.config, m.bytes_per_token, m.codebook_bytes / 1e6, m.window_bytes / 1e6, m.weights_bytes / 1e9, m.reserve_bytes / 1e9,
      m.free_bytes / 1e9, m.total_bytes / 1e9, m.max_context_cache_only, m.max_context_with_weights);
  s += "\nlong context, one layer, batch 1\n  context     splits x len   ms/step   layer GB  %copy  finite  fp16 ms\n";
  for (const auto& l : r.long_runs) {
    if (l.ran)
      s += fmt::format("  {:9d}  {:5d} x {:<6d}  {:8.3f}  {:8.2f}  {:5.1f}  {:6s}  {:7.3f}\n", l.context, l.n_splits, l.split_len,
                       l.ms_per_step, l.layer_cache_bytes / 1e9, 100 * l.frac_of_copy, l.finite ? "yes" : "NO",
                       l.fp16_ms_per_step);
    else
      s += fmt::format("  {:9d}  skipped: {}\n", l.context, l.note);
  }
  return s;
}

}  // namespace antkv::cuda
