#include "kernels/bench/method_bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "kernels/attention/commute_decode.h"
#include "kernels/bench/bench.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/cuda_timing.h"
#include "kernels/common/device_buffer.h"
#include "kernels/quant/compressed_cache.h"
#include "kernels/quant/uniform_cache.h"
#include "kernels/runtime/gpu_runtime.h"
#include "kernels/runtime/ops.h"
#include "quant/method.h"
#include "quant/method_support.h"
#include "recipe/recipe.h"

namespace antkv::cuda {

BenchMethod parse_bench_method(const std::string& text, MethodPath path, const ModelShapeFacts* shape) {
  BenchMethod b;
  b.text = text;
  const MethodSpec m = parse_method(text, Recipe::defaults_with({}));
  // a row must time the method it names: what the real caches do not run is an error, not a plain-vq row
  require_support(m, path, shape);  // quant/method_support.h
  if (m.kind == MethodKind::kFp16) return b;
  if (m.kind == MethodKind::kUniform) {
    b.uniform = true;
    b.uniform_bits = m.bits;
    b.uniform_group = m.group;
    b.uniform_window = m.window;
    return b;
  }
  ANTKV_CHECK(m.needs_codebooks(), "--method {}: internal error: method_support let {} through", text, m.kind_name());
  auto kernel_config = [](VqConfig q) { return parse_vq_kernel_config(fmt::format("c{}b{}", q.c, q.b)); };
  for (int l = 0; l < std::max(1, m.listed_layers()); ++l) {  // widths of quant_decode's closed set (method_support)
    b.key_configs.push_back(kernel_config(m.key_config(l)));
    b.value_configs.push_back(kernel_config(m.value_config(l)));
  }
  b.config = b.key_configs.at(0);
  // gain=, rotate=pca: the coded transform with synthetic scales, basis and mean (post- and pre-RoPE keys, gain with
  // commute); metric=task and norm=fp8 change which codes and scales are written, not the decode
  b.gain_keys = m.gain_keys();
  b.gain_values = m.gain_values();
  b.rotate = m.rotate == Rotate::kPca;
  b.compressed = true;
  b.anchor_ratio = m.kind == MethodKind::kAntkv && m.has_anchors() ? m.ratio : 0.0;
  b.pre_rope = m.pre_rope();
  b.commute = m.commute();
  ANTKV_CHECK(!b.commute || commute_decode_supports(b.config), "--method {}: internal error: method_support let "
              "key_rope=commute through at {}", text, vq_kernel_config_info(b.config).name);
  b.promote = b.anchor_ratio > 0 && m.promotes();
  return b;
}

namespace {
// Each layer's configurations of method m on a model of cfg's layers (one entry: every layer).
std::vector<GpuCompressedKvCache::LayerWidths> layer_widths(const ModelConfig& cfg, const BenchMethod& m) {
  const size_t n = m.key_configs.size();  // parse_bench_method gives a compressed method one entry or more
  ANTKV_CHECK(n == m.value_configs.size() && (n == 1 || n == static_cast<size_t>(cfg.num_layers)),
              "--method {}: lkbits/lvbits list {} layers, the model has {}", m.text, n, cfg.num_layers);
  std::vector<GpuCompressedKvCache::LayerWidths> w;
  for (int l = 0; l < cfg.num_layers; ++l)
    w.push_back({m.key_configs[n == 1 ? 0 : l], m.value_configs[n == 1 ? 0 : l]});
  return w;
}
}  // namespace

double sequence_cache_bytes(const ModelConfig& cfg, const BenchMethod& m, int capacity) {
  if (m.uniform)
    return GpuUniformKvCache::sequence_bytes(cfg, m.uniform_bits, m.uniform_group, m.uniform_window, capacity);
  if (!m.compressed) return static_cast<double>(capacity) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2;
  const auto widths = layer_widths(cfg, m);
  double recs = 0;  // key and value record bytes summed over the layers
  for (const auto& w : widths) recs += vq_record_bytes(cfg.head_dim, w.keys) + vq_record_bytes(cfg.head_dim, w.values);
  const double acap = m.anchor_ratio > 0 ? std::min<double>(capacity, std::ceil(m.anchor_ratio * capacity) + 1) : 0;
  const double per_layer = cfg.num_kv_heads * (2.0 * acap * cfg.head_dim * 2 + acap * 4 +
                                               2.0 * m.window * cfg.head_dim * 2 +
                                               (m.pre_rope ? 4.0 * capacity + m.window * cfg.head_dim * 2.0 : 0.0) +
                                               (m.promote ? 4.0 * (acap + m.window) + (m.pre_rope ? acap * cfg.head_dim * 2.0 : 0.0)
                                                          : 0.0) +
                                               2.0 * capacity * (int{m.gain_keys} + int{m.gain_values}));  // fp16 scales
  return per_layer * cfg.num_layers + cfg.num_kv_heads * static_cast<double>(capacity) * recs;
}

namespace {

double weight_bytes_estimate(const ModelConfig& cfg) {
  return 2.0 * (static_cast<double>(cfg.num_layers) *
                    (static_cast<double>(cfg.hidden_size) * (cfg.q_dim() + 2 * cfg.kv_dim()) +
                     static_cast<double>(cfg.hidden_size) * cfg.q_dim() + 3.0 * cfg.hidden_size * cfg.intermediate_size) +
                (cfg.tie_word_embeddings ? 1.0 : 2.0) * cfg.vocab_size * cfg.hidden_size);
}
constexpr double kReserve = 4e9;  // activations, logits, cuBLAS and decode workspaces, CUDA context

double free_bytes() {
  size_t f = 0, t = 0;
  ANTKV_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  return static_cast<double>(f);
}

std::unique_ptr<GpuRuntime> make_runtime(const ModelConfig& cfg, const BenchMethod& m, int B, int capacity,
                                         uint64_t seed, UniformDecodeKernel uniform_kernel) {
  GpuRuntimeOptions ro;
  ro.max_batch = B;
  ro.max_context = capacity;
  ro.compressed_kv = m.compressed;
  ro.uniform_kv = m.uniform;
  auto rt = std::make_unique<GpuRuntime>(cfg, seed, ro);
  if (m.uniform) {
    auto cache = std::make_unique<GpuUniformKvCache>(cfg, m.uniform_bits, m.uniform_group, m.uniform_window, B, capacity);
    cache->set_decode_kernel(uniform_kernel);
    rt->set_uniform_cache(std::move(cache));
  }
  if (m.compressed)
    rt->set_compressed_cache(
        std::make_unique<GpuCompressedKvCache>(cfg, layer_widths(cfg, m), m.anchor_ratio, B, capacity, m.window, seed + 7, m.pre_rope,
                                               m.promote, m.gain_keys, m.gain_values, m.rotate,
                                               m.commute));
  rt->fill_kv_random(seed + 1);
  return rt;
}

// A packed cache's attention over every layer (layer after layer, so no step finds its codes in L2): the
// compressed (vq/antkv) or the uniform cache, both with set_synthetic_lengths / upload_counts / plan / attend.
template <class Cache>
double time_cache_attention(const ModelConfig& cfg, Cache& cache, int B, int ctx, int iters) {
  Stream st;
  cache.set_synthetic_lengths(std::vector<int>(B, ctx));
  cache.upload_counts(B, st.get());
  DeviceBuffer<bf16> q(static_cast<size_t>(B) * cfg.num_heads * cfg.head_dim), out(q.size());
  fill_random_bf16(q.get(), static_cast<int64_t>(q.size()), 3, 1.0f, st.get());
  const auto plan = cache.plan(B, cfg.num_heads);
  const float scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  auto step = [&] {
    for (int l = 0; l < cfg.num_layers; ++l) cache.attend(l, B, cfg.num_heads, q.get(), out.get(), plan, scale, st.get());
  };
  step();
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(st.get()));
  Events ev;
  ev.start(st.get());
  for (int i = 0; i < iters; ++i) step();
  return ev.stop_ms(st.get()) / iters;
}

double time_compressed_attention(const ModelConfig& cfg, GpuCompressedKvCache& cache, int B, int ctx, int iters,
                                 double* bytes) {
  const double ms = time_cache_attention(cfg, cache, B, ctx, iters);
  const auto& s = cache.state(0);
  // codes of K and V with their gain scales (each layer's widths: code_bytes_per_token), code positions, FP16 rows
  *bytes = static_cast<double>(B) * s.n_quant * static_cast<double>(cache.code_bytes_per_token()) +
           static_cast<double>(B) * cfg.num_layers * cfg.num_kv_heads *
           ((cache.pre_rope() ? 4.0 * s.n_quant : 0.0) + 2.0 * (s.n_anchor + s.n_window) * cfg.head_dim * 2);
  return ms;
}

double time_uniform_attention(const ModelConfig& cfg, GpuUniformKvCache& cache, int B, int ctx, int iters,
                              double* bytes) {
  const double ms = time_cache_attention(cfg, cache, B, ctx, iters);
  *bytes = static_cast<double>(B) * cfg.num_layers *
           GpuUniformKvCache::attention_bytes(cfg, cache.bits(), cache.group(), cache.window(), ctx);
  return ms;
}

MethodDecodePoint bench_point(const ModelConfig& cfg, const BenchMethod& m, int B, int ctx, bool equal_memory,
                              const MethodBenchOptions& o, double copy_gbps) {
  MethodDecodePoint r;
  r.method = m.text;
  r.batch = B;
  r.context = ctx;
  r.equal_memory = equal_memory;
  const int warm = 3, steps = std::max(5, o.iters);
  const int capacity = ctx + warm + steps + 1;
  r.seq_cache_bytes = sequence_cache_bytes(cfg, m, capacity);
  const double need = weight_bytes_estimate(cfg) + B * r.seq_cache_bytes + kReserve;
  const double have = free_bytes();
  if (need > have) {
    r.note = fmt::format("end to end needs {:.1f} GB, {:.1f} GB free", need / 1e9, have / 1e9);
    if (!m.compressed && !m.uniform) {  // the attention kernel alone still fits: measured for the kernel comparison
      Stream st;
      const auto p = bench_flash_decode(B, ctx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 1, std::max(3, o.iters / 4),
                                        copy_gbps, st.get());
      r.attn_ms_per_step = p.ms_per_step * cfg.num_layers;
      r.attn_bytes_per_step = static_cast<double>(B) * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2;
      r.attn_frac_of_copy = r.attn_bytes_per_step / (r.attn_ms_per_step * 1e-3) / (copy_gbps * 1e9);
      r.note += "; attention alone measured";
    }
    return r;
  }
  auto rt = make_runtime(cfg, m, B, capacity, o.seed, o.uniform_kernel);
  if (o.e2e) {
    r.ms_per_step = time_decode_steps(*rt, B, ctx, warm, steps, cfg.vocab_size, true);
    r.tokens_per_s = B / (r.ms_per_step * 1e-3);
  }
  const double weights = static_cast<double>(rt->step_weight_bytes());
  if (m.uniform) {
    r.attn_ms_per_step = time_uniform_attention(cfg, *rt->uniform_cache(), B, ctx, std::max(3, o.iters / 4),
                                                &r.attn_bytes_per_step);
  } else if (m.compressed) {
    r.attn_ms_per_step = time_compressed_attention(cfg, *rt->compressed_cache(), B, ctx, std::max(3, o.iters / 4),
                                                   &r.attn_bytes_per_step);
  } else {
    Stream st;
    rt.reset();  // the runtime goes: its arena's memory is needed for the kernel benchmark's own caches
    const auto p = bench_flash_decode(B, ctx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 1, std::max(3, o.iters / 4),
                                      copy_gbps, st.get());
    r.attn_ms_per_step = p.ms_per_step * cfg.num_layers;
    r.attn_bytes_per_step = static_cast<double>(B) * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2;
  }
  r.attn_frac_of_copy = r.attn_bytes_per_step / (r.attn_ms_per_step * 1e-3) / (copy_gbps * 1e9);
  r.bytes_per_step = weights + r.attn_bytes_per_step;
  if (o.e2e) r.frac_of_copy = r.bytes_per_step / (r.ms_per_step * 1e-3) / (copy_gbps * 1e9);
  r.ran = true;
  return r;
}

}  // namespace

