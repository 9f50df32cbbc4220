#include "eval/diagnostics.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/text_file.h"
#include "core/atomic_file.h"
#include "eval/compare.h"
#include "eval/perplexity.h"
#include "tokenizer/tokenizer.h"
#include "quant/quantized_cache.h"
#include "runtime/cpu_runtime.h"

namespace antkv {

struct DiagnosticKvCache::Impl {
  ModelConfig cfg;
  DenseKvCache base;
  std::vector<std::unique_ptr<QuantizedKvCache>> caches;
  Impl(const ModelConfig& c) : cfg(c), base(c, KvDType::kF16) {}
};

DiagnosticKvCache::DiagnosticKvCache(const ModelConfig& cfg, const std::vector<Compared>& methods)
    : impl_(std::make_unique<Impl>(cfg)) {
  ANTKV_CHECK(!methods.empty(), "diagnostics: no method to compare");
  for (const auto& m : methods) {
    impl_->caches.push_back(std::make_unique<QuantizedKvCache>(cfg, m.method, m.codebooks));
    MethodDiagnostics d;
    d.method = m.method;
    d.layers.resize(cfg.num_layers);
    results_.push_back(std::move(d));
  }
}
DiagnosticKvCache::~DiagnosticKvCache() = default;

void DiagnosticKvCache::reset() {
  impl_->base.reset();
  for (auto& c : impl_->caches) c->reset();
}
int DiagnosticKvCache::length(int layer) const { return impl_->base.length(layer); }
const float* DiagnosticKvCache::keys(int layer) const { return impl_->base.keys(layer); }
const float* DiagnosticKvCache::values(int layer) const { return impl_->base.values(layer); }
size_t DiagnosticKvCache::stored_bytes() const { return impl_->base.stored_bytes(); }

namespace {

// Sum over query rows i and heads h of the attention weight on the keys in `keys_of[g]` (kv head g),
// causal (key j <= position of row i): exp(scale q.k_j + corr_j - lse_hi).
double attention_mass(const float* q, const float* k, const float* lse, const float* key_err, int n_q, int past,
                      int H, int Hkv, int d, float scale, const std::vector<std::vector<int>>& keys_of) {
  const int G = H / Hkv;
  double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (int h = 0; h < H; ++h) {
    const int g = h / G;
    for (int i = 0; i < n_q; ++i) {
      const float* qi = q + (static_cast<int64_t>(i) * H + h) * d;
      float q2 = 0;
      if (key_err)
        for (int e = 0; e < d; ++e) q2 += qi[e] * qi[e];
      for (int j : keys_of[g]) {
        if (j > past + i) break;  // sorted
        const float* kj = k + (static_cast<int64_t>(j) * Hkv + g) * d;
        float s = 0;
        for (int e = 0; e < d; ++e) s += qi[e] * kj[e];
        s *= scale;
        if (key_err) s += 0.5f * scale * scale * q2 * key_err[static_cast<int64_t>(j) * Hkv + g];
        total += std::exp(static_cast<double>(s) - lse[static_cast<int64_t>(h) * n_q + i]);
      }
    }
  }
  return total;
}

}  // namespace

void DiagnosticKvCache::append(const KvAppend& a) {
  ANTKV_CHECK(a.q, "diagnostics: the runtime did not pass the layer's queries");
  impl_->base.append(a);
  for (auto& c : impl_->caches) c->append(a);
  const ModelConfig& cfg = impl_->cfg;
  const int H = cfg.num_heads, Hkv = cfg.num_kv_heads, d = cfg.head_dim, n = a.n_tokens;
  const int L = impl_->base.length(a.layer), past = L - n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float* q = a.q;  // [n, H, d] fp32, as the runtime's attention reads them
  const size_t q_elems = static_cast<size_t>(n) * H * d;
  std::vector<float> o_ref(q_elems), lse_ref(static_cast<size_t>(H) * n), o(q_elems), lse(lse_ref.size());
  attention_blocked(q, impl_->base.keys(a.layer), impl_->base.values(a.layer), o_ref.data(), lse_ref.data(), n,
                    L, H, Hkv, d, scale);
  double ref2 = 0;
  for (float x : o_ref) ref2 += static_cast<double>(x) * x;

  // anchors of reference: the first compared cache that keeps any at this layer
  std::vector<std::vector<int>> anchors(Hkv), sink(Hkv, std::vector<int>{0});
  for (auto& c : impl_->caches) {
    const auto& flags = c->anchor_flags(a.layer);
    bool any = false;
    for (size_t j = 0; j < flags.size() && !any; ++j) any = flags[j] != 0;
    if (!any) continue;
    for (int j = 0; j < L; ++j)
      for (int g = 0; g < Hkv; ++g)
        if (flags[static_cast<size_t>(j) * Hkv + g]) anchors[g].push_back(j);
    break;
  }
  const double sink_ref = attention_mass(q, impl_->base.keys(a.layer), lse_ref.data(), nullptr, n, past, H, Hkv,
                                         d, scale, sink);
  const double anchor_ref = attention_mass(q, impl_->base.keys(a.layer), lse_ref.data(), nullptr, n, past, H,
                                           Hkv, d, scale, anchors);
  for (size_t m = 0; m < impl_->caches.size(); ++m) {
    const QuantizedKvCache& c = *impl_->caches[m];
    const float* kerr = c.key_error(a.layer);
    attention_blocked(q, c.keys(a.layer), c.values(a.layer), o.data(), lse.data(), n, L, H, Hkv, d, scale, kerr);
    double err2 = 0;
    for (size_t i = 0; i < o.size(); ++i) {
      const double e = static_cast<double>(o[i]) - o_ref[i];
      err2 += e * e;
    }
    LayerDiagnostics& r = results_[m].layers[a.layer];
    r.output_err2 += err2;
    r.output_ref2 += ref2;
    r.sink_mass_ref += sink_ref;
    r.anchor_mass_ref += anchor_ref;
    r.sink_mass += attention_mass(q, c.keys(a.layer), lse.data(), kerr, n, past, H, Hkv, d, scale, sink);
    r.anchor_mass += attention_mass(q, c.keys(a.layer), lse.data(), kerr, n, past, H, Hkv, d, scale, anchors);
    r.rows += static_cast<int64_t>(n) * H;
  }
}

std::vector<MethodDiagnostics> diagnose_methods(const DiagnoseOptions& o) {
  ANTKV_CHECK(o.recipe && o.ckpt && o.tok, "diagnose_methods: recipe, checkpoint and tokenizer needed");
  const Recipe& r = *o.recipe;
  ANTKV_CHECK(std::filesystem::is_regular_file(o.text), "{}: text not found", o.text);
  std::vector<MethodSpec> methods;
  for (const auto& s : r.eval.methods) methods.push_back(parse_method(s, r));
  auto books = load_method_codebooks(methods, o.codebook_dir, o.ckpt, o.allow_other_weights);
  std::vector<DiagnosticKvCache::Compared> compared;
  for (const auto& m : methods) compared.push_back({m, m.needs_codebooks() ? books[m.codebook_key()] : nullptr});
  CpuRuntimeOptions ro;
  ro.threads = o.threads;
  CpuRuntime rt(*o.ckpt, ro);
  auto cache = std::make_unique<DiagnosticKvCache>(o.ckpt->config(), compared);
  DiagnosticKvCache* diag = cache.get();
  rt.set_kv_cache(std::move(cache));
  PerplexityOptions po;
  po.seq_len = r.eval.seq_len;
  po.protocol = parse_window_protocol(r.eval.protocol);
  po.max_windows = r.eval.max_windows;
  po.seq_len_name = "eval.seq_len";  // diagnose has no --seq-len
  po.text_name = o.text;
  po.progress = o.progress;
  po.progress_label = "diagnostics on " + std::filesystem::path(o.text).filename().string();
  const auto ids = o.tok->encode(read_text_file(o.text), true);
  check_token_ids(ids, *o.ckpt, o.text);
  evaluate_perplexity(rt, ids, o.tok->bos_id(), po);
  return diag->results();
}

std::string diagnostics_table(const std::vector<MethodDiagnostics>& r) {
  std::string s;
  if (r.empty()) return s;
  s += fmt::format("{:>5}  {:<40} {:>12} {:>21} {:>21}\n", "layer", "method", "output err", "sink mass fp16->method",
                   "anchor mass fp16->m.");
  for (size_t l = 0; l < r[0].layers.size(); ++l) {
    for (const auto& m : r) {
      const LayerDiagnostics& d = m.layers[l];
      const double rows = std::max<int64_t>(1, d.rows);
      s += fmt::format("{:>5}  {:<40} {:>12.5f} {:>10.4f} -> {:<8.4f} {:>10.4f} -> {:<8.4f}\n", l,
                       m.method.text.substr(0, 40), d.output_error(), d.sink_mass_ref / rows, d.sink_mass / rows,
                       d.anchor_mass_ref / rows, d.anchor_mass / rows);
    }
  }
  s += "(teacher-forced: the model runs on its FP16 cache; output err = sum|o - o_fp16|^2 / sum|o_fp16|^2 of each\n"
       " layer's attention; masses are mean attention weights per query row and head; anchors: those of the first\n"
       " compared method that keeps any, so methods without anchors show the weight on the same tokens)\n";
  s += "mean over layers:\n";
  for (const auto& m : r) {
    double e = 0;
    for (const auto& d : m.layers) e += d.output_error();
    s += fmt::format("       {:<40} {:>12.5f}\n", m.method.text.substr(0, 40), e / m.layers.size());
  }
  return s;
}

nlohmann::json diagnostics_json(const std::vector<MethodDiagnostics>& r) {
  using json = nlohmann::json;
  json arr = json::array();
  for (const auto& m : r) {
    json layers = json::array();
    for (size_t l = 0; l < m.layers.size(); ++l) {
      const auto& d = m.layers[l];
      const double rows = std::max<int64_t>(1, d.rows);
      layers.push_back({{"layer", l}, {"output_error", d.output_error()}, {"sink_mass_fp16", d.sink_mass_ref / rows},
                        {"sink_mass", d.sink_mass / rows}, {"anchor_mass_fp16", d.anchor_mass_ref / rows},
                        {"anchor_mass", d.anchor_mass / rows}, {"rows", d.rows}});
    }
    arr.push_back({{"method", m.method.text}, {"layers", layers}});
  }
  return json{{"diagnostics", arr}};
}

}  // namespace antkv
