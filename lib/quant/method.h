// The KV-cache methods the evaluation compares (design note §5), parsed from recipe strings:
//   fp16
//   uniform:bits=2,group=128,window=0          KIVI-style: keys per channel, values per token
//   vq:bits=1                                  CQ-style: plain k-means codebooks, no anchors
//   antkv:bits=1                               weighted codebooks + anchors (the paper's method)
// Options of vq/antkv: bits (both K and V; or kbits=, vbits=), anchors=on|off, weighting=anchor|none,
// ratio=0.01, score=error_bound|attention_mass|key_bound|random|recent, key_rope=post|pre, correct=on|off.
// `vq` is antkv with anchors=off, weighting=none and codebooks trained on every calibration token (CQ knows
// no anchors); antkv's codebooks leave the calibration anchors out (recipe kmeans.exclude_anchors; option
// exclude=on|off). Ablations are antkv with one component off.
#pragma once
#include <string>

#include "recipe/recipe.h"

namespace antkv {

struct MethodSpec {
  std::string text;            // as written
  std::string kind;            // fp16 | uniform | vq | antkv
  // uniform
  int bits = 2, group = 128, window = 0;
  // vq / antkv
  VqConfig keys, values;
  bool anchors = true;
  std::string weighting = "anchor";
  bool exclude_anchors = true;  // codebooks trained without the calibration anchors (vq: false)
  double ratio = 0.01;
  std::string score = "error_bound";
  std::string key_rope = "post";
  // Our variant (not in the paper): store each quantized key's error |k - k_hat|^2 (fp16, per token and
  // head) and add scale^2 |q|^2 e / 2 to its attention score, undoing the exp-mass that centroid keys lose
  // against exact (anchor) keys. Option correct=on.
  bool correct = false;

  bool needs_codebooks() const { return kind == "vq" || kind == "antkv"; }
  // The codebook file name of the configuration this method needs: "k-c8b8_v-c8b8_anchor_post.h5"
  // ("k-c8b8_v-c8b8_none_all_post.h5" when trained on every token, anchors included).
  std::string codebook_file() const;
  // Nominal bits per channel (K and V averaged).
  double nominal_bits() const;
};

// Defaults (ratio, score, key_rope, bits) come from the recipe; errors name the method string.
MethodSpec parse_method(const std::string& text, const Recipe& r);

// Effective bits per channel (K and V averaged) at context length `context`, counting everything stored:
// codes, FP16 anchors with their 32-bit indices, the FP16 window, scales/zero points, and codebooks
// (fp16 centroids) amortized over the context. include_codebooks = false leaves the codebooks out.
double effective_bits(const MethodSpec& m, int context, int head_dim, bool include_codebooks = true);

}  // namespace antkv