MethodBenchResult run_method_bench(const MethodBenchOptions& o, const std::function<void(const std::string&)>& log) {
  auto say = [&](const std::string& s) {
    if (log) log(s);
  };
  MethodBenchResult r;
  int dev = 0;
  ANTKV_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  ANTKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  r.device = fmt::format("{} ({} SMs, {:.0f} GiB)", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);
  r.copy_gbps = measure_copy_bandwidth_gbps();
  say(fmt::format("device {}: copy bandwidth {:.0f} GB/s", r.device, r.copy_gbps));
  std::vector<BenchMethod> methods;
  const ModelShapeFacts shape = ModelShapeFacts::of(o.cfg);
  for (const auto& t : o.methods) methods.push_back(parse_bench_method(t, MethodPath::kBench, &shape));
  auto record = [&](MethodDecodePoint p) {
    if (p.ran)
      say(fmt::format("{} B={} ctx={}{}: {}attention {:.2f} ms/step ({:.0f}% of copy bw), cache {:.2f} GB/seq",
                      p.method, p.batch, p.context, p.equal_memory ? " (largest batch)" : "",
                      p.ms_per_step > 0 ? fmt::format("{:.2f} ms/step, {:.1f} tok/s; ", p.ms_per_step, p.tokens_per_s)
                                        : std::string(),
                      p.attn_ms_per_step, 100 * p.attn_frac_of_copy, p.seq_cache_bytes / 1e9));
    else
      say(fmt::format("{} B={} ctx={}: skipped: {}{}", p.method, p.batch, p.context, p.note,
                      p.attn_ms_per_step > 0 ? fmt::format(" ({:.2f} ms/step)", p.attn_ms_per_step) : std::string()));
    r.points.push_back(std::move(p));
  };
  for (const auto& m : methods)
    for (int ctx : o.contexts) {
      for (int B : o.batches) record(bench_point(o.cfg, m, B, ctx, false, o, r.copy_gbps));
      if (o.equal_memory) {
        const double per_seq = sequence_cache_bytes(o.cfg, m, ctx + 3 + std::max(5, o.iters) + 1);
        const double budget = free_bytes() - weight_bytes_estimate(o.cfg) - kReserve;
        const int B = static_cast<int>(std::clamp<double>(std::floor(budget / per_seq), 0, o.max_batch_cap));
        if (B >= 1) record(bench_point(o.cfg, m, B, ctx, true, o, r.copy_gbps));
      }
    }
  return r;
}

