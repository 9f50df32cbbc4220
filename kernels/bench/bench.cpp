#include "kernels/bench/bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/cuda_timing.h"
#include "kernels/common/device_buffer.h"
#include "kernels/runtime/gpu_runtime.h"
#include "kernels/attention/flash_attention.h"
#include "model/model_shapes.h"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {

namespace {

PrefillPoint bench_prefill(int T, const KernelBenchOptions& o, cudaStream_t st) {
  const int H = o.n_heads, Hkv = o.n_kv_heads, d = o.head_dim;
  DeviceBuffer<bf16> q(static_cast<size_t>(T) * H * d), k(static_cast<size_t>(T) * Hkv * d),
      v(static_cast<size_t>(T) * Hkv * d), out(static_cast<size_t>(T) * H * d);
  DeviceBuffer<float> lse(static_cast<size_t>(H) * T);
  fill_random_bf16(q.get(), static_cast<int64_t>(q.size()), 11, 1.0f, st);
  fill_random_bf16(k.get(), static_cast<int64_t>(k.size()), 12, 1.0f, st);
  fill_random_bf16(v.get(), static_cast<int64_t>(v.size()), 13, 1.0f, st);
  FlashPrefillParams p;
  p.q = q.get();
  p.k = k.get();
  p.v = v.get();
  p.out = out.get();
  p.lse = lse.get();
  p.n_q = p.n_kv = T;
  p.n_heads = H;
  p.n_kv_heads = Hkv;
  p.head_dim = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.q_row_stride = p.o_row_stride = static_cast<int64_t>(H) * d;
  p.k_row_stride = p.v_row_stride = static_cast<int64_t>(Hkv) * d;
  p.k_head_stride = p.v_head_stride = d;
  for (int i = 0; i < 3; ++i) flash_prefill(p, st);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
  const int iters = std::max(5, o.iters / 2);
  Events ev;
  ev.start(st);
  for (int i = 0; i < iters; ++i) flash_prefill(p, st);
  const float ms = ev.stop_ms(st);
  PrefillPoint r;
  r.n_tokens = T;
  r.n_heads = H;
  r.n_kv_heads = Hkv;
  r.head_dim = d;
  r.ms = ms / iters;
  const double flops = 4.0 * d * H * (static_cast<double>(T) * (T + 1) / 2);
  r.tflops = flops / (r.ms * 1e-3) / 1e12;
  return r;
}

E2EPoint bench_e2e(int B, int ctx, const KernelBenchOptions& o, const ModelConfig& cfg, double copy_gbps) {
  E2EPoint r;
  r.batch = B;
  r.context = ctx;
  const int steps = std::max(5, o.iters);
  const int warm = 3;
  GpuRuntimeOptions ro;
  ro.max_batch = B;
  ro.max_context = ctx + warm + steps + 1;
  // memory check before allocating: weights + KV arena + ~4 GB of scratch
  const double kv_arena = static_cast<double>(B) * ro.max_context * cfg.num_layers * 2 * cfg.num_kv_heads *
                          cfg.head_dim * sizeof(bf16);
  const double weights = 2.0 * (static_cast<double>(cfg.num_layers) *
                                    (static_cast<double>(cfg.hidden_size) * (cfg.q_dim() + 2 * cfg.kv_dim()) +
                                     static_cast<double>(cfg.hidden_size) * cfg.q_dim() +
                                     3.0 * cfg.hidden_size * cfg.intermediate_size) +
                                2.0 * cfg.vocab_size * cfg.hidden_size);
  size_t free_b = 0, total_b = 0;
  ANTKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  if (kv_arena + weights + 4e9 > static_cast<double>(free_b)) {
    r.note = fmt::format("needs {:.1f} GB (weights {:.1f} + KV {:.1f}), {:.1f} GB free", (kv_arena + weights + 4e9) / 1e9,
                         weights / 1e9, kv_arena / 1e9, free_b / 1e9);
    return r;
  }
  GpuRuntime rt(cfg, o.seed, ro);
  rt.fill_kv_random(o.seed + 1);
  r.ms_per_step_eager = time_decode_steps(rt, B, ctx, warm, steps, cfg.vocab_size, false);
  r.ms_per_step = time_decode_steps(rt, B, ctx, warm, steps, cfg.vocab_size, true);
  r.ran = true;
  r.tokens_per_s = B / (r.ms_per_step * 1e-3);
  const double mean_ctx = ctx + warm + steps / 2.0;
  r.bytes_per_step = static_cast<double>(rt.step_weight_bytes()) + B * mean_ctx * rt.kv_bytes_per_token();
  r.roofline_ms = r.bytes_per_step / (copy_gbps * 1e9) * 1e3;
  r.roofline_tokens_per_s = B / (r.roofline_ms * 1e-3);
  r.frac_of_roofline = r.roofline_ms / r.ms_per_step;
  return r;
}

}  // namespace

