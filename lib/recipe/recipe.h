// Recipes: one YAML file describes a whole experiment (model, calibration, anchors, VQ configuration,
// k-means, evaluation). Every command takes --recipe and `--set key=value` overrides for any field
// (dotted keys, YAML values). Unknown keys and bad values are errors naming the key. The resolved recipe
// (every field, defaults included) is stored in every output file.
//
// Paths in the file are relative to the recipe's folder; ${VAR} and ${VAR:-default} are expanded from the
// environment (e.g. ${ANTKV_SHARED_DIR:-../../shared}). Paths given with --set are relative to the cwd.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "quant/method_options.h"

namespace antkv {

// One VQ configuration: groups of c channels, 2^b centroids each, b/c bits per channel.
struct VqConfig {
  int c = 8;
  int b = 8;
  double bits() const { return static_cast<double>(b) / c; }
};
// The design note's named configurations: 4 -> c2b8, 2 -> c4b8, 1 -> c8b8, 0.75 -> c16b12,
// 0.5 -> c16b8, 0.375 -> c16b6; and ours for unequal K/V widths: 1.5 -> c8b12, 1.25 -> c8b10, 0.25 -> c32b8.
// Throws for anything else.
VqConfig vq_config_for_bits(double bits);

struct Recipe {
  std::string name = "unnamed";
  std::string model;  // HF checkpoint directory

  struct Calibration {
    std::string text;
    int64_t tokens = 262144;       // tokens of calibration text to run (from the start of the text)
    int seq_len = 2048;            // window length (BOS + seq_len - 1 text tokens, as bos_window)
    int stride = 0;                // text tokens between window starts; 0 = seq_len - 1 (no overlap)
    int sample_per_window = 0;     // store only this many random tokens per window; 0 = all
    uint64_t seed = 0;
    std::string device = "auto";   // auto (GPU when usable, else CPU) | cpu | cuda
  } calibration;

  KeyRope key_rope = KeyRope::kPost;  // post | pre: which keys are quantized (and stored in the dump)

  struct Anchor {
    AnchorScoreKind score = AnchorScoreKind::kErrorBound;  // error_bound | attention_mass | key_bound | random | recent
    double ratio = 0.01;                // share of tokens kept in FP16
    int window = 128;                   // newest tokens kept in FP16 during decode (vq, antkv, rsq caches)
  } anchor;

  struct Quant {
    VqConfig keys, values;
  } quant;

  struct KMeans {
    int iters = 20;
    double tol = 1e-4;                 // stop when the relative objective change is below this
    uint64_t seed = 0;
    Weighting weighting = Weighting::kAnchor;  // anchor | none
    bool exclude_anchors = true;
    Gain gain = Gain::kOff;            // off | k | kv: train key (and value) codebooks on unit vectors (gain-shape)
    Rotate rotate = Rotate::kOff;      // off | pca: codebooks in a learned centered PCA basis (OPQ allocation)
    Metric metric = Metric::kPlain;    // plain | task: k-means in the task metric (query moment / o_proj Gram)
    std::string device = "auto";       // auto | cuda | cpu (FAISS)
    int64_t max_points = 0;            // per codebook; 0 = all calibration tokens
    double holdout = 0.05;             // share of tokens held out for the quantization-error report
  } kmeans;

  struct Eval {
    std::vector<std::string> texts;
    int seq_len = 2048;
    std::string protocol = "bos_window";
    int64_t max_windows = -1;
    std::vector<std::string> methods = {"fp16"};
    // Widths (bits per channel, as quant.bits) at which the vq/antkv methods that name no bits/kbits/vbits are
    // compared: each such method is repeated once per width with bits=W (one codebook set per width, one
    // calibration dump). Empty: they take quant.bits. Expanded by load(); methods then holds the result.
    std::vector<std::string> widths;
    std::string device = "auto";  // auto | cpu | cuda
    // simulated: quantized methods rewrite an FP16/bf16 cache with their dequantized values (any method, CPU or
    // GPU); real: vq/antkv keep the GPU's compressed cache (codes, anchors, window) and decode reads it
    // (kernels/quant/compressed_cache.h; fp16/uniform stay simulated).
    std::string kv_cache = "simulated";
    // > 0: each window's first decode_from tokens are prefilled in one forward, the rest fed one token per
    // forward (teacher-forced decode, so the newest tokens sit in the decode window); 0: prefill only.
    int decode_from = 0;
    // What `antkv-eval run` evaluates after the codebook stages: ppl (eval.texts) and/or needle (eval.needle).
    std::vector<std::string> tasks = {"ppl"};
    // Long-context retrieval (lib/eval/needle_tasks.h, `antkv-eval needle`): synthetic cases from a seed.
    struct Needle {
      std::vector<std::string> tasks = {"passkey", "single"};  // passkey | single | multikey | multivalue | multiquery
      std::vector<int> lengths = {1024};     // context lengths: prompt + answer budget, in tokens
      std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};  // needle depths (fractions of the haystack)
      uint64_t seed = 0;
      int cases = 2;                         // cases per task, length and depth
      std::string haystack = "filler";       // filler (a repeated text) | texts (eval.texts)
      std::string value = "number";          // the needles' values (single, multi*): number | uuid
      int digits = 5;                        // digits of a number value (passkey too)
      int answer_budget = 16;                // greedy answer tokens decoded per case
      int distractors = 3;                   // multikey: needles with other keys
      int values = 2;                        // multivalue: values under the one key
      int queries = 2;                       // multiquery: keys asked at once
      int prefill_chunk = 8192;              // prompts longer than this are prefilled in chunks of this many tokens
      int agreement_tokens = 0;              // > 0: greedy continuation of N tokens vs fp16's (generation agreement)
      int agreement_length = 0;              // its prompt length (0: the largest of lengths)
    } needle;
  } eval;

  std::string out_dir;  // where `antkv-eval run` puts its outputs; default runs/<name>

  std::string source;  // the recipe file (empty for defaults)

  // Loads and validates; overrides are "key=value" (value parsed as YAML).
  static Recipe load(const std::string& path, const std::vector<std::string>& overrides = {});
  static Recipe defaults_with(const std::vector<std::string>& overrides);
  // Every field, as YAML (stored in outputs; load() of it gives the same recipe).
  std::string to_yaml() const;
  // The keys this schema knows (for documentation and errors).
  static std::vector<std::string> known_keys();
};

// Resolves the named device keys ("calibration.device", "kmeans.device", "eval.device") in place: "auto"
// becomes cuda when a GPU is usable, else cpu (core/device.h). An explicit cuda without a usable GPU throws a
// one-line error naming the key, before any work. Returns the line to print ("device: cpu (no usable GPU: ...)").
std::string resolve_recipe_devices(Recipe& r, const std::vector<std::string>& keys);

}  // namespace antkv