std::string format_method_bench(const MethodBenchResult& r) {
  std::string s = fmt::format("device {}; copy bandwidth {:.0f} GB/s\n", r.device, r.copy_gbps);
  s += fmt::format("{:<24} {:>6} {:>8} {:>10} {:>10} {:>9} {:>10} {:>8} {:>9} {:>10}\n", "method", "batch", "context",
                   "ms/step", "tok/s", "%copy", "attn ms", "attn %", "GB/seq", "note");
  for (const auto& p : r.points) {
    if (!p.ran) {
      const std::string attn = p.attn_ms_per_step > 0 ? fmt::format("{:.2f}", p.attn_ms_per_step) : "-";
      const std::string attn_pct = p.attn_ms_per_step > 0 ? fmt::format("{:.1f}%", 100 * p.attn_frac_of_copy) : "-";
      s += fmt::format("{:<24} {:>6} {:>8} {:>10} {:>10} {:>9} {:>10} {:>8} {:>9.2f} {}\n", p.method, p.batch, p.context,
                       "-", "-", "-", attn, attn_pct, p.seq_cache_bytes / 1e9, p.note);
      continue;
    }
    const bool timed = p.ms_per_step > 0;  // the whole-model step (not with --no-e2e)
    s += fmt::format("{:<24} {:>6} {:>8} {:>10} {:>10} {:>9} {:>10.2f} {:>7.1f}% {:>9.2f} {}\n", p.method, p.batch,
                     p.context, timed ? fmt::format("{:.2f}", p.ms_per_step) : "-",
                     timed ? fmt::format("{:.1f}", p.tokens_per_s) : "-",
                     timed ? fmt::format("{:.1f}%", 100 * p.frac_of_copy) : "-", p.attn_ms_per_step,
                     100 * p.attn_frac_of_copy, p.seq_cache_bytes / 1e9, p.equal_memory ? "largest batch" : "");
  }
  return s;
}