DecodeAttnPoint bench_flash_decode(int B, int ctx, int H, int Hkv, int d, int waves, int min_iters, double copy_gbps,
                                   cudaStream_t st) {
  const size_t kv_elems = static_cast<size_t>(B) * Hkv * ctx * d;
  const double kv_bytes = 2.0 * kv_elems * sizeof(bf16);
  // several cache copies, rotated, so that no step finds the previous one's data in L2
  const int copies = static_cast<int>(std::clamp(std::ceil((1.0 * (size_t{1} << 30)) / kv_bytes), 1.0, 8.0));
  std::vector<DeviceBuffer<bf16>> ks(copies), vs(copies);
  for (int c = 0; c < copies; ++c) {
    ks[c].resize(kv_elems);
    vs[c].resize(kv_elems);
    fill_random_bf16(ks[c].get(), static_cast<int64_t>(kv_elems), 100 + 2 * c, 1.0f, st);
    fill_random_bf16(vs[c].get(), static_cast<int64_t>(kv_elems), 101 + 2 * c, 1.0f, st);
  }
  DeviceBuffer<bf16> q(static_cast<size_t>(B) * H * d), out(static_cast<size_t>(B) * H * d);
  fill_random_bf16(q.get(), static_cast<int64_t>(q.size()), 7, 1.0f, st);
  DeviceBuffer<int32_t> lens(B);
  std::vector<int32_t> hl(B, ctx);
  ANTKV_CUDA_CHECK(cudaMemcpyAsync(lens.get(), hl.data(), B * sizeof(int32_t), cudaMemcpyHostToDevice, st));
  DeviceBuffer<float> ws(decode_workspace_floats(B, H, d));
  DeviceBuffer<uint32_t> counters(decode_counter_count(B, Hkv));
  ANTKV_CUDA_CHECK(cudaMemsetAsync(counters.get(), 0, counters.bytes(), st));
  const DecodePlan plan = plan_flash_decode(B, Hkv, ctx, d, waves);
  FlashDecodeParams p;
  p.q = q.get();
  p.seq_lens = lens.get();
  p.out = out.get();
  p.workspace = ws.get();
  p.workspace_floats = static_cast<int64_t>(ws.size());
  p.split_counters = counters.get();
  p.batch = B;
  p.n_heads = H;
  p.n_kv_heads = Hkv;
  p.head_dim = d;
  p.capacity = ctx;
  p.n_splits = plan.n_splits;
  p.split_len = plan.split_len;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  auto step = [&](int i) {
    p.k_cache = ks[i % copies].get();
    p.v_cache = vs[i % copies].get();
    flash_decode(p, st);
  };
  for (int i = 0; i < 3; ++i) step(i);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
  // at least ~100 ms of work, at least min_iters steps
  const int iters = std::max(min_iters, static_cast<int>(0.1 / (kv_bytes / (copy_gbps * 1e9)) + 1));
  Events ev;
  ev.start(st);
  for (int i = 0; i < iters; ++i) step(i);
  const float ms = ev.stop_ms(st);
  DecodeAttnPoint r;
  r.batch = B;
  r.context = ctx;
  r.waves = waves;
  r.n_splits = plan.n_splits;
  r.split_len = plan.split_len;
  r.ms_per_step = ms / iters;
  r.bytes = kv_bytes + 2.0 * B * H * d * sizeof(bf16);
  r.gbps = r.bytes / (r.ms_per_step * 1e-3) / 1e9;
  r.frac_of_copy = r.gbps / copy_gbps;
  return r;
}


