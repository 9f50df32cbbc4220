// Evaluation of KV-cache methods side by side (design note §5): every method of a recipe on every text,
// perplexity with its quantized cache, nominal and effective bits, ΔPPL against fp16; and the whole
// pipeline (calibrate -> train codebooks -> perplexity) reusing outputs whose fingerprint matches.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "calibrate/calibrate.h"
#include "codebook/train_codebooks.h"
#include "eval/perplexity.h"
#include "io/codebooks.h"
#include "model/checkpoint.h"
#include "quant/method.h"
#include "recipe/recipe.h"

namespace antkv {

class Tokenizer;

// Makes a runtime whose KV cache implements `method` (codebooks may be null for fp16/uniform).
using MethodRuntimeFactory =
    std::function<std::unique_ptr<Runtime>(const MethodSpec& method, std::shared_ptr<const CodebookSet> codebooks)>;
MethodRuntimeFactory cpu_method_runtime_factory(const Checkpoint& ckpt, int threads = 0);

struct MethodResult {
  MethodSpec method;
  std::string text;           // path
  PerplexityResult ppl;
  double effective_bits = 0, effective_bits_no_codebooks = 0;
  double delta_ppl = 0;       // vs fp16 on the same text and windows (NaN when fp16 was not run)
  std::string kv_cache = "simulated";  // the recipe's eval.kv_cache (real: vq/antkv/uniform through the real GPU caches)
};

struct CompareOptions {
  const Recipe* recipe = nullptr;
  std::string codebook_dir;   // where <MethodSpec::codebook_file()> files are
  MethodRuntimeFactory make_runtime;
  // The evaluated checkpoint: each text's token ids are checked against its vocabulary, each codebook file against
  // its weights (eval/fingerprint.h check_same_weights; allow_other_weights: a warning). Null: neither check.
  const Checkpoint* ckpt = nullptr;
  bool allow_other_weights = false;
  bool progress = true;
};

std::vector<MethodResult> compare_methods(const Tokenizer& tok, const CompareOptions& o);

// The codebook files the methods need, from `dir` (named MethodSpec::codebook_file()), each loaded once;
// a missing file is an error naming the method and the path. With ckpt, each file must come from its weights
// (check_same_weights; allow_other_weights: a warning).
std::map<std::string, std::shared_ptr<const CodebookSet>> load_method_codebooks(const std::vector<MethodSpec>& methods,
                                                                               const std::string& dir,
                                                                               const Checkpoint* ckpt = nullptr,
                                                                               bool allow_other_weights = false);

// One table (method rows, text columns), the JSON object, the CSV.
std::string results_table(const std::vector<MethodResult>& r);
std::string results_json(const std::vector<MethodResult>& r, const Recipe& recipe, const std::string& device);
// What every recipe-driven results.json starts with: tool, version, timestamp, the recipe (YAML), model, hardware.
nlohmann::json recipe_results_header(const std::string& tool, const Recipe& recipe, const std::string& device);
std::string results_csv(const std::vector<MethodResult>& r);

// Fingerprints of what an output depends on (stored in its /meta; equal -> reusable; see eval/fingerprint.h).
// model_hash: Checkpoint::content_hash() (config, every weight byte, tokenizer).
std::string calibration_fingerprint(const Recipe& r, const std::string& model_hash, KeyRope key_rope);
// model_hash: the weights the dump came from (recorded so that ppl --recipe and diagnose can check codebooks).
std::string codebook_fingerprint(const Recipe& r, const MethodSpec& m, const std::string& calib_hash,
                                 const std::string& model_hash = "");

struct PipelineOptions {
  const Recipe* recipe = nullptr;
  const Checkpoint* ckpt = nullptr;
  const Tokenizer* tok = nullptr;
  // calibration runtime and anchor pass for the recipe's calibration.device
  std::function<std::unique_ptr<Runtime>()> make_calibration_runtime;
  AnchorScoreFn anchor_fn;
  CalibDeviceStageFactory calib_device_stage;  // GPU calibration (see CalibrationOptions::device_stage)
  KMeansFactory make_trainer;
  std::string trainer_name = "faiss-cpu";
  MethodRuntimeFactory make_method_runtime;
  bool progress = true;
  bool force = false;  // redo every stage
};

// Runs calibrate -> train-codebook -> ppl into recipe.out_dir; returns the results (also written as
// results.json, results.csv, results.txt there).
std::vector<MethodResult> run_pipeline(const PipelineOptions& o);
// Stages 1 and 2 of run_pipeline alone: the calibration dumps and codebook files the recipe's methods need, in
// recipe.out_dir, reused when their fingerprint matches (the needle evaluation runs after them).
void prepare_codebooks(const PipelineOptions& o);

}  // namespace antkv