std::vector<MaxContextPoint> run_max_context(const ModelConfig& cfg, const std::vector<std::string>& methods,
                                             const std::function<void(const std::string&)>& log) {
  std::vector<MaxContextPoint> out;
  const ModelShapeFacts shape = ModelShapeFacts::of(cfg);
  for (const auto& text : methods) {
    const BenchMethod m = parse_bench_method(text, MethodPath::kMaxContext, &shape);
    MaxContextPoint p;
    p.method = text;
    const double budget = free_bytes() - weight_bytes_estimate(cfg) - kReserve;
    // the largest capacity whose cache fits the budget (the cache grows monotonically with capacity)
    int64_t lo = 0, hi = int64_t{1} << 30;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (sequence_cache_bytes(cfg, m, static_cast<int>(std::min<int64_t>(mid, INT32_MAX))) <= budget) lo = mid;
      else hi = mid - 1;
    }
    int cap = static_cast<int>(std::min<int64_t>(lo, INT32_MAX - 1));
    for (int attempt = 0; attempt < 8 && cap > 64; ++attempt) {
      try {
        auto rt = make_runtime(cfg, m, 1, cap, 1, kDefaultUniformDecodeKernel);
        const int steps = 4;
        p.ms_per_step = time_decode_steps(*rt, 1, cap - steps - 3, 2, steps, cfg.vocab_size, true);
        p.tokens_per_s = 1e3 / p.ms_per_step;
        p.context = cap - 1;
        p.cache_gib = sequence_cache_bytes(cfg, m, cap) / 1073741824.0;
        p.ran = true;
        break;
      } catch (const Error& e) {
        p.note = e.what();
        (void)cudaGetLastError();
        cap = static_cast<int>(cap * 0.96);
      }
    }
    if (log)
      log(p.ran ? fmt::format("{}: {} tokens of context decode on this GPU ({:.1f} GiB cache, {:.1f} ms/step)", text,
                              p.context, p.cache_gib, p.ms_per_step)
                : fmt::format("{}: no context fits: {}", text, p.note));
    out.push_back(p);
  }
  return out;
}

std::string format_max_context(const std::vector<MaxContextPoint>& r) {
  std::string s = fmt::format("{:<24} {:>12} {:>10} {:>10} {:>10}\n", "method", "max context", "cache GiB", "ms/step",
                              "tok/s");
  for (const auto& p : r)
    s += p.ran ? fmt::format("{:<24} {:>12} {:>10.1f} {:>10.1f} {:>10.2f}\n", p.method, p.context, p.cache_gib,
                             p.ms_per_step, p.tokens_per_s)
               : fmt::format("{:<24} {:>12} {}\n", p.method, "-", p.note);
  return s;
}

}  // namespace antkv::cuda
