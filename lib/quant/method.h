// The KV-cache methods the evaluation compares (fp16, uniform, vq, antkv, rsq) and their options, parsed from
// recipe strings such as "antkv:bits=1,anchors=v,gain=kv". What each method and option means, what it costs in
// effective bits and where it runs: docs/METHODS.md. Every option is typed here and checked by parse_method alone.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "quant/method_options.h"
#include "recipe/recipe.h"

namespace antkv {

struct MethodSpec {
  std::string text;                       // as written
  MethodKind kind = MethodKind::kFp16;    // fp16 | uniform | vq | antkv | rsq
  // uniform and rsq
  int bits = 2;                           // bits per channel (uniform: 1-8, rsq: 1-4)
  int group = 128;                        // uniform: tokens (keys) / channels (values) sharing a scale and zero
  int window = 0;                         // uniform: newest tokens kept FP16
  // vq / antkv
  VqConfig keys, values;                  // codebook configuration of each tensor (bits=, kbits=, vbits=)
  AnchorTensors anchors = AnchorTensors::kKeysValues;  // which tensors anchor tokens keep in FP16 (vq: off)
  Gain gain = Gain::kOff;                 // gain-shape VQ: norm stored, direction quantized (codebook configuration)
  Norm norm = Norm::kFp16;                // how gain= stores each norm: fp16 or FP8 E4M3 (not a codebook option)
  Rotate rotate = Rotate::kOff;           // coded in a learned centered PCA basis (codebook configuration)
  Metric metric = Metric::kPlain;         // k-means and assignment in the task metric (codebook configuration)
  Weighting weighting = Weighting::kAnchor;  // k-means weights: anchor scores or none (vq: none)
  bool exclude_anchors = true;            // codebooks trained without the calibration anchors (vq: false)
  double ratio = 0.01;                    // share of tokens kept as anchors
  AnchorScoreKind score = AnchorScoreKind::kErrorBound;  // how anchors are ranked
  KeyRope key_rope = KeyRope::kPost;      // keys quantized after or before RoPE (commute: before, in RoPE pairs)
  bool correct = false;                   // store each key's error and add it back to its score (correct=on)
  bool promote = true;                    // decode-time anchors (design note §2's online rule; promote=on|off)
  int decode_window = 128;                // vq, antkv, rsq: newest tokens kept FP16 during decode (recipe anchor.window)

  // Per-layer budgets (lkbits= / lvbits= / lratio=, '/'-separated, one per layer). Empty: every layer takes
  // keys / values / ratio. A width list needs one codebook file per distinct (key, value) width pair of its layers.
  std::vector<VqConfig> layer_keys, layer_values;
  std::vector<double> layer_ratio;

  const char* kind_name() const { return option_name(kind); }
  bool has_anchors() const { return anchors != AnchorTensors::kOff; }
  bool anchor_keys() const { return anchors == AnchorTensors::kKeys || anchors == AnchorTensors::kKeysValues; }
  bool anchor_values() const { return anchors == AnchorTensors::kValues || anchors == AnchorTensors::kKeysValues; }
  bool gain_keys() const { return gain != Gain::kOff; }
  bool gain_values() const { return gain == Gain::kKeysValues; }
  double norm_bits() const { return norm == Norm::kFp8 ? 8.0 : 16.0; }  // per gain-coded token and head
  bool pre_rope() const { return key_rope != KeyRope::kPost; }  // pre and commute: pre-RoPE keys are coded
  bool commute() const { return key_rope == KeyRope::kCommute; }  // key groups of whole RoPE pairs
  // Whether decode steps run the decode-time anchor rule: anchors on, promote on, a score that is a sum over
  // attention rows (parse_method refuses promote=on with random / recent scores).
  bool promotes() const { return has_anchors() && promote && score_is_attention_sum(score); }
  bool needs_codebooks() const { return kind == MethodKind::kVq || kind == MethodKind::kAntkv; }

  bool layered() const { return !layer_keys.empty(); }
  VqConfig key_config(int l) const { return layer_keys.empty() ? keys : layer_keys.at(static_cast<size_t>(l)); }
  VqConfig value_config(int l) const { return layer_values.empty() ? values : layer_values.at(static_cast<size_t>(l)); }
  double ratio_of(int l) const { return layer_ratio.empty() ? ratio : layer_ratio.at(static_cast<size_t>(l)); }
  int listed_layers() const;  // the length of the per-layer lists (0: none)
  // The specs (one per codebook file; lists cleared, keys / values set) whose codebooks this method reads.
  std::vector<MethodSpec> codebook_specs() const;
  // The name of this method's codebook set in load_method_codebooks' map: codebook_file(), or for per-layer widths
  // "layers:" + the files of its layers.
  std::string codebook_key() const;
  // The codebook file name of the configuration this method needs: "k-c8b8_v-c8b8_anchor_post.h5"
  // ("k-c8b8_v-c8b8_none_all_post.h5" when trained on every token, anchors included; "..._post_gk.h5" for
  // gain-shape keys, "_gkv" for keys and values, "_rpca" for rotate=pca, "_mtask" for metric=task).
  std::string codebook_file() const;
  // Nominal bits per channel (K and V averaged).
  double nominal_bits() const;
};

// A method string split into its kind and its options in order ("antkv:bits=1,gain=kv" -> "antkv",
// {{"bits", "1"}, {"gain", "kv"}}); an option without '=', an empty key or a key given twice is an error naming the
// method. The syntax of methods lives here alone: parse_method and the recipe's eval.widths expansion read it.
struct MethodText {
  std::string kind;
  std::vector<std::pair<std::string, std::string>> options;
  bool has(const std::string& key) const;
};
MethodText split_method_text(const std::string& text);

// eval.widths: every vq/antkv method that names no bits/kbits/vbits is repeated once per width with bits=W (the block
// takes the place of the first such method; duplicates dropped). Errors name `src` and the key.
std::vector<std::string> expand_method_widths(const std::vector<std::string>& methods,
                                              const std::vector<std::string>& widths, const std::string& src);

// Defaults (bits, ratio, score, key_rope, weighting, exclude, gain, rotate, metric, decode window) come from the recipe;
// every option's value and every combination is checked here; errors name the method string.
MethodSpec parse_method(const std::string& text, const Recipe& r);

// Effective bits per channel (K and V averaged) at context length `context`, counting everything stored:
// codes, FP16 anchors with their 32-bit indices (per anchored tensor), the FP16 window, scales/zero points,
// gain-shape norms (fp16, or 8 bits with norm=fp8, per quantized token and head), and codebooks (with rotate=pca's fp16 mean and d x d basis per
// layer, head and tensor) (fp16 centroids) amortized over the context. include_codebooks = false leaves the codebooks out.
double effective_bits(const MethodSpec& m, int context, int head_dim, bool include_codebooks = true);

}  // namespace antkv
