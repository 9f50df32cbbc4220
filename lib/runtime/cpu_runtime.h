// The CPU reference runtime (Eigen GEMMs, OpenMP). Weights are converted to fp32 once when they fit in
// the memory budget; otherwise each layer is converted from the memory-mapped checkpoint when used.
#pragma once
#include <memory>
#include <vector>

#include "model/checkpoint.h"
#include "runtime/kv_cache.h"
#include "runtime/runtime.h"

namespace antkv {

struct CpuRuntimeOptions {
  int threads = 0;                    // 0 = all cores (OpenMP default)
  KvDType kv_dtype = KvDType::kF16;   // the dense cache's storage type
  double resident_budget_gb = -1;     // fp32 weights kept resident below this; <0 = half the RAM
  int lm_head_chunk = 256;            // rows of logits materialized at once for NLL
};

class CpuRuntime : public Runtime {
 public:
  CpuRuntime(const Checkpoint& ckpt, CpuRuntimeOptions opts = {});
  ~CpuRuntime() override;

  const ModelConfig& config() const override { return cfg_; }
  std::string device_name() const override;
  void reset() override { cache_->reset(); }
  int cached_tokens() const override { return cache_->length(0); }
  void forward(const ForwardRequest& req, ForwardResult& out) override;

  // Replaces the KV cache (quantizers); the runtime owns it.
  void set_kv_cache(std::unique_ptr<KvCache> cache) { cache_ = std::move(cache); }
  KvCache& kv_cache() { return *cache_; }

 private:
  struct LayerWeights;
  const LayerWeights& layer(int l);

  const Checkpoint& ckpt_;
  ModelConfig cfg_;
  CpuRuntimeOptions opts_;
  std::vector<float> inv_freq_;
  std::vector<float> embed_, final_norm_, lm_head_;  // [vocab, h], [h], [vocab, h] (empty when tied)
  std::vector<std::unique_ptr<LayerWeights>> layers_;  // resident; or one scratch slot when streaming
  bool resident_ = true;
  int scratch_layer_ = -1;
  std::unique_ptr<KvCache> cache_;
};

// Blocked causal GQA attention on Eigen GEMMs (the fast CPU path; cpu::attention is the naive reference).
// Same arguments as cpu::attention, plus optional key_err: [n_kv_tokens, n_kv_heads] per-channel mean squared
// quantization error e_j of each key; when given, score s_ij gets + scale^2 |q_i|^2 e_j / 2 (the expected
// exp-mass a token loses when its key is replaced by a centroid: E[exp(ds)] = exp(var(ds) / 2)).
void attention_blocked(const float* q, const float* k, const float* v, float* out, float* lse, int n_q,
                       int n_kv_tokens, int n_heads, int n_kv_heads, int d, float scale,
                       const float* key_err = nullptr);

}  // namespace antkv
