// Per-layer diagnostics of KV-cache methods (each layer's attention error under a method's quantized K/V, with
// and without FP16 anchors, and the attention weight on the sink and on the anchors), teacher-forced: the model
// runs on its FP16 cache, and every layer's appended K/V (with that layer's queries) also goes into each compared
// method's cache; the layer's attention over the method's cache is compared with attention over the FP16
// cache for the same queries. Errors therefore do not compound across layers: each layer's number is the
// damage its own quantized K/V does.
//
// Per layer and method, over all query rows and heads of the evaluated windows:
//   output_error     sum |o_method - o_fp16|^2 / sum |o_fp16|^2        (attention outputs, before o_proj)
//   sink_mass        mean attention weight on position 0 (the BOS / attention sink), FP16 and method
//   anchor_mass      mean attention weight on the method's FP16 anchors (antkv), FP16 and method; the
//                    shift shows how exact anchors gain weight over shrunk centroid keys
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/codebooks.h"
#include "model/checkpoint.h"
#include "quant/method.h"
#include "recipe/recipe.h"
#include "runtime/kv_cache.h"

namespace antkv {

class Tokenizer;

struct LayerDiagnostics {
  double output_err2 = 0, output_ref2 = 0;  // sums over rows, heads, channels
  double sink_mass_ref = 0, sink_mass = 0;  // sums over rows and heads
  double anchor_mass_ref = 0, anchor_mass = 0;
  int64_t rows = 0;                          // query rows x heads
  double output_error() const { return output_ref2 > 0 ? output_err2 / output_ref2 : 0; }
};

struct MethodDiagnostics {
  MethodSpec method;
  std::vector<LayerDiagnostics> layers;
};

// A KV cache that is the FP16 cache for the model and feeds every append to the compared methods' caches.
class DiagnosticKvCache : public KvCache {
 public:
  struct Compared {
    MethodSpec method;
    std::shared_ptr<const CodebookSet> codebooks;  // null for fp16 / uniform
  };
  DiagnosticKvCache(const ModelConfig& cfg, const std::vector<Compared>& methods);
  ~DiagnosticKvCache() override;
  std::string name() const override { return "diagnostics"; }
  void reset() override;
  int length(int layer) const override;
  void append(const KvAppend& a) override;
  const float* keys(int layer) const override;
  const float* values(int layer) const override;
  size_t stored_bytes() const override;

  const std::vector<MethodDiagnostics>& results() const { return results_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<MethodDiagnostics> results_;
};

// Runs the recipe's eval.methods over `text` (eval.seq_len, eval.protocol, eval.max_windows) on the CPU
// runtime with a DiagnosticKvCache; codebooks from codebook_dir.
struct DiagnoseOptions {
  const Recipe* recipe = nullptr;
  const Checkpoint* ckpt = nullptr;
  const Tokenizer* tok = nullptr;
  std::string text, codebook_dir;
  int threads = 0;
  bool allow_other_weights = false;  // codebooks of other weights than ckpt's: a warning instead of an error
  bool progress = true;
};
std::vector<MethodDiagnostics> diagnose_methods(const DiagnoseOptions& o);

// Text table: one block per layer, one row per method.
std::string diagnostics_table(const std::vector<MethodDiagnostics>& r);
nlohmann::json diagnostics_json(const std::vector<MethodDiagnostics>& r);

}  // namespace antkv