double time_decode_steps(GpuRuntime& rt, int B, int ctx, int warm, int steps, int vocab, bool graphs) {
  std::vector<int32_t> tok(B), next;
  for (int b = 0; b < B; ++b) tok[b] = (1 + 7919 * b) % vocab;
  rt.set_use_graphs(graphs);
  rt.set_batch_lengths(std::vector<int>(B, ctx));
  for (int i = 0; i < warm; ++i) {
    rt.decode_batch(tok, nullptr, &next);
    tok = next;
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    rt.decode_batch(tok, nullptr, &next);
    tok = next;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3 / steps;
}

ModelConfig llama3_8b_shape_config() {
  ModelConfig c = find_model_shape("llama3-8b").config();
  c.bos_token_id = 128000;  // LLaMA-3's tokenizer
  c.eos_token_id = 128001;
  c.torch_dtype = "bfloat16";
  return c;
}

double measure_copy_bandwidth_gbps(size_t bytes, int iters) {
  Stream st;
  DeviceBuffer<unsigned char> a(bytes), b(bytes);
  ANTKV_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, bytes, st.get()));
  for (int i = 0; i < 3; ++i)
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, st.get()));
  Events ev;
  ev.start(st.get());
  for (int i = 0; i < iters; ++i)
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(i % 2 ? a.get() : b.get(), i % 2 ? b.get() : a.get(), bytes,
                                     cudaMemcpyDeviceToDevice, st.get()));
  const float ms = ev.stop_ms(st.get());
  return 2.0 * bytes * iters / (ms * 1e-3) / 1e9;  // read + write
}

KernelBenchResult run_kernel_bench(const KernelBenchOptions& opt, const std::function<void(const std::string&)>& log) {
  auto say = [&](const std::string& s) {
    if (log) log(s);
  };
  KernelBenchResult r;
  int dev = 0;
  ANTKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  ANTKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  r.device = fmt::format("{} ({} SMs, {:.0f} GiB)", prop.name, prop.multiProcessorCount,
                         prop.totalGlobalMem / 1073741824.0);
  r.copy_gbps = measure_copy_bandwidth_gbps();
  say(fmt::format("device {}: copy bandwidth {:.0f} GB/s", r.device, r.copy_gbps));
  Stream st;
  for (int B : opt.decode_batches)
    for (int ctx : opt.decode_contexts)
      for (int waves : opt.decode_waves) {
        r.decode.push_back(bench_flash_decode(B, ctx, opt.n_heads, opt.n_kv_heads, opt.head_dim, waves, opt.iters, r.copy_gbps, st.get()));
        const auto& p = r.decode.back();
        say(fmt::format("decode attention B={} ctx={} waves={}: {:.4f} ms, {:.0f} GB/s, {:.1f}% of copy bw ({} splits x {})",
                        B, ctx, waves, p.ms_per_step, p.gbps, 100 * p.frac_of_copy, p.n_splits, p.split_len));
      }
  for (int T : opt.prefill_tokens) {
    r.prefill.push_back(bench_prefill(T, opt, st.get()));
    say(fmt::format("prefill attention T={}: {:.3f} ms, {:.1f} TFLOP/s", T, r.prefill.back().ms,
                    r.prefill.back().tflops));
  }
  for (int T : opt.anchor_tokens) {
    r.anchor.push_back(bench_anchor_scores(T, opt.n_heads, opt.n_kv_heads, opt.head_dim, opt.iters, st.get()));
    const auto& p = r.anchor.back();
    say(fmt::format("anchor scores T={}: pass1 {:.3f} ms ({:.1f} TFLOP/s), pass2 {:.3f} ms ({:.1f} TFLOP/s)", T,
                    p.ms_pass1, p.tflops_pass1, p.ms_pass2, p.tflops_pass2));
  }
  const ModelConfig cfg = opt.e2e_config.hidden_size > 0 ? opt.e2e_config : llama3_8b_shape_config();
  for (auto [B, ctx] : opt.e2e_points) {
    r.e2e.push_back(bench_e2e(B, ctx, opt, cfg, r.copy_gbps));
    const auto& p = r.e2e.back();
    if (p.ran)
      say(fmt::format("e2e decode B={} ctx={}: {:.2f} ms/step ({:.2f} without graphs), {:.1f} tok/s; roofline {:.2f} ms, "
                      "{:.1f} tok/s ({:.1f}%)",
                      B, ctx, p.ms_per_step, p.ms_per_step_eager, p.tokens_per_s, p.roofline_ms,
                      p.roofline_tokens_per_s, 100 * p.frac_of_roofline));
    else
      say(fmt::format("e2e decode B={} ctx={}: skipped: {}", B, ctx, p.note));
  }
  return r;
}

