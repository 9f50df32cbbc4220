// Which code path runs which KV-cache method: one declaration (ggml's supports_op is the model). Every path asks
// it before it builds a cache (require_support), antkv-eval asks it for every method of a recipe before any
// calibration or training (recipe_support_errors), and `antkv-eval methods` prints it; docs/METHODS.md's
// "Where each runs" table is generated from it (methods_support_markdown). The rules themselves are the tables
// in method_support.cpp, one line per rule: a path that gains an option loses one line there.
#pragma once
#include <string>
#include <vector>

#include "model/model_config.h"
#include "quant/method.h"
#include "quant/method_options.h"
#include "recipe/recipe.h"

namespace antkv {

// The code paths that hold a quantized KV cache (docs/METHODS.md, "Where each runs").
enum class MethodPath {
  kCpu,           // cpu: QuantizedKvCache, the reference (eval.device: cpu, diagnose)
  kGpuSimulated,  // simulated: GpuKvQuantizer over the bf16 cache (eval.device: cuda, eval.kv_cache: simulated)
  kGpuReal,       // real: the compressed vq/antkv cache, the packed uniform cache (eval.kv_cache: real)
  kBench,         // bench: antkv-eval bench --method (the real caches with synthetic contents)
  kMaxContext,    // max-context: antkv-eval max-context (the same caches)
};
template <>
const std::vector<OptionSpelling<MethodPath>>& option_spellings<MethodPath>();

// What a path's rules may know of the model: shape-dependent rules (head_dim of the kernels, rsq's power-of-2
// head_dim, c dividing head_dim, GQA group) apply only when these are given.
struct ModelShapeFacts {
  int head_dim = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int num_layers = 0;  // 0: unknown (the rules that need it pass)
  int gqa_group() const { return num_kv_heads > 0 ? num_heads / num_kv_heads : 0; }
  static ModelShapeFacts of(const ModelConfig& c) { return {c.head_dim, c.num_heads, c.num_kv_heads, c.num_layers}; }
};

struct PathSupport {
  bool runs = false;
  std::string reason;  // when it does not run: one line naming the method, the option and what to use instead
  std::string why;     // the rule's own words (reason without the method and the path), for tables
  std::string note;    // when it runs: what the path does not read or does differently, and why that is fine
};

// Whether path p runs method m (on a model of this shape, when given).
PathSupport method_support(const MethodSpec& m, MethodPath p, const ModelShapeFacts* shape = nullptr);
// The same; an antkv::Error with the reason when it does not run.
void require_support(const MethodSpec& m, MethodPath p, const ModelShapeFacts* shape = nullptr);

// The paths an evaluation with eval.device `device` (cpu | cuda) and eval.kv_cache `kv_cache` (simulated | real)
// runs m through: real caches for vq/antkv (their simulated quantizer still chooses the prefill's anchors) and
// uniform (the packed cache); fp16 and rsq are evaluated on the simulated cache there.
std::vector<MethodPath> eval_paths(const MethodSpec& m, const std::string& device, const std::string& kv_cache);
// "real" when eval_paths runs m on a real cache, else "simulated": the kv_cache label of m's results.
std::string eval_kv_cache(const MethodSpec& m, const std::string& device, const std::string& kv_cache);

// Every method of r.eval.methods against the paths the recipe evaluates them on: one line per refusal (empty:
// all run). eval.device "auto" (not resolved yet) checks the GPU paths only for eval.kv_cache: real (which needs
// the GPU) and nothing otherwise; call it again once the device is resolved and the model's shape is known.
std::vector<std::string> recipe_support_errors(const Recipe& r, const ModelShapeFacts* shape = nullptr);
// The same as one antkv::Error: a first line naming the recipe, then one line per refused method.
void require_recipe_support(const Recipe& r, const ModelShapeFacts* shape = nullptr);

// The methods table: every method kind and every option value (a representative method string each) against
// every path, and a few examples of the shape rules ("rsq:bits=2 (head_dim 80)"). `antkv-eval methods` prints it
// (text, --json: per path {runs, note} or {runs, rule, reason}); docs/METHODS.md holds the markdown form between
// marker comments (scripts/methods_table.py pastes it, tests/test_method_support.cpp compares).
struct MethodSupportRow {
  std::string method;                // the representative method string
  std::string shape;                 // a shape example's model facts ("head_dim 80"), else empty
  std::vector<PathSupport> paths;    // in MethodPath order
};
std::vector<MethodSupportRow> methods_support_table();
std::string methods_support_markdown();
std::string methods_support_text();
std::string methods_support_json();

}  // namespace antkv