std::string format_kernel_bench(const KernelBenchResult& r) {
  std::string s = fmt::format("device: {}\ncopy bandwidth (D2D, read+write): {:.0f} GB/s\n\n", r.device, r.copy_gbps);
  s += "decode attention (bf16 KV, one layer; waves 1 = the runtime's plan)\n"
       "  batch  context  waves  splits x len   ms/step    GB/s  %copy-bw\n";
  for (const auto& p : r.decode)
    s += fmt::format("  {:5d}  {:7d}  {:5d}  {:6d} x {:<5d} {:8.4f}  {:6.0f}  {:7.1f}%\n", p.batch, p.context, p.waves,
                     p.n_splits, p.split_len, p.ms_per_step, p.gbps, 100 * p.frac_of_copy);
  s += "\nprefill flash attention (causal)\n  tokens  heads/kv  d    ms      TFLOP/s\n";
  for (const auto& p : r.prefill)
    s += fmt::format("  {:6d}  {:3d}/{:<3d}  {:3d}  {:7.3f}  {:7.1f}\n", p.n_tokens, p.n_heads, p.n_kv_heads, p.head_dim,
                     p.ms, p.tflops);
  if (!r.anchor.empty())
    s += "\nanchor-score pass (fp32, causal; kernels/anchor)\n"
         "  tokens  heads/kv  d    pass1-ms  TFLOP/s  pass2-ms  TFLOP/s  total-ms  workspace-MiB\n";
  for (const auto& p : r.anchor)
    s += fmt::format("  {:6d}  {:3d}/{:<3d}  {:3d}  {:8.3f}  {:7.1f}  {:8.3f}  {:7.1f}  {:8.3f}  {:13.1f}\n", p.n_tokens,
                     p.n_heads, p.n_kv_heads, p.head_dim, p.ms_pass1, p.tflops_pass1, p.ms_pass2, p.tflops_pass2,
                     p.ms_pass1 + p.ms_pass2, p.workspace_mib);
  s += "\nend-to-end decode (random weights, LLaMA-3-8B shapes; CUDA graph per step)\n"
       "  batch  context  ms/step  (eager)   tok/s  roofline-ms  roofline-tok/s  %roofline\n";
  for (const auto& p : r.e2e) {
    if (p.ran)
      s += fmt::format("  {:5d}  {:7d}  {:7.2f}  {:7.2f}  {:6.1f}  {:11.2f}  {:14.1f}  {:8.1f}%\n", p.batch, p.context,
                       p.ms_per_step, p.ms_per_step_eager, p.tokens_per_s, p.roofline_ms, p.roofline_tokens_per_s,
                       100 * p.frac_of_roofline);
    else
      s += fmt::format("  {:5d}  {:7d}  skipped: {}\n", p.batch, p.context, p.note);
  }
  return s;
}

}  // namespace antkv::cuda
